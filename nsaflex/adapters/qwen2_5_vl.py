"""Qwen2.5-VL adapter: a pattern's hybrid sparse attention inside a transformers model.

Usage::

    from nsaflex.adapters import qwen2_5_vl
    adapter = qwen2_5_vl.apply(model, "videonsa", backend="auto")
    out = model.generate(**inputs)            # prefill sparse, decode over the cache
    qwen2_5_vl.remove(model)                  # or: with qwen2_5_vl.applied(model, ...):

How it plugs in (transformers 5.x; 4.57 works the same way):

* The decoder's attention dispatches through transformers' ``AttentionInterface``
  (``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``). The adapter
  registers ``"nsaflex"`` there *and* in ``AttentionMaskInterface`` (without a
  mask function transformers skips mask creation for unknown implementations,
  silently dropping the padding mask), and sets ``_attn_implementation`` on the
  *text* config only, so the vision tower keeps its own attention. The mask
  function returns an :class:`NsaflexMask`: which keys are real (the 2-D padding
  mask) plus the mask the model's original implementation builds, built when a
  layer hands a call to that implementation.
* Token classes come from the model call: a forward pre-hook on
  ``Qwen2_5_VLModel`` reads ``mm_token_type_ids`` (0 text; image 1 and video 2
  are vision; any other value is refused) or, without them, the image / video
  token ids in ``input_ids``. The classes of cached tokens are kept on the
  transformers cache object, so decode steps know them.
* Gates: each decoder layer's ``self_attn`` gets the gate network of its
  (override-resolved) pattern, registered as ``self_attn.g_proj_1`` /
  ``self_attn.g_proj_2`` (``mlp``, VideoNSA's names and layout) or
  ``self_attn.g_proj`` (``linear``), so ``state_dict()`` saves them and
  ``load_state_dict`` / :func:`load_videonsa_gates` restore them. The gate reads
  the attention module's input hidden state (after ``input_layernorm``, the
  tensor q/k/v are projected from), captured by a forward pre-hook on
  ``self_attn``; VideoNSA computes its gates from the same tensor.
* Attention: per layer a :class:`~nsaflex.runtime.CompiledAttention`
  (``nsaflex.compile(pattern, backend, layer=i)``), registered as
  ``self_attn.nsaflex`` (it holds the compression MLP of ``pooling: mlp``).
  Dense layers (``layers: [{at: [...], dense: true}]``) and calls whose queries
  are all text (hybrid patterns) are handed to the model's original attention
  implementation with its original mask, so text-only inputs give exactly the
  unpatched model's output.

Model sizes. The pattern runs with the patched model's own heads, head dim,
hidden size and layer count (:func:`fit_pattern` replaces its ``model``
section), so the bundled patterns apply to every Qwen2.5-VL size; only a
constraint that cannot hold for the model (an override of a layer it does not
have, a head dim the backend does not serve) is refused.

Padding. A padded row gives, at its real tokens, exactly what the row without
padding gives (positions, blocks and windows count real tokens only; padding
queries output zeros). Rows are compacted to their real tokens (moved to the
front and run as one batch when trailing padding cannot change real tokens'
outputs, else one row at a time).

Decode. With a KV cache, a new query at position ``p`` gets what the pattern
gives the last row of ``[0, p]``: dense for text queries of a hybrid pattern
(a call whose new queries are all text is handed to the original
implementation, as fast as the unpatched model), the sparse branches over the
cached keys otherwise, with compressed tokens kept and extended as blocks
complete. On the flex and triton backends (``faithful`` mode, ``granularity:
token`` or ``query_block``) the step goes through the compiled attention's
batched decode entry (:meth:`~nsaflex.runtime.CompiledAttention.decode`: all
rows, heads and new tokens at once, state on the device); the reference
backend and ``query_block`` tiles of ``vision_keys: all`` patterns (their text
calls bypass the entry) take the exact per-row path of
:mod:`nsaflex.adapters.decode`. :meth:`Qwen25VLAdapter.describe` names each
layer's path. Beam search reorders the KV cache (the batched states follow
through the cache's ``reorder_cache``) but not the token classes kept with it:
it is exact when all beams of a prompt share their token classes (generated
tokens are text).

``mode="videonsa_release"`` runs :mod:`nsaflex.reference_release` (the
released VideoNSA code's numerics): prefill on FlexAttention
(:mod:`nsaflex.release_lowering`; ``auto`` on CUDA) or the float64 reference
(``auto`` on CPU); decode through the batched release entry of
:mod:`nsaflex.decoding` (``release=True``) off the reference backend, on its
exact path there (:func:`~nsaflex.adapters.decode.takes_batched_release`).

Where the adapter lives. Everything it adds is on the model's own modules: the
handle on ``Qwen2_5_VLModel`` and its text model (``_nsaflex_adapter``), each
layer's state on its ``self_attn`` (``_nsaflex_layer``), the gates and compiled
attention as submodules, and forward hooks that are module-level functions
reading those attributes. So ``copy.deepcopy(model)``, ``pickle`` and
``torch.save(model)`` carry a working adapter of their own (see
:meth:`Qwen25VLAdapter.__deepcopy__`), and a handle acts on the model only
while it is the model's adapter (:meth:`Qwen25VLAdapter.remove`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import re
import sys
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn
from torch.profiler import record_function

from nsaflex import tensor_memo
from nsaflex.adapters.decode import (
    DecodeError,
    LayerDecodeCache,
    decode_attention,
    real_positions,
    record_delegated_queries,
    stash_release_queries,
    stash_tile_queries,
)
from nsaflex.decoding import extend_state, tiled
from nsaflex.decoding import unsupported as batched_decode_unsupported
from nsaflex.distributed import SequenceParallelAttention
from nsaflex.errors import InputError, PatternError
from nsaflex.gates import GateNetwork, gate_for_pattern
from nsaflex.hybrid import sparse_layout
from nsaflex.inputs import check_token_values
from nsaflex.loader import load_pattern
from nsaflex.recorder import Recording
from nsaflex.reference_release import check_release_pattern, padded_slots
from nsaflex.release_lowering import release_backend
from nsaflex.runtime import CompiledAttention, compile as compile_pattern
from nsaflex.spec import Model, Pattern
from nsaflex.tensor_memo import remembered

ATTN_NAME = "nsaflex"
MODES = ("faithful", "videonsa_release")
_TOKEN_TYPES = "0 (text), 1 (image) or 2 (video)"  # the values of mm_token_type_ids

# Profiler ranges (torch.profiler.record_function; no cost without a profiler)
# that benchmarks/model_bench.py reads for its per-stage breakdown.
STAGE_GATES = "nsaflex.gates"  # the gate network on the attention input
STAGE_ATTENTION = "nsaflex.attention"  # the compiled pattern: token-class packing, kernels, the text path
STAGE_TEXT_PATH = "nsaflex.text_path"  # calls handed to the model's original attention (all-text queries, dense layers)

# Where the adapter's state lives on the patched modules.
_ADAPTER_ATTRIBUTE = "_nsaflex_adapter"  # on Qwen2_5_VLModel and its text model
_LAYER_ATTRIBUTE = "_nsaflex_layer"  # on each decoder layer's self_attn


class AdapterError(InputError):
    """A model, input or checkpoint the adapter cannot take. The message names
    what was wrong, what was expected and what was found (as InputError's)."""

    @property
    def what(self) -> str:
        return self.argument


class StaleAdapterWarning(UserWarning):
    """``remove()`` through a handle that is no longer the model's adapter: the
    model has been patched again since, and that adapter is left in place."""


class NsaflexMask:
    """What the registered mask function hands the attention: ``valid``
    ``[B, S]`` bool (True = real token; ``None`` = no padding) and, through
    :meth:`original`, the mask the model's original implementation builds.

    The original mask is built on first use, once per implementation, from the
    mask call's arguments: the mask function cannot tell which model calls it
    (transformers hands it only the config), the attention module can."""

    __slots__ = ("valid", "_given", "_arguments", "_built")

    def __init__(
        self,
        valid: torch.Tensor | None,
        original: Any = None,
        *,
        arguments: tuple[tuple, dict[str, Any]] | None = None,
    ) -> None:
        self.valid = valid
        self._given = original
        self._arguments = arguments  # (args, kwargs) of the mask call; None: ``original`` is given
        self._built: dict[str | None, Any] = {}

    def original(self, implementation: str | None) -> Any:
        """The mask ``implementation``'s mask function builds for this call (the
        given one when the mask was not built by the registered function)."""
        if self._arguments is None:
            return self._given
        if implementation not in self._built:
            from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

            try:
                function = ALL_MASK_ATTENTION_FUNCTIONS[implementation]
            except KeyError:
                function = None
            args, kwargs = self._arguments
            self._built[implementation] = None if function is None else function(*args, **kwargs)
        return self._built[implementation]


# --- transformers interfaces and hooks -----------------------------------------------------

_REGISTERED = False


def _register_interfaces() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, _attention_entry)
    AttentionMaskInterface.register(ATTN_NAME, _mask_entry)
    _REGISTERED = True


