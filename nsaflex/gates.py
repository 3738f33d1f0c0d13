"""Gate networks: the per-head, per-branch mixing weights of a pattern's branches.

A pattern's ``gate`` section says how a decoder layer turns its hidden state
into gate values ``[B, Hq, L, nb]`` (``nb`` = branches present, in the order
compression, selection, window), the ``gates`` argument of a compiled attention:

* ``mlp`` (VideoNSA): ``g_proj_1 = Linear(hidden, hidden)`` with bias, GELU
  (exact, erf form), ``g_proj_2 = Linear(hidden, heads * nb)`` with bias, the
  output viewed as ``[B, L, heads, nb]`` (head-major: output feature
  ``h * nb + b`` is head ``h``, branch ``b``), divided by ``temperature``,
  sigmoid. The parameter names ``g_proj_1`` / ``g_proj_2`` and this layout are
  VideoNSA's, so its checkpoint tensors load unchanged.
* ``linear``: ``g_proj = Linear(hidden, heads * nb)`` with bias, same view,
  divided by ``temperature``, sigmoid.
* ``constant``: the pattern's ``values``, one per branch, for every head and
  token (no parameters).

The hidden state is the one the attention's q/k/v projections read: in a
Qwen2 / Qwen2.5-VL decoder layer, the output of ``input_layernorm``. VideoNSA
computes its gates from exactly that tensor (the ``hidden_states`` argument of
its attention module), and so does :mod:`nsaflex.adapters.qwen2_5_vl`.

Initialisation: weights normal with standard deviation ``init_std``
(transformers' ``initializer_range``, 0.02 for Qwen), biases zero except the
last layer's, which start at the pattern's ``gate.bias``.

Everything here is independent of any adapter: build the gate networks of a
model with :func:`build_gates` and feed their output to a
:class:`~nsaflex.runtime.CompiledAttention`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint as recomputed_in_backward

from nsaflex.errors import InputError
from nsaflex.spec import Gate, Pattern

# Parameter names per gate kind, in the order they are applied.
GATE_PARAMETER_NAMES: dict[str, tuple[str, ...]] = {
    "mlp": ("g_proj_1", "g_proj_2"),
    "linear": ("g_proj",),
    "constant": (),
}


class GateNetwork(nn.Module):
    """The gate of one layer: hidden states ``[B, L, hidden]`` to gate values
    ``[B, Hq, L, nb]``, public as ``nsaflex.GateNetwork``.

    ``gates[b, h, t, j] = sigmoid(z[b, t, h * nb + j] / temperature)`` with
    ``z = g_proj_2(gelu(g_proj_1(x)))`` (``mlp``) or ``z = g_proj(x)``
    (``linear``), ``z`` of width ``Hq * nb``, head-major; ``constant`` gates
    repeat the pattern's values. Column ``j`` is the ``j``-th branch present in
    the order compression, selection, window, so ``nb`` is the branch count of
    the layer's *resolved* pattern: an override that removes a branch leaves
    ``nb - 1`` columns, a dense layer has no gate (:func:`gate_for_pattern`).
    The output is the ``gates`` argument of a compiled attention.

    Args:
        gate: the pattern's ``gate`` section.
        hidden_size: width of the hidden state the gate reads.
        num_heads: query heads ``Hq`` (one gate per query head and branch).
        num_branches: branches present in the layer's pattern (``nb``).
        init_std: standard deviation of the initial weights.
        dtype, device: of the parameters.
    """

    def __init__(
        self,
        gate: Gate,
        hidden_size: int,
        num_heads: int,
        num_branches: int,
        *,
        init_std: float = 0.02,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if num_branches < 1:
            raise ValueError("a gate network needs at least one branch")
        self.kind = gate.kind
        self.temperature = float(gate.temperature)
        self.initial_bias = float(gate.bias)
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_branches = num_branches
        self.init_std = init_std
        factory = {"dtype": dtype, "device": device}
        if gate.kind == "mlp":
            self.g_proj_1 = nn.Linear(hidden_size, hidden_size, bias=True, **factory)
            self.g_proj_2 = nn.Linear(hidden_size, num_heads * num_branches, bias=True, **factory)
        elif gate.kind == "linear":
            self.g_proj = nn.Linear(hidden_size, num_heads * num_branches, bias=True, **factory)
        else:
            values = tuple(gate.values or ())
            if len(values) != num_branches:
                raise ValueError(f"constant gate: {len(values)} values for {num_branches} branches")
            self.register_buffer("values", torch.tensor(values, dtype=dtype or torch.float32, device=device), persistent=False)
        self.reset_parameters()

    @property
    def parameter_names(self) -> tuple[str, ...]:
        """Names of the linear layers (``g_proj_1``, ``g_proj_2`` or ``g_proj``)."""
        return GATE_PARAMETER_NAMES[self.kind]

    def linears(self) -> dict[str, nn.Linear]:
        """The linear layers by name (empty for constant gates)."""
        return {name: getattr(self, name) for name in self.parameter_names}

    def reset_parameters(self) -> None:
        if self.kind == "constant":
            return
        with torch.no_grad():
            layers = list(self.linears().values())
            for layer in layers:
                if layer.weight.device.type == "meta":
                    return
                layer.weight.normal_(0.0, self.init_std)
                layer.bias.zero_()
            layers[-1].bias.fill_(self.initial_bias)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Gate logits before the temperature and sigmoid: ``[B, L, heads, nb]``."""
        if self.kind == "constant":
            raise TypeError("constant gates have no logits")
        self._check(hidden)
        if self.kind == "mlp":
            if torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in self.parameters())):
                # GELU's backward keeps its input and g_proj_2's keeps GELU's output: two
                # [B, L, hidden] tensors (at 128K tokens and hidden 3584, 0.9 GiB each).
                # Recomputed from the input in the backward, the gate keeps only its input,
                # which the q/k/v projections keep anyway; it costs one more g_proj_1 product
                # (about 1 % of a 7B layer's forward+backward at 128K). The gradients are the
                # same bits (the same ops on the same values).
                out = recomputed_in_backward(self._mlp, hidden, use_reentrant=False, preserve_rng_state=False)
            else:
                out = self._mlp(hidden)
        else:
            out = self.g_proj(hidden)
        return out.view(*hidden.shape[:-1], self.num_heads, self.num_branches)

    def _mlp(self, hidden: torch.Tensor) -> torch.Tensor:
        """``g_proj_2(gelu(g_proj_1(hidden)))`` of the ``mlp`` kind."""
        return self.g_proj_2(F.gelu(self.g_proj_1(hidden)))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Gate values ``[B, Hq, L, nb]`` (the layout of ``CompiledAttention``'s ``gates``)."""
        if self.kind == "constant":
            self._check(hidden)
            batch, length = hidden.shape[:2]
            return self.values.to(hidden.dtype).expand(batch, self.num_heads, length, self.num_branches)
        values = torch.sigmoid(self.logits(hidden) / self.temperature)
        return values.permute(0, 2, 1, 3)

    def _check(self, hidden: torch.Tensor) -> None:
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or hidden.shape[-1] != self.hidden_size:
            found = list(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
            raise InputError("hidden_states", f"a tensor [B, L, {self.hidden_size}]", found)

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind!r}, heads={self.num_heads}, branches={self.num_branches}, "
            f"temperature={self.temperature}"
        )


def gate_for_pattern(
    pattern: Pattern,
    hidden_size: int,
    num_heads: int,
    *,
    init_std: float = 0.02,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> GateNetwork | None:
    """The gate network of a (layer-resolved) pattern, or ``None`` when the layer
    needs none (a dense layer, or no branches)."""
    if pattern.dense or not pattern.branches:
        return None
    return GateNetwork(
        pattern.gate, hidden_size, num_heads, len(pattern.branches), init_std=init_std, dtype=dtype, device=device
    )


def build_gates(
    pattern: Pattern,
    hidden_size: int,
    num_heads: int,
    num_layers: int,
    *,
    init_std: float = 0.02,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> list[GateNetwork | None]:
    """One gate network per decoder layer, per-layer overrides resolved (``None``
    for dense layers)."""
    return [
        gate_for_pattern(
            pattern.for_layer(layer), hidden_size, num_heads, init_std=init_std, dtype=dtype, device=device
        )
        for layer in range(num_layers)
    ]
