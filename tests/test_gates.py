"""Gate networks built from a pattern's gate section (nsaflex.gates)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.nn import functional as F

from nsaflex.errors import InputError
from nsaflex.gates import GateNetwork, build_gates, gate_for_pattern
from nsaflex.reference import reference_attention
from nsaflex.spec import Compression, Gate, LayerOverride, Pattern, Selection, Window

HIDDEN, HEADS = 24, 3


def three_branch(gate: Gate, **changes) -> Pattern:
    pattern = Pattern(
        name="g",
        compression=Compression(block=4, stride=4),
        selection=Selection(block=4, count=2),
        window=Window(size=4),
        gate=gate,
    )
    return dataclasses.replace(pattern, **changes)


def test_mlp_gate_is_videonsa_formula_and_layout():
    torch.manual_seed(0)
    gate = GateNetwork(Gate(kind="mlp", temperature=0.3, bias=0.5), HIDDEN, HEADS, 3, init_std=0.2)
    hidden = torch.randn(2, 5, HIDDEN)
    values = gate(hidden)
    assert values.shape == (2, HEADS, 5, 3)
    # VideoNSA: g_proj_2(gelu(g_proj_1(h))).view(B, L, heads, 3) / T, sigmoid.
    logits = F.linear(F.gelu(F.linear(hidden, gate.g_proj_1.weight, gate.g_proj_1.bias)), gate.g_proj_2.weight, gate.g_proj_2.bias)
    expected = torch.sigmoid(logits.view(2, 5, HEADS, 3) / 0.3).permute(0, 2, 1, 3)
    torch.testing.assert_close(values, expected, rtol=0, atol=0)
    # Head-major layout: output feature h*3 + b is head h, branch b.
    h, b = 2, 1
    manual = torch.sigmoid(logits[..., h * 3 + b] / 0.3)
    torch.testing.assert_close(values[:, h, :, b], manual, rtol=0, atol=0)
    assert gate.parameter_names == ("g_proj_1", "g_proj_2")
    assert gate.g_proj_1.weight.shape == (HIDDEN, HIDDEN) and gate.g_proj_1.bias is not None
    assert gate.g_proj_2.weight.shape == (HEADS * 3, HIDDEN)


def test_linear_and_constant_gates():
    torch.manual_seed(0)
    hidden = torch.randn(1, 4, HIDDEN)
    linear = GateNetwork(Gate(kind="linear", temperature=2.0), HIDDEN, HEADS, 2)
    expected = torch.sigmoid(F.linear(hidden, linear.g_proj.weight, linear.g_proj.bias).view(1, 4, HEADS, 2) / 2.0)
    torch.testing.assert_close(linear(hidden), expected.permute(0, 2, 1, 3), rtol=0, atol=0)
    assert linear.parameter_names == ("g_proj",)
    constant = GateNetwork(Gate(kind="constant", values=(0.25, 2.0)), HIDDEN, HEADS, 2)
    values = constant(hidden)
    assert values.shape == (1, HEADS, 4, 2)
    assert torch.all(values[..., 0] == 0.25) and torch.all(values[..., 1] == 2.0)
    assert list(constant.parameters()) == [] and constant.state_dict() == {}
    with pytest.raises(TypeError):
        constant.logits(hidden)


def test_initialisation_uses_pattern_bias_and_std():
    torch.manual_seed(0)
    gate = GateNetwork(Gate(kind="mlp", bias=-1.5), 256, 4, 3, init_std=0.02)
    assert torch.all(gate.g_proj_2.bias == -1.5)
    assert torch.all(gate.g_proj_1.bias == 0)
    assert abs(gate.g_proj_1.weight.std().item() - 0.02) < 0.002
    # Zero weights and a large bias give one-hot gates: the "select one branch" setting.
    with torch.no_grad():
        gate.g_proj_2.weight.zero_()
        gate.g_proj_2.bias.copy_(torch.tensor([-100.0, -100.0, 100.0]).repeat(4))
    values = gate(torch.randn(1, 3, 256))
    assert torch.equal(values[..., 2], torch.ones_like(values[..., 2]))
    assert torch.equal(values[..., :2], torch.zeros_like(values[..., :2]))


def test_bad_hidden_state_is_refused():
    gate = GateNetwork(Gate(kind="mlp"), HIDDEN, HEADS, 3)
    with pytest.raises(InputError, match="hidden_states"):
        gate(torch.randn(2, 5, HIDDEN + 1))
    with pytest.raises(InputError, match="hidden_states"):
        gate(torch.randn(5, HIDDEN))


def test_build_gates_resolves_layer_overrides():
    pattern = three_branch(
        Gate(kind="mlp"),
        layers=(LayerOverride(at=(0,), dense=True), LayerOverride(at=(2,), remove=("selection",))),
    )
    gates = build_gates(pattern, HIDDEN, HEADS, 3, dtype=torch.float64)
    assert gates[0] is None
    assert gates[1].num_branches == 3 and gates[2].num_branches == 2
    assert gates[2].g_proj_2.weight.shape == (HEADS * 2, HIDDEN)
    assert gates[1].g_proj_1.weight.dtype == torch.float64
    assert gate_for_pattern(pattern.for_layer(0), HIDDEN, HEADS) is None


def test_gates_feed_compiled_attention_and_train():
    """Gate values are the ``gates`` argument of the attention; gradients reach them."""
    torch.manual_seed(0)
    pattern = three_branch(Gate(kind="mlp", temperature=0.5))
    gate = gate_for_pattern(pattern, HIDDEN, HEADS, dtype=torch.float64)
    hidden = torch.randn(1, 10, HIDDEN, dtype=torch.float64)
    q = torch.randn(1, HEADS, 10, 8, dtype=torch.float64)
    k = torch.randn(1, 1, 10, 8, dtype=torch.float64)
    v = torch.randn(1, 1, 10, 8, dtype=torch.float64)
    out = reference_attention(q, k, v, pattern, gate(hidden))
    out.square().sum().backward()
    for parameter in gate.parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all()
        assert parameter.grad.abs().sum() > 0
