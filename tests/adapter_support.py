"""Shared pieces of the adapter tests: tiny Qwen2.5-VL models built from a config
(no downloads), batches with vision spans and padding, and a from-scratch
evaluation of a patched model's decoder with the dense float64 references.

The from-scratch evaluation uses only the model's weights: embeddings, RMS
norms, projections, rotary embedding (written out here), the gate formula
(written out here from the ``g_proj`` weights) and
:func:`nsaflex.reference.reference_attention` (or
:func:`nsaflex.reference_release.release_attention`) on each row without its
padding. Nothing of the adapter (dispatch, masks, token classes, padding
handling, decode) is involved.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.nn import functional as F

from nsaflex.reference import reference_attention
from nsaflex.reference_release import release_attention
from nsaflex.spec import Compression, Gate, Hybrid, Pattern, Selection, Window

IMAGE, VIDEO, VISION_START, VISION_END = 120, 121, 122, 123
PAD, BOS, EOS = 2, 0, 1
VOCAB = 128


def tiny_model(
    *,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    hidden: int = 64,
    impl: str = "sdpa",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
):
    """A random ``Qwen2_5_VLForConditionalGeneration`` with a tiny text and vision tower."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    head_dim = hidden // heads
    section = head_dim // 2
    mrope = [section - 2 * (section // 3), section // 3, section // 3]
    config = Qwen2_5_VLConfig(
        text_config=dict(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            vocab_size=VOCAB,
            max_position_embeddings=1024,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
            rope_scaling={"type": "mrope", "mrope_section": mrope},
            rope_theta=10000.0,
            bos_token_id=BOS,
            eos_token_id=EOS,
            pad_token_id=PAD,
        ),
        vision_config=dict(
            depth=1,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=hidden,
            patch_size=4,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=16,
            fullatt_block_indexes=[0],
        ),
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    config._attn_implementation = impl
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).to(dtype).eval()
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = EOS
    return model


def small_pattern(**changes) -> Pattern:
    """A VideoNSA-like hybrid pattern with blocks small enough for ~40 tokens."""
    pattern = Pattern(
        name="small-videonsa",
        compression=Compression(block=4, stride=4),
        selection=Selection(block=4, count=2, forced=("current",)),
        window=Window(size=4),
        gate=Gate(kind="mlp", temperature=0.3),
        hybrid=Hybrid(vision_keys="vision"),
    )
    return dataclasses.replace(pattern, **changes)


def make_batch(spans, lengths, total, *, left_pad=True, seed=1, video=False):
    """``input_ids``, ``attention_mask`` and ``mm_token_type_ids`` ``[B, total]``.

    Row ``b`` has ``lengths[b]`` real tokens (padded to ``total`` on the left or
    right) and vision tokens at real positions ``spans[b]`` (a list of
    ``(start, end)``), wrapped in vision start/end tokens."""
    generator = torch.Generator().manual_seed(seed)
    batch = len(lengths)
    ids = torch.full((batch, total), PAD, dtype=torch.long)
    mask = torch.zeros(batch, total, dtype=torch.long)
    mm = torch.zeros(batch, total, dtype=torch.long)
    for b, (length, row_spans) in enumerate(zip(lengths, spans)):
        row = torch.randint(3, 100, (length,), generator=generator)
        kind = torch.zeros(length, dtype=torch.long)
        for start, end in row_spans:
            row[start:end] = VIDEO if video else IMAGE
            kind[start:end] = 2 if video else 1
            if start > 0:
                row[start - 1] = VISION_START
            if end < length:
                row[end] = VISION_END
        offset = total - length if left_pad else 0
        ids[b, offset : offset + length] = row
        mask[b, offset : offset + length] = 1
        mm[b, offset : offset + length] = kind
    return ids, mask, mm


def takes_mm_token_type_ids(model) -> bool:
    """Whether this transformers version's Qwen2.5-VL takes ``mm_token_type_ids``
    (5.x; 4.57 classes tokens by their ids only)."""
    import inspect

    return "mm_token_type_ids" in inspect.signature(model.forward).parameters


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Text positions ``[B, L]`` counting real tokens only (what generate() uses)."""
    positions = mask.long().cumsum(-1) - 1
    return positions.masked_fill(mask == 0, 1)


def randomise_gates(adapter, seed=0, scale=0.5) -> None:
    """Gate and compression-MLP parameters drawn from N(0, scale^2), so the gates
    differ between heads and branches."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in adapter.gate_parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)


def poolers_of(adapter) -> dict:
    """Layer index -> the compression MLP of ``pooling: mlp`` (None otherwise)."""
    return {layer.index: layer.compiled.pooler for layer in adapter.layers if layer.compiled is not None}


# --- from-scratch evaluation ------------------------------------------------------------


def _rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotary embedding with equal positions in every mrope section (text-like positions)."""
    freqs = positions[:, None].float() * inv_freq[None, :].float()  # [L, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def gate_values(attention, hidden: torch.Tensor, pattern: Pattern) -> torch.Tensor | None:
    """``[1, Hq, L, nb]`` from the layer's gate weights, the formula written out."""
    nb = len(pattern.branches)
    heads = attention.q_proj.out_features // attention.head_dim
    gate = pattern.gate
    if gate.kind == "constant" or nb == 0:
        return None
    if gate.kind == "mlp":
        inner = F.gelu(hidden @ attention.g_proj_1.weight.t() + attention.g_proj_1.bias)
        logits = inner @ attention.g_proj_2.weight.t() + attention.g_proj_2.bias
    else:
        logits = hidden @ attention.g_proj.weight.t() + attention.g_proj.bias
    logits = logits.view(hidden.shape[0], hidden.shape[1], heads, nb)
    return torch.sigmoid(logits / gate.temperature).permute(0, 2, 1, 3)


class LayerRun:
    """One decoder layer evaluated from scratch, keeping q/k/v/gates/classes of
    every position seen (prefill, then one token at a time)."""

    def __init__(self, model, index: int, pattern: Pattern, release: bool = False) -> None:
        text = model.model.language_model
        self.layer = text.layers[index]
        self.attention = self.layer.self_attn
        self.pattern = pattern.for_layer(index)
        self.release = release
        self.inv_freq = text.rotary_emb.inv_freq
        self.q = self.k = self.v = self.g = self.types = None

    def __call__(self, hidden: torch.Tensor, positions: torch.Tensor, types: torch.Tensor, pooler=None) -> torch.Tensor:
        attention, layer = self.attention, self.layer
        n = hidden.shape[1]
        head_dim = attention.head_dim
        x = layer.input_layernorm(hidden)
        q = attention.q_proj(x).view(1, n, -1, head_dim).transpose(1, 2)
        k = attention.k_proj(x).view(1, n, -1, head_dim).transpose(1, 2)
        v = attention.v_proj(x).view(1, n, -1, head_dim).transpose(1, 2)
        q, k = _rope(q, positions, self.inv_freq), _rope(k, positions, self.inv_freq)
        g = None if self.pattern.dense else gate_values(attention, x, self.pattern)

        def grow(old, new, dim):
            return new if old is None else torch.cat([old, new], dim=dim)

        self.q, self.k, self.v = grow(self.q, q, 2), grow(self.k, k, 2), grow(self.v, v, 2)
        self.types = grow(self.types, types, 1)
        if g is not None:
            self.g = grow(self.g, g, 2)
        gates = self.g
        hybrid_types = self.types if (self.pattern.hybrid is not None or self.release) else None
        if self.release:
            out = release_attention(self.q, self.k, self.v, self.pattern, gates, hybrid_types)
        else:
            out = reference_attention(self.q, self.k, self.v, self.pattern, gates, hybrid_types, pooler)
        out = out[:, :, -n:].to(hidden.dtype)
        hidden = hidden + attention.o_proj(out.transpose(1, 2).reshape(1, n, -1))
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


class ScratchModel:
    """The decoder of a patched tiny model, from scratch, for one row without padding."""

    def __init__(self, model, pattern: Pattern, *, release: bool = False, poolers=None) -> None:
        self.model = model
        self.text = model.model.language_model
        self.layers = [LayerRun(model, i, pattern, release) for i in range(len(self.text.layers))]
        self.poolers = poolers or {}
        self.length = 0

    @torch.no_grad()
    def step(self, ids: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
        """Logits ``[n, V]`` of the new tokens ``ids [n]`` (classes ``types [n]``)."""
        n = ids.shape[0]
        positions = torch.arange(self.length, self.length + n)
        hidden = self.text.embed_tokens(ids[None])
        for index, run in enumerate(self.layers):
            hidden = run(hidden, positions, types[None], self.poolers.get(index))
        self.length += n
        return self.model.lm_head(self.text.norm(hidden))[0]


def scratch_logits(model, pattern, ids, mask, types, *, release=False, poolers=None) -> torch.Tensor:
    """Logits ``[B, L, V]`` of every real token, row by row without padding
    (padding positions are zero)."""
    out = torch.zeros(*ids.shape, VOCAB)
    for b in range(ids.shape[0]):
        real = torch.nonzero(mask[b]).flatten()
        scratch = ScratchModel(model, pattern, release=release, poolers=poolers)
        out[b, real] = scratch.step(ids[b, real], types[b, real])
    return out


def scratch_generate(model, pattern, ids, mask, types, steps, *, release=False, poolers=None, text_only_new=True) -> torch.Tensor:
    """Greedy tokens ``[B, steps]``: the prompt evaluated at once, then one token
    at a time, each new token's attention the last row of the reference on the
    sequence so far. Rows stop at EOS (then PAD), as generate() does. Generated
    tokens are text (as generate() extends ``mm_token_type_ids``), or classed by
    their id with ``text_only_new=False``."""
    tokens = torch.full((ids.shape[0], steps), PAD, dtype=torch.long)
    for b in range(ids.shape[0]):
        real = torch.nonzero(mask[b]).flatten()
        scratch = ScratchModel(model, pattern, release=release, poolers=poolers)
        logits = scratch.step(ids[b, real], types[b, real])[-1]
        for step in range(steps):
            token = int(logits.argmax())
            tokens[b, step] = token
            if token == EOS:
                break
            vision = 0 if text_only_new else int(token in (IMAGE, VIDEO))
            logits = scratch.step(torch.tensor([token]), torch.tensor([vision]))[-1]
    return tokens