def _mask_entry(*args: Any, **kwargs: Any) -> NsaflexMask:
    mask_function = kwargs.get("mask_function")
    name = getattr(mask_function, "__name__", None)
    if mask_function is not None and name != "causal_mask_function":
        raise AdapterError(
            "attention mask",
            "the plain causal mask (nsaflex builds the pattern's masks itself)",
            f"a custom or packed-sequence mask function ({name or type(mask_function).__name__}); "
            "pass an attention_mask instead of packed position_ids",
        )
    attention_mask = kwargs.get("attention_mask")
    valid = None
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 and not _all_real(attention_mask):
        valid = attention_mask.to(torch.bool)
    return NsaflexMask(valid, arguments=(args, kwargs))


def _all_real(attention_mask: torch.Tensor) -> bool:
    """Whether a padding mask marks every token real: read once per mask
    tensor (the adapter asks when the text model is called, the mask function
    again inside it)."""
    return remembered(attention_mask, "every token real", lambda: bool(attention_mask.to(torch.bool).all()))


def _attention_entry(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    **kwargs: Any,
):
    layer = getattr(module, _LAYER_ATTRIBUTE, None)
    if layer is None:
        raise AdapterError(
            "attention module",
            "a decoder attention of a model patched with nsaflex.adapters.qwen2_5_vl.apply",
            f"{type(module).__name__} without an adapter, under a config whose _attn_implementation is {ATTN_NAME!r}",
        )
    return layer.adapter._attend(layer, module, query, key, value, attention_mask, dropout, scaling, sliding_window, kwargs)


# The hooks are module-level functions reading the adapter off the module they
# run on, so copies and pickles of a patched model reach their own adapter.


def _model_call_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    getattr(module, _ADAPTER_ATTRIBUTE)._on_model_call(args, kwargs)


def _text_call_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    getattr(module, _ADAPTER_ATTRIBUTE)._on_text_call(args, kwargs)


def _after_text_call_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    getattr(module, _ADAPTER_ATTRIBUTE)._after_text_call(output)


def _capture_hidden_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """The attention's input hidden state, which the layer's gates read."""
    getattr(module, _LAYER_ATTRIBUTE).hidden = args[0] if args else kwargs.get("hidden_states")


# --- per-call state ----------------------------------------------------------------------


@dataclass
class _CacheState:
    """Kept on the transformers cache object between calls."""

    types: torch.Tensor | None
    decode: dict[int, LayerDecodeCache]


@dataclass
class _CallState:
    types: torch.Tensor | None = None  # [B, past + q_len] 0 text / 1 vision, or None if unknown
    past: int = 0
    batch: int = 0
    q_len: int = 0
    decode: dict[int, LayerDecodeCache] = field(default_factory=dict)
    cache: Any = None


@dataclass
class _Layer:
    index: int
    adapter: "Qwen25VLAdapter"
    attention: nn.Module  # the model's self_attn
    pattern: Pattern  # resolved for this layer
    compiled: CompiledAttention | None
    gate: GateNetwork | None
    hidden: torch.Tensor | None = None
    added: tuple[str, ...] = ()

    @property
    def dense(self) -> bool:
        return self.pattern.dense

    def __getstate__(self) -> dict[str, Any]:
        # The captured hidden state belongs to a forward in flight, not to the layer.
        return {**self.__dict__, "hidden": None}


def _token_classes(input_ids: Any, mm_token_type_ids: Any, config: Any) -> torch.Tensor | None:
    """``[B, q]`` long, 1 for vision tokens, from ``mm_token_type_ids`` (0 text,
    1 image, 2 video; any other value raises :class:`AdapterError` naming the
    values found) or the image / video token ids in ``input_ids``."""
    if isinstance(mm_token_type_ids, torch.Tensor):
        if mm_token_type_ids.is_floating_point() or mm_token_type_ids.is_complex():
            raise AdapterError("mm_token_type_ids", f"an integer tensor of {_TOKEN_TYPES}", str(mm_token_type_ids.dtype))
        unknown = (mm_token_type_ids < 0) | (mm_token_type_ids > 2)
        if bool(unknown.any()):
            values = torch.unique(mm_token_type_ids[unknown]).tolist()
            raise AdapterError("mm_token_type_ids", f"{_TOKEN_TYPES} at every position", f"values {values}")
        return (mm_token_type_ids != 0).long()
    if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2:
        vision = torch.zeros_like(input_ids, dtype=torch.bool)
        for name in ("image_token_id", "video_token_id"):
            token = getattr(config, name, None)
            if token is not None:
                vision |= input_ids == token
        return vision.long()
    return None


def _cache_length(cache: Any) -> int:
    if cache is None:
        return 0
    length = cache.get_seq_length()
    return int(length.item() if isinstance(length, torch.Tensor) else length)


def _find_cache(output: Any) -> Any:
    for name in ("cache", "past_key_values"):
        try:
            value = getattr(output, name)
        except (AttributeError, KeyError):
            continue
        if value is not None and hasattr(value, "get_seq_length"):
            return value
    if isinstance(output, tuple):
        for item in output:
            if hasattr(item, "get_seq_length"):
                return item
    return None


# --- the adapter -----------------------------------------------------------------------------


