"""nsaflex.SparseAttentionLayer: projections, gate network, RoPE and a compiled
pattern in one module (nsaflex.layer)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn import functional as F

import nsaflex
from nsaflex.errors import InputError, PatternError
from nsaflex.spec import Compression, Gate, Hybrid, LayerOverride, Pattern, Selection, Window

# Overrides: layer 1 drops selection (2 gate columns), layer 2 is dense (no gate).
OVERRIDES = (LayerOverride(at=(1,), remove=("selection",)), LayerOverride(at=(2,), dense=True))


def small_pattern(gate: Gate = Gate(kind="mlp", temperature=0.5, bias=0.3), pooling: str = "mlp", **changes) -> Pattern:
    pattern = Pattern(
        name="small",
        compression=Compression(block=4, stride=2, pooling=pooling),
        selection=Selection(block=4, count=2, forced=("current",)),
        window=Window(size=4),
        gate=gate,
    )
    return dataclasses.replace(pattern, **changes)


def rope_by_complex_rotation(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE written independently of nsaflex.layer: the pair ``(x_j, x_{j + D/2})``
    is the complex number ``x_j + i x_{j + D/2}``, multiplied by ``exp(i p theta^(-2j/D))``."""
    half = x.shape[-1] // 2
    frequencies = theta ** (-torch.arange(half, dtype=torch.float64) * 2 / x.shape[-1])
    angles = positions.to(torch.float64)[:, None, :, None] * frequencies
    rotation = torch.polar(torch.ones_like(angles), angles)
    rotated = torch.complex(x[..., :half], x[..., half:]) * rotation
    return torch.cat((rotated.real, rotated.imag), dim=-1)


def hand_composition(layer: nsaflex.SparseAttentionLayer, pattern: Pattern, hidden: torch.Tensor,
                     token_types: torch.Tensor | None, positions: torch.Tensor) -> torch.Tensor:
    """The layer's formula in float64 from its weights: projections -> RoPE ->
    gates -> nsaflex.compile(pattern, "reference") -> o_proj."""
    weights = {name: tensor.detach().double() for name, tensor in layer.state_dict().items()}
    x = hidden.double()
    batch, length, _ = x.shape
    heads, kv_heads, dim = layer.num_heads, layer.num_kv_heads, layer.head_dim

    def project(name: str, count: int) -> torch.Tensor:
        out = F.linear(x, weights[f"{name}.weight"], weights.get(f"{name}.bias"))
        return out.view(batch, length, count, dim).transpose(1, 2)

    q, k, v = project("q_proj", heads), project("k_proj", kv_heads), project("v_proj", kv_heads)
    if layer.rope_theta is not None:
        q, k = (rope_by_complex_rotation(t, positions, layer.rope_theta) for t in (q, k))
    gates = None
    resolved = pattern.for_layer(layer.layer_idx or 0)
    if resolved.branches and pattern.gate.kind != "constant":
        if pattern.gate.kind == "mlp":
            inner = F.gelu(F.linear(x, weights["gate.g_proj_1.weight"], weights["gate.g_proj_1.bias"]))
            logits = F.linear(inner, weights["gate.g_proj_2.weight"], weights["gate.g_proj_2.bias"])
        else:
            logits = F.linear(x, weights["gate.g_proj.weight"], weights["gate.g_proj.bias"])
        nb = len(resolved.branches)
        gates = torch.sigmoid(logits.view(batch, length, heads, nb) / pattern.gate.temperature).permute(0, 2, 1, 3)
    sized = dataclasses.replace(pattern, model=nsaflex.Model(query_heads=heads, kv_heads=kv_heads, head_dim=dim))
    attention = nsaflex.compile(sized, "reference", layer=layer.layer_idx, head_dim=dim).double()
    attention.load_state_dict({name[len("attention."):]: t for name, t in weights.items() if name.startswith("attention.")})
    out = attention(q, k, v, gates, token_types)
    out = out.transpose(1, 2).reshape(batch, length, heads * dim)
    return F.linear(out, weights["o_proj.weight"], weights.get("o_proj.bias"))


