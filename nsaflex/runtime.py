"""The runtime callable: ``nsaflex.compile(pattern, backend=...)``.

Returns a :class:`CompiledAttention`, an ``nn.Module`` that validates its inputs
and runs the plan's backend. It owns the learned pieces of the attention
itself (the compression MLP of ``pooling: mlp``); gate networks live with the
model (see :mod:`nsaflex.gates` and the adapters).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import torch
from torch import nn

from nsaflex.backends.base import BranchPlan, build_decode, describe_decode, get_backend
from nsaflex.decoding import DecodeState, decode_step, start_state
from nsaflex.errors import InputError, PatternError
from nsaflex.inputs import check_inputs, resolve_gates
from nsaflex.inspect import AttentionInfo, block_lists, sorted_block_lists
from nsaflex.loader import load_pattern
from nsaflex.plan import Plan, make_plan
from nsaflex.pooling import MLPPooling, check_head_dim
from nsaflex.release_lowering import RELEASE
from nsaflex.release_lowering import build_kernel as build_release_kernel
from nsaflex.spec import Pattern


class CompiledAttention(nn.Module):
    """``attn(q, k, v, gates=None, token_types=None, *, scale=None,
    return_lse=False, return_info=False) -> out``.

    q ``[B, Hq, L, D]``, k and v ``[B, Hkv, L, D]``, gates ``[B, Hq, L, nb]`` in
    the order compression, selection, window (None for constant gates),
    token_types ``[B, L]`` (0 text, 1 vision; hybrid patterns only); out
    ``[B, Hq, L, D]`` in the dtype of q.

    ``scale`` multiplies every score ``q·k`` (None: ``1/sqrt(D)``), as in
    FlexAttention. The reference applies it exactly; flex and triton receive
    ``q * (scale * sqrt(D))``, exact in float32 up to one rounding of q, and
    in bfloat16/float16 one more rounding of q in its own dtype (relative
    ``2^-9`` / ``2^-12`` per element).

    NSA mixes several softmaxes, so there is no single log-sum-exp: with
    ``return_lse=True`` the call returns ``(out, lse)`` with ``lse [B, Hq, L,
    nb]`` each branch's (natural log, ``-inf`` where the branch sees no key;
    :meth:`nsaflex.AttentionInfo.stacked_lse`), the dense path's in every
    slot of text queries and dense layers (``nb = 1``). With
    ``return_info=True`` it returns ``(out, info)``, an
    :class:`nsaflex.AttentionInfo`; with both, ``(out, lse, info)``.
    Both keep every branch's values (flex evaluates its block masks eagerly
    for them), so they cost memory and time: meant for inspection, not
    training.

    In ``videonsa_release`` mode (``compile(..., mode="videonsa_release")``)
    ``lengths [B]`` gives the real tokens at the front of each row (padding
    after them outputs zeros and changes nothing of the real tokens);
    ``return_lse`` and ``return_info`` are refused there.
    """

    def __init__(self, pattern: Pattern, plan: Plan, head_dim: int | None = None) -> None:
        super().__init__()
        self.pattern = plan.pattern
        self.plan = plan
        self.pooler: MLPPooling | None = None
        if head_dim is not None:
            check_head_dim(head_dim)  # also where no MLP needs it: a bad value is a mistake either way
        compression = self.pattern.compression
        if compression is not None and compression.pooling == "mlp" and not self.pattern.dense:
            dim = head_dim if head_dim is not None else self.pattern.model.head_dim
            if dim is None:
                raise PatternError("model.head_dim", "a head dim (or compile(..., head_dim=...)) for mlp pooling", None)
            self.pooler = MLPPooling(compression, dim)
        self._kernel = _build(plan)
        self._decode_kernel = build_decode(plan.backend, self.pattern, plan)
        # For run_heads: the same checks without the model's head counts. Built once,
        # since constructing a Pattern re-validates it (budget included).
        any_heads = dataclasses.replace(self.pattern.model, query_heads=None, kv_heads=None)
        self._any_heads_pattern = dataclasses.replace(self.pattern, model=any_heads)

    def __getstate__(self) -> dict:
        # The kernel is a closure (or holds per-shape mask caches): pickles and
        # copies rebuild it from the plan instead.
        state = super().__getstate__()
        state.pop("_kernel", None)
        state.pop("_decode_kernel", None)
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._kernel = _build(self.plan)
        self._decode_kernel = build_decode(self.plan.backend, self.pattern, self.plan)

    @property
    def backend(self) -> str:
        return self.plan.backend

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        gates: torch.Tensor | None = None,
        token_types: torch.Tensor | None = None,
        *,
        scale: float | None = None,
        return_lse: bool = False,
        return_info: bool = False,
        lengths: torch.Tensor | None = None,
    ) -> Any:
        check_inputs(self.pattern, q, k, v, gates, token_types, layer=self.plan.layer)
        if self.plan.mode == RELEASE:
            return self._release(q, k, v, gates, token_types, scale, return_lse, return_info, lengths)
        if lengths is not None:
            raise InputError("lengths", f"None outside mode {RELEASE!r} (padding is the adapter's)", "a tensor")
        if self.pooler is not None and self.pooler.head_dim != q.shape[-1]:
            raise InputError("q", f"head dim {self.pooler.head_dim} (the compression MLP's)", q.shape[-1])
        for name, flag in (("return_lse", return_lse), ("return_info", return_info)):
            if not isinstance(flag, bool):
                raise InputError(name, "True or False", flag)
        scale = _check_scale(scale)
        collected: dict | None = {} if (return_lse or return_info) else None
        kwargs: dict[str, Any] = {} if collected is None else {"info": collected}
        if scale is not None and self.plan.backend == "reference":
            kwargs["scale"] = scale
        elif scale is not None:
            # 1/sqrt(D) is built into the flex and triton paths: fold the ratio into q.
            q = q * (scale * math.sqrt(q.shape[-1]))
        out = self._kernel(q, k, v, gates, token_types, self.pooler, **kwargs)
        if collected is None:
            return out
        info = self._info(collected, q, k, gates)
        return (out,) + ((info.stacked_lse(),) if return_lse else ()) + ((info,) if return_info else ())

    def _release(self, q, k, v, gates, token_types, scale, return_lse, return_info, lengths) -> torch.Tensor:
        """``videonsa_release`` mode: ``lengths [B]`` (optional) counts each row's real
        tokens, at its front; the rest is padding (zeros out). Every score is linear
        in q, so ``scale`` is folded into q on every backend."""
        for name, flag in (("return_lse", return_lse), ("return_info", return_info)):
            if flag is not False:
                raise InputError(name, f"False in mode {RELEASE!r} (no per-branch values are kept there)", flag)
        scale = _check_scale(scale)
        if scale is not None:
            q = q * (scale * math.sqrt(q.shape[-1]))
        if lengths is not None:
            batch, length = q.shape[0], q.shape[2]
            if not isinstance(lengths, torch.Tensor) or lengths.shape != (batch,) or lengths.dtype.is_floating_point \
                    or lengths.dtype == torch.bool:
                found = list(lengths.shape) if isinstance(lengths, torch.Tensor) else type(lengths).__name__
                raise InputError("lengths", f"an integer tensor [{batch}] (real tokens per row)", found)
            if bool(((lengths < 0) | (lengths > length)).any()):
                raise InputError("lengths", f"values in [0, {length}]", lengths.tolist())
        return self._kernel(q, k, v, gates, token_types, self.pooler, lengths=lengths)

    # -- decode -----------------------------------------------------------------------
    @property
    def decode_plan(self) -> BranchPlan:
        """How this backend serves :meth:`decode` (kernel, masks, notes)."""
        return decode_plan(self.plan)

    def decode_state(
        self,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        lengths: torch.Tensor,
        token_types: torch.Tensor | None = None,
        key_valid: torch.Tensor | None = None,
        *,
        capacity: int | None = None,
        queries: torch.Tensor | None = None,
    ) -> DecodeState:
        """The decode state of a cache ``k_cache, v_cache [B, Hkv, S, D]`` whose
        first ``lengths [B]`` slots hold each row's tokens so far (classes
        ``token_types [B, S]``, 0 text; real where ``key_valid [B, S]``,
        default all): which slots are real and vision, the slot map of each
        row's sparse sequence and its compressed tokens. ``capacity``: slots
        to allocate for (default ``S``; a static cache passes its size).
        ``queries [B, Hq, S, D]``: the cached tokens' queries, required for
        ``query_block`` selection (the current tile's scores are summed from
        them) and in ``videonsa_release`` mode (the last ``P`` of each row are
        kept: quirk Q6 reads their compression log-sum-exp)."""
        return start_state(self.pattern, k_cache, v_cache, lengths, token_types, key_valid, self.pooler, capacity,
                           queries, self.plan.options.ranking_dtype(), release=self.plan.mode == RELEASE)

    def decode(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        lengths: torch.Tensor,
        state: DecodeState,
        gates: torch.Tensor | None = None,
        token_types: torch.Tensor | None = None,
        *,
        scale: float | None = None,
        has_text: bool = True,
    ) -> torch.Tensor:
        """``attn.decode(q, k_cache, v_cache, lengths, state, gates=None,
        token_types=None) -> out [B, Hq, T, D]``: the ``T`` new queries ``q [B,
        Hq, T, D]`` against the cache ``k_cache, v_cache [B, Hkv, S, D]`` whose
        new keys are already written at slots ``lengths - T .. lengths - 1``
        (``lengths [B]`` a device tensor), gates ``[B, Hq, T, nb]``, classes
        ``token_types [B, T]`` of the new tokens (hybrid patterns). Each query
        gets the last row of the pattern on its row's real tokens up to it
        (:mod:`nsaflex.decoding`); ``state`` (:meth:`decode_state`) is
        extended with the new tokens. Batched over rows, heads and new tokens
        without host synchronisation except on the reference backend
        (:attr:`decode_plan` says which path runs); in ``videonsa_release`` mode
        on every backend, the batched release decode. ``has_text=False``
        promises that every new token is a vision token (hybrid patterns): the
        dense path of text queries is skipped (a vision token then costs only
        the sparse branches, not a pass over the whole cache)."""
        if not isinstance(has_text, bool):
            raise InputError("has_text", "True or False", has_text)
        scale = _check_scale(scale)
        if self.pooler is not None and isinstance(q, torch.Tensor) and self.pooler.head_dim != q.shape[-1]:
            raise InputError("q", f"head dim {self.pooler.head_dim} (the compression MLP's)", q.shape[-1])
        if self.plan.mode == RELEASE:  # every backend: the batched torch decode of the release numerics
            return decode_step(self.pattern, q, k_cache, v_cache, lengths, state, gates, token_types, scale=scale,
                               score_dtype=self.plan.options.ranking_dtype(), release=True)
        return self._decode_kernel(q, k_cache, v_cache, lengths, state, gates, token_types, self.pooler, scale=scale,
                                   has_text=has_text)

    def _info(self, collected: dict, q: torch.Tensor, k: torch.Tensor, gates: torch.Tensor | None) -> AttentionInfo:
        """The backend's collected values as an :class:`AttentionInfo`."""
        pattern = self.pattern
        blocks = collected.get("blocks")
        if blocks is not None and pattern.selection is not None:
            if blocks.dtype == torch.bool:  # the reference's [B, Hq, L, J]: one row per query head
                if pattern.selection.scoring == "group":
                    blocks = blocks[:, :: q.shape[1] // k.shape[1]]
                blocks = block_lists(blocks, pattern.selection.count)
            else:
                blocks = sorted_block_lists(blocks, pattern.selection.count)
        branches = tuple(pattern.branches) if not pattern.dense else ()
        return AttentionInfo(
            branches=branches,
            outputs=dict(collected.get("outputs", {})),
            lse=dict(collected.get("lse", {})),
            gates=resolve_gates(pattern, gates, q) if branches else None,
            selected_blocks=blocks,
            dense_output=collected.get("dense_output"),
            dense_lse=collected.get("dense_lse"),
            sparse_queries=collected["sparse_queries"],
        )

    def run_heads(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        gates: torch.Tensor | None = None,
        token_types: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Like ``forward`` on a subset of whole GQA groups: the pattern's
        ``model.query_heads``/``kv_heads`` are not enforced (sequence-parallel
        ranks each run some of the heads); everything else is checked."""
        check_inputs(self._any_heads_pattern, q, k, v, gates, token_types, layer=self.plan.layer)
        return self._kernel(q, k, v, gates, token_types, self.pooler)

    def extra_repr(self) -> str:
        return f"pattern={self.pattern.name!r}, backend={self.plan.backend!r}, branches={self.pattern.branches}"


def decode_plan(plan: Plan) -> BranchPlan:
    """How ``plan``'s backend serves decode steps (:meth:`CompiledAttention.decode`):
    the backend's batched entry in faithful mode; in ``videonsa_release`` mode
    the batched torch decode of the release numerics (:mod:`nsaflex.decoding`)."""
    if plan.mode == RELEASE:
        if plan.pattern.dense:
            return BranchPlan("decode", plan.backend, "torch SDPA over the cache", "real keys at or before the query's slot")
        return BranchPlan(
            "decode", plan.backend,
            "batched torch release decode (nsaflex.decoding): zeroed-key block means kept per row, the own block's "
            "partial mean gathered; P-slot scores over the misread lse; top-S blocks, window and dense pass gathered",
            "per-row lengths and counts (device tensors), no host synchronisation",
            {"rows": "batched", "new_tokens": "batched"},
            ("Q6: the lse the last row reads is recomputed each step from the last P queries kept in the state "
             "(decode_state needs the cached queries)",))
    return describe_decode(plan.backend, plan.pattern, plan.device)


def _build(plan: Plan):
    """The kernel of ``plan``: the backend's, or in release mode its release lowering."""
    if plan.mode == RELEASE:
        return build_release_kernel(plan.pattern, plan, plan.release)
    return get_backend(plan.backend).build(plan.pattern, plan)


def _check_scale(scale: Any) -> float | None:
    """``scale`` as a float: None, or a finite positive number."""
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise InputError("scale", "a finite positive float (or None for 1/sqrt(D))", scale)
    return float(scale)


def compile(
    pattern: Pattern | str | os.PathLike[str],
    backend: str = "auto",
    *,
    layer: int | None = None,
    device: str | None = None,
    head_dim: int | None = None,
    deterministic: bool = True,
    mode: str = "faithful",
    **options: Any,
) -> CompiledAttention:
    """Compile a pattern (object, file path or bundled name) into an attention module.

    ``backend``: ``reference``, ``flex``, ``triton`` or ``auto`` (the plan
    chooses for ``device``, default: CUDA when available). ``layer`` resolves
    the pattern's per-layer overrides for that decoder layer.
    ``deterministic=False`` allows atomic (faster, not bit-reproducible)
    gradient accumulation where a backend has it (Triton: the selection
    branch's dk and dv); the plan records the choice.
    ``options``: kernel and precision choices by name (``scoring_kernel``,
    ``score_dtype``, ``flex_mode``, ``flex_dynamic``; see
    :class:`nsaflex.plan.PlanOptions`), recorded in the plan.
    ``mode="videonsa_release"``: the released VideoNSA numerics
    (:mod:`nsaflex.reference_release`, lowered by :mod:`nsaflex.release_lowering`)
    on ``flex`` or ``reference`` (``auto``: flex on CUDA, the reference on CPU);
    its calls take ``lengths=`` for rows ending in padding.
    """
    if not isinstance(pattern, Pattern):
        pattern = load_pattern(pattern)
    if not isinstance(deterministic, bool):
        raise InputError("deterministic", "True or False", deterministic)
    plan = make_plan(pattern, backend, device, layer=layer, deterministic=deterministic, mode=mode, **options)
    return CompiledAttention(pattern, plan, head_dim)