class Qwen25VLAdapter:
    """The handle :func:`apply` returns: the per-layer patterns, gates and
    attention modules, and :meth:`remove`.

    The handle acts on the model only while it is the model's adapter
    (:attr:`active`): from :func:`apply` until :meth:`remove`. A copy of the
    model (``copy.deepcopy``, ``pickle``, ``torch.save``) carries its own
    adapter over the copied modules, which :func:`get_adapter` returns; the two
    are independent."""

    def __init__(
        self,
        model: nn.Module,
        base: nn.Module,
        text_model: nn.Module,
        pattern: Pattern,
        backend: str,
        mode: str,
        layers: list[_Layer],
        module_names: dict[int, str],
    ) -> None:
        self.model = model
        self.base = base
        self.text_model = text_model
        self.config = text_model.config
        self.pattern = pattern
        self.backend = backend
        self.mode = mode
        self.layers = layers
        self.module_names = module_names  # layer index -> qualified name of its self_attn
        # Sequence parallelism: each rank holds a contiguous shard of every sequence.
        self.process_group: Any = None
        self._dense_sharded: CompiledAttention | None = None
        self.original_impl: str | None = None
        self._hooks: list[Any] = []
        self._pending: torch.Tensor | None = None
        self._call = _CallState()
        self._recording: Recording | None = None

    # -- copies ------------------------------------------------------------------------
    def _lasting_state(self) -> dict[str, Any]:
        """The attributes without the state of a forward in flight (token
        classes waiting for the text model, the current call)."""
        return {**self.__dict__, "_pending": None, "_call": _CallState(), "_recording": None}

    def __deepcopy__(self, memo: dict[int, Any]) -> "Qwen25VLAdapter":
        """``copy.deepcopy`` of the patched model reaches the adapter through the
        modules it patched: the copy is an adapter over the copied modules (the
        memo maps them), its gates and compiled attention the copied
        submodules. A sequence-parallel process group is shared, not copied:
        it names the processes, which the copy runs in too."""
        if self.process_group is not None:
            memo[id(self.process_group)] = self.process_group
        twin = type(self).__new__(type(self))
        memo[id(self)] = twin
        twin.__dict__.update(copy.deepcopy(self._lasting_state(), memo))
        return twin

    def __getstate__(self) -> dict[str, Any]:
        """What ``pickle`` / ``torch.save`` of the patched model keep of the adapter."""
        if self.process_group is not None:
            raise AdapterError(
                "process_group",
                "None to pickle a patched model (a process group does not travel between processes: "
                "remove() the adapter, save the model, and apply it again with the loading process's group)",
                type(self.process_group).__name__,
            )
        return self._lasting_state()

    # -- recording -------------------------------------------------------------------
    @contextlib.contextmanager
    def record(self) -> Iterator[Recording]:
        """``with adapter.record() as rec: model(**inputs)``: per layer and head,
        the mean gate of each branch over text and vision tokens, each branch's
        attention-sink mass and the selection-block histogram
        (:mod:`nsaflex.recorder`) of the prefill calls made inside.

        Recorded: faithful-mode prefills of unpadded rows (a padded batch or a
        release-mode call raises an AdapterError); dense layers, decode steps
        and hybrid calls with no vision query (the original attention) add
        nothing. Each recorded layer runs its pattern with ``return_info``
        (slower: meant for analysis)."""
        if self.mode != "faithful":
            raise AdapterError("recording", "an adapter applied in mode 'faithful'", self.mode)
        if self._recording is not None:
            raise AdapterError("recording", "one recording at a time", "a record() block already open")
        self._recording = Recording()
        try:
            yield self._recording
        finally:
            self._recording = None

    def _record(self, layer: "_Layer", q, k, v, gates, hybrid_types) -> torch.Tensor:
        """The prefill of ``layer`` with its info added to the open recording."""
        assert self._recording is not None and layer.compiled is not None
        out, info = layer.compiled(q, k, v, gates, hybrid_types, return_info=True)
        types = self._call.types
        if types is None or tuple(types.shape) != (q.shape[0], q.shape[2]):
            types = hybrid_types
        self._recording.add(layer.index, layer.pattern, q, k, info, types, layer.compiled.pooler)
        return out

    # -- properties ------------------------------------------------------------------
    @property
    def active(self) -> bool:
        """Whether this handle is the model's adapter (applied, not removed since)."""
        return getattr(self.base, _ADAPTER_ATTRIBUTE, None) is self

    @property
    def needs_token_classes(self) -> bool:
        return self.mode == "videonsa_release" or self.pattern.hybrid is not None

    @property
    def compute_dtype(self) -> torch.dtype:
        """Dtype of the decode path: float64 on the reference backend, else float32."""
        return torch.float64 if self.backend == "reference" else torch.float32

    def gate_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters the adapter added (gates and compression MLPs)."""
        for layer in self.layers:
            for name in layer.added:
                yield from getattr(layer.attention, name).parameters()

    def describe(self) -> list[dict[str, Any]]:
        """One entry per layer: what runs there."""
        rows = []
        for layer in self.layers:
            rows.append(
                {
                    "layer": layer.index,
                    "dense": layer.dense,
                    "branches": list(layer.pattern.branches),
                    "backend": "original" if layer.dense else (layer.compiled.backend if layer.compiled else "reference"),
                    "gate": layer.gate.kind if layer.gate is not None else None,
                    "mode": self.mode,
                    "decode": self.decode_path(layer),
                }
            )
        return rows

    # -- installing -------------------------------------------------------------------
    def _install(self) -> None:
        self.original_impl = self.config._attn_implementation
        self._hooks.append(self.base.register_forward_pre_hook(_model_call_hook, with_kwargs=True))
        self._hooks.append(self.text_model.register_forward_pre_hook(_text_call_hook, with_kwargs=True))
        self._hooks.append(self.text_model.register_forward_hook(_after_text_call_hook, with_kwargs=True))
        for layer in self.layers:
            self._hooks.append(layer.attention.register_forward_pre_hook(_capture_hidden_hook, with_kwargs=True))
            added = []
            if layer.gate is not None:
                for name, linear in layer.gate.linears().items():
                    layer.attention.add_module(name, linear)
                    added.append(name)
            if layer.compiled is not None:
                layer.attention.add_module(ATTN_NAME, layer.compiled)
                added.append(ATTN_NAME)
            layer.added = tuple(added)
            setattr(layer.attention, _LAYER_ATTRIBUTE, layer)
        setattr(self.text_model, _ADAPTER_ATTRIBUTE, self)
        setattr(self.base, _ADAPTER_ATTRIBUTE, self)
        self.config._attn_implementation = ATTN_NAME

    def remove(self) -> None:
        """Undo :func:`apply`: the model is as it was (the gate networks stay
        available on this handle's layers).

        Acts only while this handle is the model's adapter. Once it is not, it
        leaves the model alone: a second ``remove()`` does nothing (as for
        torch's hook handles), and if the model has been patched again since
        (``remove(model)`` then ``apply(model, ...)``), the newer adapter stays
        and :class:`StaleAdapterWarning` says so. It warns rather than raises
        because a stale ``remove()`` typically runs in cleanup code (the exit
        of :func:`applied`), where an exception would hide the one being handled."""
        if not self.active:
            current = getattr(self.base, _ADAPTER_ATTRIBUTE, None)
            if current is not None:
                warnings.warn(
                    "nsaflex.adapters.qwen2_5_vl: remove() through a handle that is no longer the model's adapter "
                    "(the model was patched again after this adapter was removed); the model's current adapter "
                    "is left as it is (remove it with qwen2_5_vl.remove(model) or through its own handle)",
                    StaleAdapterWarning,
                    stacklevel=2,
                )
            return
        self._uninstall()

    def _uninstall(self) -> None:
        """Take out whatever this adapter installed (also after a partial install)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        for layer in self.layers:
            for name in layer.added:
                layer.attention._modules.pop(name, None)
            layer.added = ()
            layer.hidden = None
            if vars(layer.attention).get(_LAYER_ATTRIBUTE) is layer:
                delattr(layer.attention, _LAYER_ATTRIBUTE)
        for module in (self.base, self.text_model):
            if vars(module).get(_ADAPTER_ATTRIBUTE) is self:
                delattr(module, _ADAPTER_ATTRIBUTE)
        if self.original_impl is not None and self.config._attn_implementation == ATTN_NAME:
            self.config._attn_implementation = self.original_impl
        self._call = _CallState()
        self._pending = None

    # -- hooks ------------------------------------------------------------------------
    def _on_model_call(self, args: tuple, kwargs: dict) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        self._pending = _token_classes(input_ids, kwargs.get("mm_token_type_ids"), self.base.config)

    def _on_text_call(self, args: tuple, kwargs: dict) -> None:
        embeds = kwargs.get("inputs_embeds")
        ids = kwargs.get("input_ids", args[0] if args else None)
        reference = embeds if isinstance(embeds, torch.Tensor) else ids
        if not isinstance(reference, torch.Tensor):
            self._pending, self._call = None, _CallState()
            return  # the model itself refuses the call
        batch, q_len = int(reference.shape[0]), int(reference.shape[1])
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = _cache_length(cache)
        stored = getattr(cache, "_nsaflex_state", None) if cache is not None else None
        if not isinstance(stored, _CacheState):
            stored = None
        pending, self._pending = self._pending, None
        types = None
        if pending is not None:
            if pending.shape == (batch, past + q_len):
                types = pending
            elif pending.shape == (batch, q_len):
                if past == 0:
                    types = pending
                elif stored is not None and stored.types is not None and stored.types.shape == (batch, past):
                    types = torch.cat([stored.types.to(pending.device), pending], dim=1)
            else:
                raise AdapterError(
                    "mm_token_type_ids",
                    f"shape [{batch}, {q_len}] (this call's tokens) or [{batch}, {past + q_len}] (cached and new)",
                    list(pending.shape),
                )
        decode = stored.decode if (stored is not None and past > 0) else {}
        self._call = _CallState(types=types, past=past, batch=batch, q_len=q_len, decode=decode, cache=cache)
        if past == 0 and types is not None:
            self._read_token_facts(types, kwargs.get("attention_mask"))

    def _read_token_facts(self, types: torch.Tensor, attention_mask: Any) -> None:
        """Read now what the layers of an unpadded faithful-mode prefill read off
        its token classes (that they are valid, whether any query is vision, each
        sparse layout with its runs and text rows), before the first layer's work
        is queued: each read waits for the GPU's queue, which here holds no more
        than the model call's own first read of its token classes waits for
        already, where inside a layer it holds the layer's projections (and the
        GPU then idles while the host queues the rest). The layers find these
        facts remembered (:mod:`nsaflex.tensor_memo`). GPU tensors only (reading
        a CPU tensor costs no wait)."""
        if self.mode != "faithful" or self.process_group is not None or not tensor_memo.cacheable(types):
            return
        if isinstance(attention_mask, torch.Tensor) and not _all_real(attention_mask):
            return  # padded rows run on reordered token classes of their own
        # A layout depends on the pattern's hybrid section only (sparse_layout's key).
        patterns = {layer.pattern.hybrid: layer.pattern for layer in self.layers
                    if layer.compiled is not None and layer.pattern.hybrid is not None}
        batch, length = types.shape
        if not patterns or not _any_vision(types, 0, length):
            return
        check_token_values(types)
        for pattern in patterns.values():
            sparse_layout(pattern, types, batch, length, types.device).read_host_facts()

    def _after_text_call(self, output: Any) -> None:
        call = self._call
        cache = _find_cache(output)
        if cache is None:
            cache = call.cache
        # The call is over: its caller decides how long the cache lives, and the decode
        # states live with the cache.
        decode, call.cache, call.decode = call.decode, None, {}
        if cache is None or _cache_length(cache) != call.past + call.q_len:
            return
        object.__setattr__(cache, "_nsaflex_state", _CacheState(call.types, decode))
        _follow_cache_rows(cache)

    # -- attention --------------------------------------------------------------------
    def _original_function(self, module: nn.Module):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward")
        if self.original_impl in (None, "eager"):
            return eager
        return ALL_ATTENTION_FUNCTIONS[self.original_impl]

    def _attend(self, layer, module, query, key, value, attention_mask, dropout, scaling, sliding_window, kwargs):
        batch, heads, q_len, dim = query.shape
        kv_len = key.shape[2]
        if isinstance(attention_mask, NsaflexMask):
            mask = attention_mask
        else:
            mask = NsaflexMask(_valid_from_mask(attention_mask, batch, kv_len), attention_mask)

        def delegate():
            with record_function(STAGE_TEXT_PATH):
                return self._original_function(module)(
                    module, query, key, value, mask.original(self.original_impl),
                    dropout=dropout, scaling=scaling, sliding_window=sliding_window, **kwargs,
                )

        hidden, layer.hidden = layer.hidden, None
        if self.process_group is not None:
            return self._attend_sharded(layer, query, key, value, mask, hidden, dropout, scaling)
        if layer.dense:
            return delegate()
        if scaling is not None and abs(scaling * dim**0.5 - 1.0) > 1e-6:
            raise AdapterError("attention scaling", f"1/sqrt(head_dim) = {dim ** -0.5:.6g}", scaling)
        if sliding_window is not None:
            raise AdapterError("sliding_window", "None (nsaflex patterns replace the model's sliding window)", sliding_window)
        call = self._call
        past = call.past
        if call.batch != batch or call.q_len != q_len or past + q_len > kv_len:
            past = kv_len - q_len
        total = past + q_len
        types = call.types
        if self.needs_token_classes:
            if types is None or tuple(types.shape) != (batch, total):
                found = "none" if types is None else f"classes for {list(types.shape)}"
                raise AdapterError(
                    "token classes",
                    f"classes of {batch} x {total} tokens from mm_token_type_ids or input_ids "
                    "(call the Qwen2.5-VL model with input_ids or mm_token_type_ids; keep the cache it returned)",
                    found,
                )
            types = types.to(query.device)
        valid = mask.valid
        if valid is not None:
            valid = valid.to(query.device)
            if valid.shape[1] < total:
                valid = torch.cat([valid, valid.new_ones(batch, total - valid.shape[1])], dim=1)
            valid = valid[:, :total]
            if bool(valid.all()):
                valid = None
        # Hybrid patterns: text queries are dense; if every query of the call is
        # text, the original implementation computes exactly that.
        if self.mode == "faithful" and layer.pattern.hybrid is not None:
            if valid is None:
                any_vision = _any_vision(types, past, total)
            else:
                any_vision = bool(((types[:, past:total] == 1) & valid[:, past:total]).any())
            if not any_vision:
                self._keep_tile_queries(layer, query, types, valid, past)
                return delegate()
        if dropout:
            raise AdapterError("attention dropout", "0 (nsaflex attention has no dropout)", dropout)
        if hidden is None or tuple(hidden.shape[:2]) != (batch, q_len):
            raise AdapterError("hidden state", f"the attention input [{batch}, {q_len}, hidden] captured for the gates", "none")
        with record_function(STAGE_GATES):
            gates = layer.gate(hidden) if layer.gate is not None else None
        key, value = key[:, :, :total], value[:, :, :total]
        with record_function(STAGE_ATTENTION):
            if past == 0:
                if self.mode == "faithful":
                    out = self._prefill(layer, query, key, value, gates, types, valid)
                else:
                    out = self._prefill_release(layer, query, key, value, gates, types, valid)
            else:
                try:
                    out = self._decode(layer, query, key, value, gates, types, valid, past)
                except DecodeError as error:
                    raise AdapterError("decode state", "state kept from the prefill of this cache", str(error)) from None
        return out.to(query.dtype).transpose(1, 2).contiguous(), None

    def _attend_sharded(self, layer, query, key, value, mask, hidden, dropout, scaling):
        """Sequence-parallel prefill/training: this rank holds one contiguous shard
        of every sequence; :class:`~nsaflex.distributed.SequenceParallelAttention`
        exchanges heads for sequence. Every rank must take the same path (the
        exchange is collective), so nothing here depends on the shard's content:
        dense layers run a dense causal pattern sharded, all others the layer's
        compiled pattern (whose text queries are dense anyway)."""
        batch, _, q_len, dim = query.shape
        if key.shape[2] != q_len or (mask.valid is not None and not bool(mask.valid.all())):
            raise AdapterError(
                "sequence-parallel call",
                "a prefill or training step over whole, unpadded sequences (each rank one shard, no cache)",
                "a decode step over a cache" if key.shape[2] != q_len else "a padding mask",
            )
        if dropout:
            raise AdapterError("attention dropout", "0 (nsaflex attention has no dropout)", dropout)
        if scaling is not None and abs(scaling * dim**0.5 - 1.0) > 1e-6:
            raise AdapterError("attention scaling", f"1/sqrt(head_dim) = {dim ** -0.5:.6g}", scaling)
        if layer.compiled is None:
            if self._dense_sharded is None:
                dense = Pattern(name="dense", dense=True)
                self._dense_sharded = compile_pattern(dense, "auto", device=query.device.type)
            out = SequenceParallelAttention(self._dense_sharded, self.process_group)(query, key, value)
            return out.to(query.dtype).transpose(1, 2).contiguous(), None
        types = None
        if layer.pattern.hybrid is not None:
            types = self._call.types
            if types is None or tuple(types.shape) != (batch, q_len):
                raise AdapterError("token classes", f"classes of the {batch} x {q_len} tokens of this shard", "none")
            types = types.to(query.device)
        if hidden is None or tuple(hidden.shape[:2]) != (batch, q_len):
            raise AdapterError("hidden state", f"the attention input [{batch}, {q_len}, hidden] captured for the gates", "none")
        gates = layer.gate(hidden) if layer.gate is not None else None
        out = SequenceParallelAttention(layer.compiled, self.process_group)(query, key, value, gates, types)
        return out.to(query.dtype).transpose(1, 2).contiguous(), None

    def _keep_tile_queries(self, layer, query, types, valid, past):
        """Text queries handed to the original attention still count toward a
        ``query_block`` tile of a ``vision_keys: all`` pattern: keep them."""
        pattern = layer.pattern
        selection = pattern.selection
        if selection is None or selection.granularity != "query_block" or pattern.hybrid.vision_keys != "all":
            return
        cache = self._call.decode.setdefault(layer.index, LayerDecodeCache())
        if past == 0:
            for b in range(query.shape[0]):
                positions = _sparse_positions(pattern, valid, types, b, query.shape[2], query.device)
                stash_tile_queries(pattern, cache.row(b), query[b][:, positions])
        else:
            record_delegated_queries(pattern, cache, query, valid, past)

    def _prefill(self, layer, q, k, v, gates, types, valid):
        pattern = layer.pattern
        attn = layer.compiled
        hybrid_types = types if pattern.hybrid is not None else None
        batch, _, length, _ = q.shape
        recording = getattr(self, "_recording", None)
        if valid is None and recording is not None:
            out = self._record(layer, q, k, v, gates, hybrid_types)
        elif valid is None:
            out = attn(q, k, v, gates, hybrid_types)
        elif recording is not None:
            raise AdapterError("recording", "a batch without padding (attention_mask all ones)", "padded rows")
        elif _trailing_padding_safe(pattern):
            # Real tokens first, in order; padding at the end, as text.
            order = torch.argsort((~valid).to(torch.uint8), dim=1, stable=True)
            rows = torch.arange(batch, device=q.device)[:, None]

            def gather(x):
                # Indexing, not gather: the backward keeps the order, not x.
                return None if x is None else x.transpose(1, 2)[rows, order].transpose(1, 2)

            sorted_valid = valid.gather(1, order)
            sorted_types = None
            if hybrid_types is not None:
                sorted_types = hybrid_types.gather(1, order) * sorted_valid
            result = attn(gather(q), gather(k), gather(v), gather(gates), sorted_types)
            # Each output back at its token, padding queries zero, laid out [B, L, H, D]
            # as the output projection reads it.
            placed = result.new_zeros(batch, length, result.shape[1], result.shape[3])
            placed[rows, order] = torch.where(sorted_valid[:, :, None, None], result.transpose(1, 2), 0.0)
            out = placed.transpose(1, 2)
        else:
            rows = []
            for b in range(batch):
                real = torch.nonzero(valid[b]).flatten()
                row_types = None if hybrid_types is None else hybrid_types[b : b + 1, real]
                row_gates = None if gates is None else gates[b : b + 1, :, real]
                result = attn(q[b : b + 1, :, real], k[b : b + 1, :, real], v[b : b + 1, :, real], row_gates, row_types)
                rows.append(torch.zeros_like(q[b]).index_copy(1, real, result[0].to(q.dtype)))
            out = torch.stack(rows)
        selection = pattern.selection
        if selection is not None and selection.granularity == "query_block":
            cache = self._call.decode.setdefault(layer.index, LayerDecodeCache())
            for b in range(batch):
                positions = _sparse_positions(pattern, valid, types, b, length, q.device)
                stash_tile_queries(pattern, cache.row(b), q[b][:, positions])
        return out

    def _prefill_release(self, layer, q, k, v, gates, types, valid):
        """The layer's release-mode attention (its compiled ``videonsa_release``
        plan) on the real tokens of each row, moved to the front in order: the
        ``lengths`` of the call keep padding out of every block and count."""
        if getattr(self, "_recording", None) is not None:
            raise AdapterError("recording", "an adapter applied in mode 'faithful'", self.mode)
        batch, heads, length, _ = q.shape
        slots = padded_slots(heads, k.shape[1])
        cache = self._call.decode.setdefault(layer.index, LayerDecodeCache())
        if valid is None:
            out = layer.compiled(q, k, v, gates, types)
        else:
            order = torch.argsort((~valid).to(torch.uint8), dim=1, stable=True)
            index = order[:, None, :, None]

            def gather(x):
                return None if x is None else x.gather(2, index.expand(-1, x.shape[1], -1, x.shape[3]))

            lengths = valid.sum(dim=1)
            result = layer.compiled(gather(q), gather(k), gather(v), gather(gates), types.gather(1, order) * valid.gather(1, order),
                                    lengths=lengths)
            out = torch.zeros_like(result).scatter(2, index.expand_as(result), result)
        for b in range(batch):
            real = torch.arange(length, device=q.device) if valid is None else torch.nonzero(valid[b]).flatten()
            stash_release_queries(cache.row(b), q[b][:, real], slots)
        return out

    def decode_path(self, layer: "_Layer") -> str:
        """Which path decode steps of ``layer`` take, and why."""
        if layer.dense:
            return "original attention (dense layer)"
        if self.mode != "faithful":
            if layer.compiled is None or layer.compiled.backend == "reference":
                return "exact per-row (videonsa_release numerics, float64, nsaflex.adapters.decode)"
            return f"batched release decode ({layer.compiled.backend}, nsaflex.decoding)"
        if layer.compiled is None or layer.compiled.backend == "reference":
            return "exact per-row (reference backend, float64, nsaflex.adapters.decode)"
        reason = _batched_unsupported(layer.pattern)
        if reason is not None:
            return f"exact per-row (nsaflex.adapters.decode): {reason}"
        return f"batched decode entry ({layer.compiled.backend}, nsaflex.decoding)"

    def _decode(self, layer, q, k, v, gates, types, valid, past):
        cache = self._call.decode.setdefault(layer.index, LayerDecodeCache())
        batched = (self.mode == "faithful" and layer.compiled is not None and layer.compiled.backend != "reference"
                   and _batched_unsupported(layer.pattern) is None)
        # A padded new token (a chunk fed with padding) has no place in the batched state's appended slots.
        if batched and (valid is None or bool(valid[:, past:].all())):
            return self._decode_batched(layer, cache, q, k, v, gates, types, valid, past)
        return decode_attention(
            layer.pattern, q, k, v, gates, types, valid, past, cache,
            release=self.mode == "videonsa_release",
            pooler=layer.compiled.pooler if layer.compiled is not None else None,
            dtype=self.compute_dtype,
        )

    def _decode_batched(self, layer, cache: LayerDecodeCache, q, k, v, gates, types, valid, past):
        """The new queries through ``layer.compiled.decode``. The state covers the
        cache's first ``cache.state_length`` slots: built from the cache the
        first time (or when the cache was cut back or its batch changed),
        extended by the tokens handed to the original attention since (the
        all-text calls of a hybrid pattern), then extended by the step itself."""
        attn = layer.compiled
        batch, new = q.shape[0], q.shape[2]
        hybrid = layer.pattern.hybrid is not None
        state = cache.state
        lengths = torch.full((batch,), past, dtype=torch.long, device=q.device)
        if state is None or state.batch != batch or cache.state_length > past:
            queries = self._tile_queries(layer, cache, q, types, valid, past) if tiled(layer.pattern) else None
            state = attn.decode_state(
                k[:, :, :past], v[:, :, :past], lengths,
                None if types is None else types[:, :past], None if valid is None else valid[:, :past],
                queries=queries,
            )
        elif cache.state_length < past:
            start = cache.state_length
            extend_state(
                state, layer.pattern, k[:, :, :past], v[:, :, :past], lengths, past - start,
                None if types is None else types[:, start:past], attn.pooler,
                new_real=None if valid is None else valid[:, start:past],
            )
        cache.state, cache.state_length = state, past
        has_text = True
        if hybrid:
            # Read once per call, not once per layer (as the vision check in _attend).
            total = past + new
            has_text = remembered(types, ("text queries in", past, total), lambda: bool((types[:, past:total] == 0).any()))
        out = attn.decode(q, k, v, lengths + new, state, gates, types[:, past:] if hybrid else None, has_text=has_text)
        cache.state_length = past + new
        return out

    def _tile_queries(self, layer, cache: LayerDecodeCache, q, types, valid, past):
        """The cached tokens' queries ``[B, Hq, past, D]`` as far as the batched
        state needs them: each row's current ``query_block`` tile, kept by the
        prefill (:func:`stash_tile_queries`); zeros elsewhere."""
        pattern = layer.pattern
        tile = pattern.selection.query_block
        batch, heads, _, dim = q.shape
        out = q.new_zeros(batch, heads, past, dim)
        for b in range(batch):  # once per state built, not per step
            positions = _sparse_positions(pattern, valid, types, b, past, q.device)
            count = positions.numel()
            first = (count // tile) * tile
            if first == count:
                continue
            row = cache.row(b)
            if row.tail_q is None or row.tail_start != first or row.tail_q.shape[1] != count - first:
                raise DecodeError(
                    "query_block decode needs the queries of the current tile "
                    f"(positions {first}..{count - 1}) from the prefill; run the prompt through the patched model"
                )
            out[b][:, positions[first:]] = row.tail_q.to(out.dtype)
        return out


def _batched_unsupported(pattern: Pattern) -> str | None:
    """Why the adapter cannot decode ``pattern`` through the batched entry."""
    reason = batched_decode_unsupported(pattern)
    if reason is None and tiled(pattern) and pattern.hybrid is not None and pattern.hybrid.vision_keys == "all":
        reason = ("query_block tiles of a vision_keys 'all' pattern count the text queries of calls handed to the "
                  "original attention, which the batched state does not see")
    return reason


class _RowFollower:
    """A cache method that changes the rows (``reorder_cache``,
    ``batch_select_indices``, ``batch_repeat_interleave``), wrapped so the
    batched decode states kept with the cache follow: beam search reorders
    the cache at every step, and rebuilding the states would re-read it all."""

    def __init__(self, cache: Any, name: str, own: Any = None) -> None:
        # The cache holds this wrapper, so the wrapper holds the cache weakly and its method
        # unbound: a reference cycle would keep the cache (gigabytes of keys and values on a
        # GPU) until Python's cycle collector ran, long after its last user dropped it.
        # ``own``: a callable the cache itself held under ``name`` (None: its class's method).
        self.cache = weakref.ref(cache)
        self.method = own if own is not None else getattr(type(cache), name)
        self.bound = own is not None
        self.name = name

    def __deepcopy__(self, memo: dict) -> "_RowFollower":
        # A copied cache (a prompt's prefill reused) gets a wrapper of its own, on the copy.
        cache = self.cache()
        return _RowFollower(memo.get(id(cache), cache), self.name,
                            copy.deepcopy(self.method, memo) if self.bound else None)

    def __reduce__(self) -> tuple:
        return _RowFollower, (self.cache(), self.name, self.method if self.bound else None)

    def __call__(self, argument: Any) -> Any:
        cache = self.cache()
        result = self.method(argument) if self.bound else self.method(cache, argument)
        stored = getattr(cache, "_nsaflex_state", None)
        if isinstance(stored, _CacheState):
            for layer_cache in stored.decode.values():
                if layer_cache.state is None:
                    continue
                if self.name == "batch_repeat_interleave":
                    index = torch.arange(layer_cache.state.batch).repeat_interleave(argument)
                else:
                    index = argument
                layer_cache.reorder(index)
        return result


def _follow_cache_rows(cache: Any) -> None:
    """Wrap the cache's row-changing methods once (see :class:`_RowFollower`)."""
    if vars(cache).get("_nsaflex_follows_rows"):
        return
    for name in ("reorder_cache", "batch_select_indices", "batch_repeat_interleave"):
        if callable(getattr(cache, name, None)):
            object.__setattr__(cache, name, _RowFollower(cache, name, vars(cache).get(name)))
    object.__setattr__(cache, "_nsaflex_follows_rows", True)


def _any_vision(types: torch.Tensor, past: int, total: int) -> bool:
    """Whether any of the queries ``past:total`` of ``types [B, S]`` is vision:
    read once per call, not once per layer (every layer gets the same tensor)."""
    return remembered(types, ("vision queries in", past, total), lambda: bool((types[:, past:total] == 1).any()))


def _trailing_padding_safe(pattern: Pattern) -> bool:
    """Whether padding moved to the end of a row (as text tokens) leaves the
    real tokens' outputs unchanged."""
    if pattern.hybrid is not None and pattern.hybrid.vision_keys == "vision":
        return True  # padding (text) never enters the sparse sequences
    return pattern.is_causal and pattern.causal_granularity == 1


def _sparse_positions(pattern: Pattern, valid, types, b: int, end: int, device) -> torch.Tensor:
    """Full-row positions of batch row ``b``'s sparse sequence among the first ``end`` tokens."""
    real = real_positions(valid, b, end, device)
    if pattern.hybrid is not None and pattern.hybrid.vision_keys == "vision":
        real = real[types[b, real] == 1]
    return real


def _valid_from_mask(mask: Any, batch: int, kv_len: int) -> torch.Tensor | None:
    """Real keys ``[B, S]`` from a mask the adapter did not build (a 4-D bool or
    additive mask: a key is real if some query may attend it; 2-D: as is)."""
    if mask is None:
        return None
    if isinstance(mask, torch.Tensor):
        if mask.dim() == 2:
            return mask.to(torch.bool)
        if mask.dim() == 4:
            allowed = mask if mask.dtype == torch.bool else mask == 0
            return allowed.any(dim=1).any(dim=1).expand(batch, -1)[:, :kv_len]
    raise AdapterError(
        "attention_mask",
        "a 2-D padding mask or a 4-D bool/additive mask",
        type(mask).__name__,
    )


# --- public API ----------------------------------------------------------------------------


def _resolve_model(model: Any) -> tuple[nn.Module, nn.Module]:
    try:
        from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen
    except ImportError as error:  # pragma: no cover - transformers is a dependency
        raise AdapterError("transformers", "an installation with Qwen2.5-VL (>= 4.57)", str(error)) from None
    if isinstance(model, qwen.Qwen2_5_VLForConditionalGeneration):
        base = model.model
    elif isinstance(model, qwen.Qwen2_5_VLModel):
        base = model
    else:
        raise AdapterError(
            "model",
            "a transformers Qwen2_5_VLForConditionalGeneration or Qwen2_5_VLModel",
            type(model).__name__,
        )
    return base, base.language_model


def model_shape(config: Any) -> Model:
    """The ``model`` section of a Qwen2.5-VL text config: its query and kv
    heads, head dim, hidden size and decoder layer count."""
    heads = config.num_attention_heads
    return Model(
        query_heads=heads,
        kv_heads=config.num_key_value_heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        hidden_size=config.hidden_size,
        num_layers=config.num_hidden_layers,
    )


def fit_pattern(pattern: Pattern, config: Any, mode: str = "faithful") -> Pattern:
    """``pattern`` for the model of text config ``config``: its ``model``
    section replaced by the model's shape (:func:`model_shape`) and the whole
    pattern validated again for it.

    A pattern's ``model`` section describes the model it was written for (what
    budget analysis uses when no model is given); the model the adapter patches
    has the last word. Refused, with :class:`~nsaflex.errors.PatternError`
    naming the key and how to fix it, only where a constraint of the pattern
    cannot hold for this model: a per-layer override ``at:`` a layer the model
    does not have, a constraint the model's shape breaks, or (``videonsa_release``)
    a layer the released code's numerics cannot run."""
    shape = model_shape(config)
    layers = shape.num_layers
    for position, override in enumerate(pattern.layers):
        beyond = [layer for layer in override.at if layer >= layers]
        if beyond:
            raise PatternError(
                f"layers[{position}].at",
                f"layer indices below {layers} (the model's text_config.num_hidden_layers: it has layers 0 to {layers - 1})",
                beyond[0],
                hint=f"pattern {pattern.name!r} overrides layer {beyond[0]}, which this {layers}-layer model does not have: "
                f"drop {', '.join(map(str, beyond))} from layers[{position}].at, or write a pattern for this model "
                f"that extends {pattern.name!r} with its own layers: section",
            )
    try:
        fitted = dataclasses.replace(pattern, model=shape)
    except PatternError as error:
        raise PatternError(
            error.key_path,
            error.expected,
            error.found,
            hint=f"pattern {pattern.name!r} cannot hold for this model ({shape.query_heads} query / {shape.kv_heads} kv heads, "
            f"head dim {shape.head_dim}, hidden {shape.hidden_size}, {layers} layers): change that key in a pattern "
            f"that extends {pattern.name!r}" + (f"; {error.hint}" if error.hint else ""),
        ) from None
    if mode == "videonsa_release":
        for layer in range(layers):
            check_release_pattern(fitted, layer)
    return fitted


def apply(
    model: nn.Module,
    pattern: Pattern | str | os.PathLike[str],
    backend: str = "auto",
    *,
    mode: str = "faithful",
    device: str | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    process_group: Any = None,
) -> Qwen25VLAdapter:
    """Make ``model``'s decoder attention run ``pattern``.

    Args:
        model: a ``Qwen2_5_VLForConditionalGeneration`` or ``Qwen2_5_VLModel``.
        pattern: a :class:`~nsaflex.spec.Pattern`, a YAML path or a bundled name.
        backend: ``auto``, ``reference``, ``flex`` or ``triton`` (per layer, see
            :func:`nsaflex.compile`); in ``videonsa_release`` mode ``flex`` or
            ``reference`` (``auto``: flex on CUDA, the reference on CPU).
        mode: ``faithful`` (the pattern's semantics, :mod:`nsaflex.reference`) or
            ``videonsa_release`` (:mod:`nsaflex.reference_release`).
        device: device kind for backend choice (default: the model's).
        state_dict: gate tensors to load (VideoNSA's or this adapter's key
            layout, see :func:`load_videonsa_gates`); on any error nothing is applied.
        process_group: a ``torch.distributed`` group for sequence parallelism
            (:mod:`nsaflex.distributed`): every rank calls the model on its
            contiguous shard of each sequence (shards in rank order, with the
            ``position_ids`` of the shard in the whole sequence) and the decoder
            attention runs sharded through an all-to-all. Only prefill and
            training steps over unpadded sequences in ``faithful`` mode; decode
            steps and padding masks are refused with :class:`AdapterError`.

    The pattern runs with the model's own shape (heads, head dim, hidden size,
    layer count: :func:`fit_pattern` replaces its ``model`` section), so a
    bundled pattern applies to every Qwen2.5-VL size.

    Raises :class:`AdapterError` (not a Qwen2.5-VL model, already patched,
    bad checkpoint), :class:`~nsaflex.errors.PatternError` (a constraint of
    the pattern that cannot hold for this model, e.g. an override of a layer
    it does not have) or :class:`~nsaflex.errors.BackendUnavailable` (e.g. a
    head dim the backend does not serve); in every case the model is left as
    it was.
    """
    base, text_model = _resolve_model(model)
    if get_adapter(base) is not None:
        raise AdapterError("model", "a model nsaflex is not applied to yet (call remove() first)", "an already patched model")
    if mode not in MODES:
        raise AdapterError("mode", f"one of {', '.join(repr(m) for m in MODES)}", mode)
    if not isinstance(pattern, Pattern):
        pattern = load_pattern(pattern)
    config = text_model.config
    if getattr(config, "use_sliding_window", False) or "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        raise AdapterError("text_config.use_sliding_window", "False (nsaflex patterns replace the sliding window)", True)
    if config._attn_implementation == ATTN_NAME:
        raise AdapterError("text_config._attn_implementation", "the model's own implementation", ATTN_NAME)
    pattern = fit_pattern(pattern, config, mode)
    if process_group is not None and mode != "faithful":
        raise AdapterError("process_group", "None in mode 'videonsa_release' (sequence parallelism runs faithful mode)", mode)
    decoder_layers = list(text_model.layers)
    weight = decoder_layers[0].self_attn.q_proj.weight
    device_kind = device or weight.device.type
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    init_std = getattr(config, "initializer_range", 0.02)
    names = {module: name for name, module in model.named_modules()}
    layers: list[_Layer] = []
    chosen_backend = backend
    adapter = Qwen25VLAdapter(model, base, text_model, pattern, backend, mode, layers, {})
    shared: dict[Pattern, CompiledAttention] = {}  # layers with the same pattern share kernels and mask caches
    # Sequence-parallel ranks each run a subset of the heads (run_heads), which
    # the backends check against the compiled pattern's model section.
    compiled_pattern = pattern if process_group is None else dataclasses.replace(
        pattern, model=dataclasses.replace(pattern.model, query_heads=None, kv_heads=None)
    )
    for index, decoder_layer in enumerate(decoder_layers):
        attention = decoder_layer.self_attn
        resolved = pattern.for_layer(index)
        compiled = None
        if not resolved.dense:
            learned = resolved.compression is not None and resolved.compression.pooling == "mlp"
            compiled = None if learned else shared.get(resolved)
            if compiled is None:
                compiled = compile_pattern(compiled_pattern, backend, layer=index, device=device_kind, head_dim=head_dim,
                                           mode=mode)
                compiled.to(device=weight.device)
                if not learned:
                    shared[resolved] = compiled
            chosen_backend = compiled.backend
        gate = gate_for_pattern(resolved, config.hidden_size, heads, init_std=init_std, dtype=weight.dtype, device=weight.device)
        if gate is not None and gate.kind == "constant":
            gate = None  # constants come from the pattern
        for name in (gate.parameter_names if gate is not None else ()) + ((ATTN_NAME,) if compiled is not None else ()):
            if hasattr(attention, name):
                raise AdapterError(
                    f"{names.get(attention, 'self_attn')}.{name}",
                    "no existing attribute of that name (the adapter adds it)",
                    type(getattr(attention, name)).__name__,
                )
        layers.append(_Layer(index, adapter, attention, resolved, compiled, gate))
        adapter.module_names[index] = names.get(attention, f"layers.{index}.self_attn")
    if mode == "videonsa_release" and chosen_backend == "auto":  # every layer dense: decode's dtype only
        chosen_backend = release_backend(backend, device_kind)
    adapter.backend = chosen_backend
    adapter.process_group = process_group
    if state_dict is not None:
        _load_gates(adapter, state_dict)
    _register_interfaces()
    try:
        adapter._install()
    except Exception:
        adapter._uninstall()
        raise
    return adapter


def remove(model: nn.Module) -> None:
    """Undo :func:`apply` on ``model``."""
    adapter = get_adapter(model)
    if adapter is None:
        raise AdapterError("model", "a model patched with apply()", "a model nsaflex is not applied to")
    adapter.remove()


def get_adapter(model: nn.Module) -> Qwen25VLAdapter | None:
    """The adapter applied to ``model``, or ``None``."""
    base, _ = _resolve_model(model)
    return getattr(base, _ADAPTER_ATTRIBUTE, None)


@contextlib.contextmanager
def applied(model: nn.Module, pattern: Pattern | str | os.PathLike[str], backend: str = "auto", **options: Any):
    """``with applied(model, pattern) as adapter:`` the model runs the pattern inside."""
    adapter = apply(model, pattern, backend, **options)
    try:
        yield adapter
    finally:
        adapter.remove()


_GATE_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.(g_proj(?:_1|_2)?)\.(weight|bias)$")


def load_videonsa_gates(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """Load gate tensors into a patched model.

    Accepts any key ending in ``layers.N.self_attn.{g_proj_1,g_proj_2,g_proj}.{weight,bias}``:
    VideoNSA's transformers-4.x layout (``model.layers.N...``), the 5.x layout
    (``model.language_model.layers.N...``) and this adapter's own keys. Every
    gate parameter of the model must be present with its exact shape, or
    :class:`AdapterError` names the key and nothing is loaded. Gate tensors of
    layers without gates (dense layers) are returned under ``unused``.

    Returns ``{"loaded": [model keys], "unused": [checkpoint keys]}``.
    """
    adapter = get_adapter(model)
    if adapter is None:
        raise AdapterError("model", "a model patched with apply() (gates exist only then)", "a model nsaflex is not applied to")
    return _load_gates(adapter, state_dict)


def _load_gates(adapter: Qwen25VLAdapter, state_dict: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    if not hasattr(state_dict, "items"):
        raise AdapterError("state_dict", "a mapping of names to tensors", type(state_dict).__name__)
    found: dict[tuple[int, str, str], tuple[str, torch.Tensor]] = {}
    num_layers = len(adapter.layers)
    for key, tensor in state_dict.items():
        match = _GATE_KEY.search(key)
        if match is None:
            continue
        ident = (int(match.group(1)), match.group(2), match.group(3))
        if ident[0] >= num_layers:
            raise AdapterError(key, f"a layer index below {num_layers} (the model's decoder layers)", ident[0])
        if not isinstance(tensor, torch.Tensor):
            raise AdapterError(key, "a tensor", type(tensor).__name__)
        if ident in found and not torch.equal(found[ident][1].cpu(), tensor.cpu()):
            raise AdapterError(key, f"the same tensor as {found[ident][0]} (both key layouts given)", "a different tensor")
        found[ident] = (key, tensor)
    plan: list[tuple[nn.Parameter, torch.Tensor, str]] = []
    expected: set[tuple[int, str, str]] = set()
    for layer in adapter.layers:
        if layer.gate is None:
            continue
        prefix = adapter.module_names[layer.index]
        for name, linear in layer.gate.linears().items():
            for part in ("weight", "bias"):
                ident = (layer.index, name, part)
                expected.add(ident)
                parameter = getattr(linear, part)
                own_key = f"{prefix}.{name}.{part}"
                if ident not in found:
                    raise AdapterError(
                        "state_dict",
                        f"the gate tensor {own_key} (or model.layers.{layer.index}.self_attn.{name}.{part})",
                        "no such key",
                    )
                key, tensor = found[ident]
                if tuple(tensor.shape) != tuple(parameter.shape):
                    raise AdapterError(
                        key,
                        f"shape {list(parameter.shape)} (layer {layer.index}: {layer.gate.num_heads} heads x "
                        f"{layer.gate.num_branches} branches, hidden {layer.gate.hidden_size})",
                        list(tensor.shape),
                    )
                if not tensor.is_floating_point():
                    raise AdapterError(key, "a floating-point tensor", str(tensor.dtype))
                plan.append((parameter, tensor, own_key))
    with torch.no_grad():
        for parameter, tensor, _ in plan:
            parameter.copy_(tensor.to(device=parameter.device, dtype=parameter.dtype))
    unused = [found[ident][0] for ident in found if ident not in expected]
    return {"loaded": [key for _, _, key in plan], "unused": unused}


__all__ = [
    "ATTN_NAME",
    "AdapterError",
    "MODES",
    "NsaflexMask",
    "Qwen25VLAdapter",
    "StaleAdapterWarning",
    "applied",
    "apply",
    "fit_pattern",
    "get_adapter",
    "load_videonsa_gates",
    "model_shape",
    "remove",
]
