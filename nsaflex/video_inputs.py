"""Structured attention inputs shaped like video tokens (``nsaflex bench --inputs video``).

Token-level selection costs depend on how much neighbouring queries agree on
their blocks (a FlexAttention query tile runs the union of its queries'
selections), and i.i.d. Gaussian q/k/v make neighbours disagree far more than
real video tokens do. This generator gives q, k, v the structure of a video:

* the sequence is ``F`` frames of ``P`` patches (token ``t = f * P + p``; the
  last frame may be cut short);
* a latent field ``z[f, p] in R^r`` (``r = rank``) varies slowly from frame to
  frame and smoothly across patches::

      g[f]    = rho * g[f-1]    + sqrt(1 - rho^2) * e_f         (frame-global scene)
      s[f, p] = rho * s[f-1, p] + sqrt(1 - rho^2) * e_{f,p}     (per-patch content)
      s       <- moving average of s over ``smooth`` neighbouring patches (renormalised)
      z[f, p] = sqrt(w) * g[f] + sqrt(1 - w) * s[f, p]           (w = global_weight)

  so every latent is standard normal, consecutive frames correlate by ``rho``,
  and patches of one frame share the scene component;
* each kv head ``h`` has its own projections ``A_h^k, A_h^v [r, D]`` and each
  query head its own ``A_h^q``; ``x = z A / sqrt(r) * signal + noise * N(0, 1)``,
  so q/k/v of nearby tokens are correlated through ``z`` and decorrelated by the
  noise (``signal`` scales the logits: larger = peakier attention).

Text tokens (if any) take i.i.d. Gaussian values. :func:`selection_overlap`
measures what the generator produces for a pattern: the mean Jaccard index of
the selections of neighbouring queries (units).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class VideoSpec:
    """Parameters of the generator (defaults: Qwen2.5-VL-like 16 x 16 merged patches)."""

    patches: int = 256
    rank: int = 32
    rho: float = 0.95
    global_weight: float = 0.5
    smooth: int = 15
    signal: float = 2.0
    noise: float = 0.5


def _ar1(steps: int, shape: tuple[int, ...], rho: float, generator: torch.Generator) -> torch.Tensor:
    out = torch.empty(steps, *shape)
    state = torch.randn(shape, generator=generator)
    keep, fresh = rho, math.sqrt(max(0.0, 1.0 - rho * rho))
    for step in range(steps):
        if step:
            state = keep * state + fresh * torch.randn(shape, generator=generator)
        out[step] = state
    return out


def video_latents(length: int, spec: VideoSpec = VideoSpec(), *, seed: int = 0) -> torch.Tensor:
    """The latent field ``[length, rank]`` (standard normal marginals)."""
    generator = torch.Generator().manual_seed(seed)
    frames = -(-length // spec.patches)
    scene = _ar1(frames, (spec.rank,), spec.rho, generator)  # [F, r]
    content = _ar1(frames, (spec.patches, spec.rank), spec.rho, generator)  # [F, P, r]
    if spec.smooth > 1:
        kernel = torch.ones(spec.rank, 1, spec.smooth) / spec.smooth
        smoothed = torch.nn.functional.conv1d(content.permute(0, 2, 1), kernel, padding="same", groups=spec.rank)
        content = smoothed.permute(0, 2, 1) / smoothed.std().clamp_min(1e-6)
    latent = math.sqrt(spec.global_weight) * scene[:, None, :] + math.sqrt(1 - spec.global_weight) * content
    return latent.reshape(frames * spec.patches, spec.rank)[:length]


def video_qkv(
    batch: int,
    query_heads: int,
    kv_heads: int,
    length: int,
    dim: int,
    *,
    spec: VideoSpec = VideoSpec(),
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q ``[B, Hq, L, D]``, k and v ``[B, Hkv, L, D]`` from one latent video per batch row."""
    generator = torch.Generator().manual_seed(seed + 1)
    outs = []
    for heads in (query_heads, kv_heads, kv_heads):
        outs.append(torch.randn(heads, spec.rank, dim, generator=generator) / math.sqrt(spec.rank))
    project_q, project_k, project_v = outs
    rows = {"q": [], "k": [], "v": []}
    for b in range(batch):
        latent = video_latents(length, spec, seed=seed + 100 * (b + 1)).to(device)
        for name, project in (("q", project_q), ("k", project_k), ("v", project_v)):
            x = torch.einsum("lr,hrd->hld", latent, project.to(device)) * spec.signal
            noise = torch.randn(x.shape, generator=generator).to(device) * spec.noise
            rows[name].append(x + noise)
    return tuple(torch.stack(rows[name]).to(dtype) for name in ("q", "k", "v"))  # type: ignore[return-value]


def random_qkv(batch, query_heads, kv_heads, length, dim, *, seed=0, device="cpu", dtype=torch.float32):
    """i.i.d. standard normal q, k, v (``--inputs random``)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    make = lambda heads: torch.randn(batch, heads, length, dim, generator=generator).to(device=device, dtype=dtype)  # noqa: E731
    return make(query_heads), make(kv_heads), make(kv_heads)


def selection_overlap(indices: torch.Tensor, *, max_pairs: int = 8192, seed: int = 0) -> float:
    """Mean Jaccard index ``|A n B| / |A u B|`` of the selections of neighbouring
    units (queries or query tiles) ``u, u+1``, over up to ``max_pairs`` sampled
    pairs of ``indices [B, Hs, U, w]`` (``-1`` = empty slot)."""
    batch, heads, units, width = indices.shape
    if units < 2 or width == 0:
        return 1.0
    flat = indices.reshape(batch * heads, units, width)
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, flat.shape[0], (max_pairs,), generator=generator)
    first = torch.randint(0, units - 1, (max_pairs,), generator=generator)
    total = flat.shape[0] * (units - 1)
    if total <= max_pairs:
        rows = torch.arange(flat.shape[0]).repeat_interleave(units - 1)
        first = torch.arange(units - 1).repeat(flat.shape[0])
    rows, first = rows.to(indices.device), first.to(indices.device)
    a, b = flat[rows, first].long(), flat[rows, first + 1].long()
    valid_a, valid_b = a >= 0, b >= 0
    shared = ((a[:, :, None] == b[:, None, :]) & valid_a[:, :, None] & valid_b[:, None, :]).any(-1).sum(-1)
    union = valid_a.sum(-1) + valid_b.sum(-1) - shared
    keep = union > 0
    if not bool(keep.any()):
        return 1.0
    return float((shared[keep].double() / union[keep].double()).mean())
