"""What a model's sparse attention does, layer by layer: the statistics the
Qwen2.5-VL adapter's recorder collects (``with adapter.record() as rec:
model(**inputs)``), their JSON form and VideoNSA's two figures.

Per recorded layer, per query head ``h`` and branch ``b`` (gate order):

* ``gate_text[h, b]``, ``gate_vision[h, b]``: the mean gate value over the text
  tokens and over the vision tokens (image or video) of the recorded calls
  (NaN where there were none). A hybrid pattern's text queries take the dense
  path, so their gates are what the gate network proposes, unused;
* ``sink[h, b]``: the attention-sink mass, the mean over the sparse queries of
  the probability the branch puts on the *sink keys*, the first keys of the
  row's sparse sequence: for compression the first compressed token (which
  pools positions ``[0, l)``), for selection and window the keys of the first
  selection block (positions ``[0, l')``; ``[0, l)`` without selection). A
  query whose branch cannot see them contributes 0 (a window far from the
  start), so the window's mass shows how much the first block still draws;
* ``blocks[hs, j]``: how many (query, slot) pairs chose selection block ``j``
  (``hs`` a kv head for ``scoring: group``, a query head for ``head``).

A :class:`Recording` keeps sums and counts, so several calls add up.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from nsaflex.errors import InputError
from nsaflex.inspect import AttentionInfo
from nsaflex.pooling import MLPPooling, compress, softmax_scale
from nsaflex.spec import Pattern

FORMAT = "nsaflex-recording/1"


@dataclass
class LayerRecord:
    """Sums over the recorded calls of one decoder layer (see the module doc)."""

    branches: tuple[str, ...]
    gate_text_sum: torch.Tensor  # [Hq, nb]
    gate_vision_sum: torch.Tensor  # [Hq, nb]
    text_tokens: int = 0
    vision_tokens: int = 0
    sink_sum: torch.Tensor | None = None  # [Hq, nb]
    sparse_queries: int = 0
    block_counts: torch.Tensor | None = None  # [Hsel, J]

    def gate_text(self) -> torch.Tensor:
        return self.gate_text_sum / self.text_tokens if self.text_tokens else torch.full_like(self.gate_text_sum, math.nan)

    def gate_vision(self) -> torch.Tensor:
        if not self.vision_tokens:
            return torch.full_like(self.gate_vision_sum, math.nan)
        return self.gate_vision_sum / self.vision_tokens

    def sink(self) -> torch.Tensor:
        assert self.sink_sum is not None
        return self.sink_sum / self.sparse_queries if self.sparse_queries else torch.full_like(self.sink_sum, math.nan)

    def to_dict(self) -> dict[str, Any]:
        """Means, counts and histograms as plain lists (NaN as None)."""
        def plain(x: torch.Tensor | None):
            if x is None:
                return None
            return [[None if math.isnan(value) else value for value in row] for row in x.double().tolist()]

        return {
            "branches": list(self.branches),
            "text_tokens": self.text_tokens,
            "vision_tokens": self.vision_tokens,
            "sparse_queries": self.sparse_queries,
            "gate_text": plain(self.gate_text()),
            "gate_vision": plain(self.gate_vision()),
            "sink": plain(self.sink()),
            "block_counts": None if self.block_counts is None else self.block_counts.long().tolist(),
        }


@dataclass
class Recording:
    """Per-layer statistics of the recorded forward calls, by decoder layer index."""

    layers: dict[int, LayerRecord] = field(default_factory=dict)

    def add(
        self,
        index: int,
        pattern: Pattern,
        q: torch.Tensor,
        k: torch.Tensor,
        info: AttentionInfo,
        token_types: torch.Tensor | None,
        pooler: MLPPooling | None = None,
    ) -> None:
        """Add one call of layer ``index``: q ``[B, Hq, L, D]``, k ``[B, Hkv, L, D]``
        (unpadded rows), its ``info`` (default scale) and token classes ``[B, L]``
        (0 text, else vision; None: every token counted as text)."""
        if not info.branches:
            return
        batch, query_heads, length, _ = q.shape
        nb = len(info.branches)
        record = self.layers.get(index)
        if record is None:
            record = LayerRecord(info.branches, q.new_zeros(query_heads, nb, dtype=torch.float64).cpu(),
                                 q.new_zeros(query_heads, nb, dtype=torch.float64).cpu(),
                                 sink_sum=torch.zeros(query_heads, nb, dtype=torch.float64))
            self.layers[index] = record
        vision = (token_types != 0) if token_types is not None else torch.zeros(batch, length, dtype=torch.bool)
        vision = vision.to(q.device)
        gates = info.gates.double()
        record.gate_vision_sum += (gates * vision[:, None, :, None]).sum(dim=(0, 2)).cpu()
        record.gate_text_sum += (gates * (~vision)[:, None, :, None]).sum(dim=(0, 2)).cpu()
        record.vision_tokens += int(vision.sum())
        record.text_tokens += int((~vision).sum())
        record.sink_sum += sink_mass(pattern, q, k, info, pooler).sum(dim=(0, 2)).cpu()
        record.sparse_queries += int(info.sparse_queries.sum())
        if info.selected_blocks is not None:
            record.block_counts = _add_counts(record.block_counts, block_histogram(info.selected_blocks, pattern, length))

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "layers": {str(i): self.layers[i].to_dict() for i in sorted(self.layers)}}

    def save(self, path: str | os.PathLike[str]) -> None:
        """To ``.json`` (means, see :meth:`to_dict`) or ``.pt`` (the sums, reloadable)."""
        path = os.fspath(path)
        if path.endswith(".json"):
            with open(path, "w") as handle:
                json.dump(self.to_dict(), handle, indent=1)
        elif path.endswith(".pt"):
            torch.save({"format": FORMAT, "layers": {i: vars(r) for i, r in self.layers.items()}}, path)
        else:
            raise InputError("recording path", "a file name ending in .json or .pt", path)


def load_recording(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A saved recording (``.pt`` or ``.json``) as :meth:`Recording.to_dict` gives it."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError("recording", "an existing .pt or .json file", path)
    if path.endswith(".pt"):
        saved = torch.load(path, weights_only=True)  # tensors, numbers and names only: no code runs
        if not isinstance(saved, dict) or saved.get("format") != FORMAT:
            raise InputError("recording", f"a file saved by Recording.save ({FORMAT})", path)
        return Recording({i: LayerRecord(**fields) for i, fields in saved["layers"].items()}).to_dict()
    with open(path) as handle:
        try:
            data = json.load(handle)
        except json.JSONDecodeError as error:
            raise InputError("recording", "JSON written by Recording.save", f"{path}: {error}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise InputError("recording", f"a file saved by Recording.save ({FORMAT})", path)
    return data


def _add_counts(total: torch.Tensor | None, counts: torch.Tensor) -> torch.Tensor:
    if total is None:
        return counts
    width = max(total.shape[1], counts.shape[1])
    grown = torch.zeros(counts.shape[0], width, dtype=torch.long)
    grown[:, : total.shape[1]] += total
    grown[:, : counts.shape[1]] += counts
    return grown


def block_histogram(selected_blocks: torch.Tensor, pattern: Pattern, length: int) -> torch.Tensor:
    """``[Hsel, J]`` long: how many (query, slot) pairs of ``selected_blocks
    [B, Hsel, L, n]`` hold block ``j`` (``J = ceil(L / l')``)."""
    assert pattern.selection is not None
    num_blocks = -(-length // pattern.selection.block)
    blocks = selected_blocks.transpose(0, 1).reshape(selected_blocks.shape[1], -1).cpu()
    counts = torch.zeros(blocks.shape[0], num_blocks + 1, dtype=torch.long)
    # empty slots (-1) land in the extra last column, dropped
    counts.scatter_add_(1, torch.where(blocks >= 0, blocks, num_blocks), torch.ones_like(blocks))
    return counts[:, :num_blocks]


def sink_mass(
    pattern: Pattern, q: torch.Tensor, k: torch.Tensor, info: AttentionInfo, pooler: MLPPooling | None = None
) -> torch.Tensor:
    """``[B, Hq, L, nb]`` float64: each branch's probability on the sink keys
    (module doc), ``exp(q·k_sink / sqrt(D) - lse_b)`` summed over the sink keys the
    branch sees; 0 on queries outside the sparse path."""
    batch, query_heads, length, dim = q.shape
    group = query_heads // k.shape[1]
    first = pattern.selection.block if pattern.selection is not None else pattern.compression.block if \
        pattern.compression is not None else pattern.window.size
    mass = torch.zeros(batch, query_heads, length, len(info.branches), dtype=torch.float64)
    for b in range(batch):
        positions = torch.nonzero(info.sparse_queries[b]).flatten().cpu() if pattern.hybrid is not None and \
            pattern.hybrid.vision_keys == "vision" else torch.arange(length)
        if positions.numel() == 0:
            continue
        qs = q[b][:, positions].double().cpu()
        ks = k[b][:, positions].double().cpu().repeat_interleave(group, dim=0)
        t = torch.arange(positions.numel())
        for slot, name in enumerate(info.branches):
            lse = info.lse[name][b][:, positions].double().cpu()
            if name == "compression":
                c = pattern.compression
                if positions.numel() < c.block:
                    continue
                kc, _ = compress(k[b : b + 1, :, positions[: c.block]], k[b : b + 1, :, positions[: c.block]], c, pooler)
                sink_k = kc[0, :, :1].double().cpu().repeat_interleave(group, dim=0)  # [Hq, 1, D]
                last = c.block - 1
                seen = (last <= t) if c.visibility == "causal" else (last >= t)
                seen = seen[None, :, None].expand(query_heads, -1, 1)
            else:
                width = min(first, positions.numel())
                sink_k = ks[:, :width]
                s = torch.arange(width)
                seen = (s[None, :] <= t[:, None])[None].expand(query_heads, -1, -1)
                if name == "window":
                    seen = seen & (t[:, None] - s[None, :] < pattern.window.size)[None]
                else:
                    lists = info.selected_blocks[b][:, positions].cpu()
                    chosen = (lists == 0).any(dim=-1)
                    chosen = chosen if chosen.shape[0] == query_heads else chosen.repeat_interleave(group, dim=0)
                    seen = seen & chosen[:, :, None]
            scores = torch.einsum("htd,hsd->hts", qs, sink_k) * softmax_scale(dim)
            live = seen & torch.isfinite(lse)[:, :, None]
            p = torch.where(live, torch.exp(scores - torch.where(torch.isfinite(lse), lse, 0.0)[:, :, None]), 0.0)
            mass[b, :, positions, slot] = p.sum(dim=-1)
    return mass * info.sparse_queries[:, None, :, None].cpu()


# --- figures -------------------------------------------------------------------------------------


def _per_layer(data: dict[str, Any], key: str) -> tuple[list[int], list[str], list[list[float]]]:
    """Layers, branches, and ``values[layer][branch]``: the head mean of ``key``
    (NaN where no head has a value)."""
    layers = sorted(int(i) for i in data["layers"])
    branches = list(dict.fromkeys(b for i in layers for b in data["layers"][str(i)]["branches"]))
    values = []
    for i in layers:
        layer = data["layers"][str(i)]
        row = []
        for branch in branches:
            if branch not in layer["branches"] or layer[key] is None:
                row.append(math.nan)
                continue
            slot = layer["branches"].index(branch)
            heads = [h[slot] for h in layer[key] if h[slot] is not None]
            row.append(sum(heads) / len(heads) if heads else math.nan)
        values.append(row)
    return layers, branches, values


def plot_gates(data: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """VideoNSA's gate-weight figure: per layer, the mean gate of each branch
    (over heads) on vision tokens (solid) and text tokens (dashed)."""
    from nsaflex.show import pyplot

    plt = pyplot()
    figure, axes = plt.subplots(figsize=(7, 3.5))
    for key, style, label in (("gate_vision", "-o", "vision"), ("gate_text", "--s", "text")):
        layers, branches, values = _per_layer(data, key)
        for slot, branch in enumerate(branches):
            axes.plot(layers, [row[slot] for row in values], style, color=f"C{slot}", label=f"{branch} ({label})")
    axes.set_xlabel("layer")
    axes.set_ylabel("mean gate")
    axes.set_title("gate weights per layer: vision vs text tokens")
    axes.legend(fontsize="small", ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_sinks(data: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """VideoNSA's attention-sink figure: per layer, each branch's sink mass
    (mean over heads and sparse queries of the probability on the first keys)."""
    from nsaflex.show import pyplot

    plt = pyplot()
    layers, branches, values = _per_layer(data, "sink")
    figure, axes = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / max(1, len(branches))
    for slot, branch in enumerate(branches):
        axes.bar([i + (slot - (len(branches) - 1) / 2) * width for i in layers], [row[slot] for row in values],
                 width, color=f"C{slot}", label=branch)
    axes.set_xlabel("layer")
    axes.set_ylabel("sink mass")
    axes.set_title("attention-sink mass per layer and branch")
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