@settings(max_examples=12, derandomize=True)
@given(
    kv_heads=st.sampled_from([1, 2]),
    group=st.sampled_from([1, 3]),
    head_dim=st.sampled_from([4, 8]),
    length=st.integers(1, 20),
    batch=st.integers(1, 2),
    gate_kind=st.sampled_from(["mlp", "linear", "constant"]),
    pooling=st.sampled_from(["mean", "mlp"]),
    rope=st.booleans(),
    hybrid=st.booleans(),
    layer_idx=st.sampled_from([0, 1, 2]),
    seed=st.integers(0, 2**16),
)
def test_layer_equals_hand_composition(kv_heads, group, head_dim, length, batch, gate_kind, pooling, rope, hybrid,
                                       layer_idx, seed):
    """fp32 layer against its formula in float64 from the same weights. Tolerance:
    relative 1e-5 (of the largest output) -- the fp32 projections and RoPE round at
    6e-8 relative, summed over at most 24 features, and the attention itself runs
    in float64 on both sides."""
    torch.manual_seed(seed)
    gate = Gate(kind="constant", values=(0.5, 1.0, 0.25)) if gate_kind == "constant" else Gate(kind=gate_kind, temperature=0.5)
    # Constant gates have one value per branch of the base pattern, so they keep every layer's branches.
    layers = () if gate_kind == "constant" else OVERRIDES
    pattern = small_pattern(gate, pooling, layers=layers, hybrid=Hybrid() if hybrid else None)
    heads = kv_heads * group
    hidden_size = 12
    layer = nsaflex.SparseAttentionLayer(
        pattern, hidden_size, heads, kv_heads, head_dim, qkv_bias=True, o_bias=True,
        rope_theta=500.0 if rope else None, backend="reference", layer_idx=layer_idx if layers else None, init_std=0.3,
    )
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))  # biases and position embeddings away from their zero start
    hidden = torch.randn(batch, length, hidden_size)
    token_types = torch.randint(0, 2, (batch, length)) if hybrid else None
    positions = torch.randint(0, 1000, (batch, length)) if rope else torch.arange(length).expand(batch, length)
    out = layer(hidden, token_types, positions if rope else None)
    expected = hand_composition(layer, pattern, hidden, token_types, positions)
    assert out.shape == (batch, length, hidden_size) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (4, 1), (6, 3), (6, 2)])
def test_gqa_shapes(heads, kv_heads):
    layer = nsaflex.SparseAttentionLayer(small_pattern(), 24, heads, kv_heads, backend="reference")
    dim = 24 // heads
    assert layer.head_dim == dim
    assert layer.q_proj.weight.shape == (heads * dim, 24)
    assert layer.k_proj.weight.shape == layer.v_proj.weight.shape == (kv_heads * dim, 24)
    assert layer.o_proj.weight.shape == (24, heads * dim)
    assert layer.gate.g_proj_2.weight.shape == (heads * 3, 24)
    assert layer.pattern.model.query_heads == heads and layer.pattern.model.kv_heads == kv_heads
    assert layer(torch.randn(2, 9, 24)).shape == (2, 9, 24)


def test_bundled_pattern_serves_any_model_shape():
    """The pattern's model section (VideoNSA's 28/4 heads, D 128) gives way to the layer's."""
    layer = nsaflex.SparseAttentionLayer("videonsa", 32, 4, 2, backend="reference")
    assert (layer.pattern.model.query_heads, layer.pattern.model.kv_heads, layer.pattern.model.head_dim) == (4, 2, 8)
    assert layer.pattern.model.num_layers is None
    assert layer.gate.temperature == 0.3
    token_types = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1]])
    assert layer(torch.randn(1, 10, 32), token_types).shape == (1, 10, 32)


def test_per_layer_override_changes_gate_width():
    pattern = small_pattern(layers=OVERRIDES)
    widths = []
    for index in range(4):
        layer = nsaflex.SparseAttentionLayer(pattern, 16, 4, 2, backend="reference", layer_idx=index)
        widths.append(None if layer.gate is None else layer.gate.num_branches)
        if layer.gate is not None:
            assert layer.gate.g_proj_2.out_features == 4 * len(layer.branches)
            assert layer.gate(torch.randn(1, 5, 16)).shape == (1, 4, 5, len(layer.branches))
        assert layer(torch.randn(1, 6, 16)).shape == (1, 6, 16)
    # Layer 3 has no override: the base pattern's three branches.
    assert widths == [3, 2, None, 3]


def test_gates_of_the_wrong_width_name_the_layer():
    pattern = small_pattern(layers=OVERRIDES)
    layer = nsaflex.SparseAttentionLayer(pattern, 16, 4, 2, backend="reference", layer_idx=1)
    q, k = torch.randn(1, 4, 8, 4), torch.randn(1, 2, 8, 4)
    three_columns = nsaflex.SparseAttentionLayer(pattern, 16, 4, 2, backend="reference", layer_idx=0).gate(torch.randn(1, 8, 16))
    message = (r"^gates: expected shape \[1, 4, 8, 2\] \(\[B, Hq, L, branches\]; layer 1 has 2 branches: "
               r"compression, window; per-layer overrides change the count\), found \[1, 4, 8, 3\] \(width 3\)$")
    with pytest.raises(InputError, match=message):
        layer.attention(q, k, k, three_columns)
    dense = nsaflex.compile(pattern, "reference", layer=2, head_dim=4)
    with pytest.raises(InputError, match=r"layer 2 has 0 branches: none; .* \(width 3\)"):
        dense(q, k, k, three_columns)
    # Without a layer, the pattern is named.
    base = nsaflex.compile(small_pattern(), "reference", head_dim=4)
    with pytest.raises(InputError, match=r"pattern 'small' has 3 branches: compression, selection, window; .* \(width 2\)"):
        base(q, k, k, three_columns[..., :2])


@pytest.mark.parametrize(
    "arguments, error, message",
    [
        ({"num_heads": 4, "num_kv_heads": 3}, InputError, r"^num_kv_heads: expected a divisor of num_heads = 4, found 3$"),
        ({"hidden_size": 30, "num_heads": 4}, InputError,
         r"^hidden_size: expected a multiple of num_heads = 4 \(or an explicit head_dim\), found 30$"),
        ({"num_heads": 0}, InputError, r"^num_heads: expected an integer >= 1, found 0$"),
        ({"head_dim": 5}, InputError, r"^head_dim: expected an even head dim \(RoPE rotates pairs"),
        ({"rope_theta": -1.0}, InputError, r"^rope_theta: expected a number > 0"),
        ({"qkv_bias": "yes"}, InputError, r"^qkv_bias: expected True or False"),
        ({"pattern": "vidensa"}, PatternError, r"expected an existing pattern file or a bundled pattern name.*did you mean 'videonsa'"),
        ({"pattern": small_pattern(layers=OVERRIDES)}, InputError,
         r"^layer_idx: expected a decoder layer index: pattern 'small' has per-layer overrides \(at layers \[1, 2\]\), found None$"),
        ({"layer_idx": -1}, InputError, r"^layer_idx: expected an integer >= 0, found -1$"),
        ({"init_std": 0}, InputError, r"^init_std: expected a number > 0, found 0$"),
        ({"dtype": torch.int64}, InputError, r"^dtype: expected a floating torch dtype"),
        ({"device": "gpu"}, InputError, r"^device: expected a torch device"),
        ({"backend": "flexx"}, nsaflex.BackendUnavailable, r"flexx"),
    ],
)
def test_bad_arguments_are_refused(arguments, error, message):
    kwargs = {"pattern": small_pattern(), "hidden_size": 16, "num_heads": 4, "backend": "reference", **arguments}
    with pytest.raises(error, match=message):
        nsaflex.SparseAttentionLayer(**kwargs)


def test_bad_forward_inputs_are_refused():
    layer = nsaflex.SparseAttentionLayer(small_pattern(), 16, 4, 2, backend="reference")
    with pytest.raises(InputError, match=r"^hidden_states: expected a tensor \[B, L, 16\], found \[2, 5, 12\]$"):
        layer(torch.randn(2, 5, 12))
    with pytest.raises(InputError, match=r"^position_ids: expected shape \[2, 5\] or \[5\], found \[4\]$"):
        layer(torch.randn(2, 5, 16), position_ids=torch.arange(4))
    with pytest.raises(InputError, match=r"^position_ids: expected an integer tensor"):
        layer(torch.randn(2, 5, 16), position_ids=torch.zeros(5))
    with pytest.raises(InputError, match=r"^token_types: expected None: the pattern has no hybrid section"):
        layer(torch.randn(2, 5, 16), torch.zeros(2, 5, dtype=torch.long))
    no_rope = nsaflex.SparseAttentionLayer(small_pattern(), 16, 4, 2, rope_theta=None, backend="reference")
    with pytest.raises(InputError, match=r"^position_ids: expected None: the layer has no rotary embedding"):
        no_rope(torch.randn(2, 5, 16), position_ids=torch.arange(5))


def test_positions_default_to_arange_and_shift_invariance():
    """RoPE depends on relative positions only: shifting every position leaves the
    output (with mean pooling: a compressed key is then a mean of rotated keys, and
    its dot product with a query still depends on differences of positions only)."""
    torch.manual_seed(0)
    layer = nsaflex.SparseAttentionLayer(small_pattern(pooling="mean"), 16, 4, 2, backend="reference", init_std=0.3, dtype=torch.float64)
    hidden = torch.randn(2, 11, 16, dtype=torch.float64)
    default = layer(hidden)
    torch.testing.assert_close(default, layer(hidden, position_ids=torch.arange(11)), rtol=0, atol=0)
    torch.testing.assert_close(default, layer(hidden, position_ids=torch.arange(11) + 37), rtol=1e-9, atol=1e-12)
    assert not torch.allclose(default, layer(hidden, position_ids=torch.arange(11).flip(0)))


TRAINED_PARAMETERS = {
    "q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "gate.g_proj_1.weight", "gate.g_proj_2.bias",
    "attention.pooler.key_fc1.weight", "attention.pooler.value_position",
}


@pytest.mark.parametrize("backend", ["reference", "flex"])
def test_gradients_reach_every_parameter(backend):
    """Projections, gate network and compression MLP all get a gradient."""
    torch.manual_seed(0)
    layer = nsaflex.SparseAttentionLayer(small_pattern(), 16, 2, 1, backend=backend, init_std=0.1)
    assert layer.attention.backend == backend
    layer(torch.randn(2, 16, 16)).square().sum().backward()
    assert TRAINED_PARAMETERS <= {name for name, _ in layer.named_parameters()}
    for name, parameter in layer.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


def test_trains_from_scratch():
    """A tiny layer learns to copy the previous token (FlexAttention backend on the CPU)."""
    torch.manual_seed(0)
    layer = nsaflex.SparseAttentionLayer(small_pattern(), 16, 2, 1, backend="flex", init_std=0.1)
    optimiser = torch.optim.Adam(layer.parameters(), lr=5e-2)
    hidden = torch.randn(4, 16, 16)
    losses = []
    for _ in range(15):
        loss = F.mse_loss(layer(hidden)[:, 1:], hidden[:, :-1])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses
