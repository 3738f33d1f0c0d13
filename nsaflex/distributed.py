"""Sequence parallelism (Ulysses all-to-all) over ``torch.distributed``.

Each rank holds a contiguous shard of the sequence: q ``[B, Hq, L_r, D]``, k
and v ``[B, Hkv, L_r, D]``, gates ``[B, Hq, L_r, nb]``, token_types ``[B, L_r]``
(shards in rank order; their lengths may differ, e.g. ``torch.tensor_split``).
:class:`SequenceParallelAttention` exchanges heads for sequence with
``all_to_all`` so that every rank runs the compiled pattern on *whole*
sequences for its share of kv heads, then exchanges back. The query heads of a
GQA group always stay on one rank (group-scored selection sums over them).

Head assignment for ``P`` ranks and ``Hkv`` kv heads:

* ``Hkv % P == 0``: rank ``j`` takes kv heads ``[j*Hkv/P, (j+1)*Hkv/P)`` and their
  query heads: no work is repeated.
* ``P % Hkv == 0`` (fewer kv heads than ranks): each kv head is replicated on
  ``P/Hkv`` consecutive ranks, each of which computes the whole group; only the
  first replica returns its output (so gradients are counted once). The
  replicas repeat work: use at most ``Hkv`` ranks per sequence where speed matters.
* anything else is refused.

Shards are padded to the longest shard for the exchange and the padding is
removed before the attention sees the sequence, so results equal the
single-process run up to floating-point reordering. Forward and backward use
``torch.distributed.nn.functional.all_to_all``, which is differentiable; NCCL
on GPUs, gloo on CPUs. Parameters of the pattern (the compression MLP) get
per-rank gradients: average them like any data-parallel parameter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn
from torch.nn import functional as F

from nsaflex.errors import InputError
from nsaflex.inputs import check_inputs
from nsaflex.runtime import CompiledAttention


@dataclass(frozen=True)
class HeadAssignment:
    """Which heads each rank computes (``query[j]``, ``kv[j]``) and which query
    heads it returns (``returned[j]``: empty for non-first replicas)."""

    query: tuple[tuple[int, ...], ...]
    kv: tuple[tuple[int, ...], ...]
    returned: tuple[tuple[int, ...], ...]
    replicas: int


def assign_heads(query_heads: int, kv_heads: int, world: int) -> HeadAssignment:
    """Split kv heads (with their query groups) over ``world`` ranks."""
    group = query_heads // kv_heads
    if kv_heads % world == 0:
        per_rank = kv_heads // world
        kv = tuple(tuple(range(j * per_rank, (j + 1) * per_rank)) for j in range(world))
        replicas = 1
    elif world % kv_heads == 0:
        replicas = world // kv_heads
        kv = tuple((j // replicas,) for j in range(world))
    else:
        raise InputError(
            "k",
            f"a number of kv heads that divides or is a multiple of the {world} ranks",
            kv_heads,
        )
    query = tuple(tuple(h for kv_head in heads for h in range(kv_head * group, (kv_head + 1) * group)) for heads in kv)
    returned = tuple(query[j] if j % replicas == 0 else () for j in range(world))
    return HeadAssignment(query, kv, returned, replicas)


def _pad_to(x: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - x.shape[dim]
    if missing == 0:
        return x
    pad = [0, 0] * (x.dim() - 1 - dim) + [0, missing]
    return F.pad(x, pad)


def _exchange(send: list[list[torch.Tensor]], receive_shapes: list[list[tuple[int, ...]]], group) -> list[list[torch.Tensor]]:
    """One differentiable all_to_all carrying several tensors per peer.

    ``send[j]`` goes to rank ``j``; ``receive_shapes[i]`` are the shapes that
    rank ``i`` sends here. Everything travels flattened in one buffer per peer:
    a single collective per direction keeps the backward exchanges in the same
    order on every rank (independent collectives could be run by autograd in
    different orders on different ranks and deadlock). Buffers are padded to
    one size for all peers, because gloo implements all_to_all as scatters of
    equally sized tensors.
    """
    like = send[0][0]
    sizes = [[int(torch.Size(shape).numel()) for shape in shapes] for shapes in receive_shapes]
    local_largest = max([sum(s) for s in sizes] + [sum(t.numel() for t in parts) for parts in send])
    largest = torch.tensor([local_largest], device=like.device)
    dist.all_reduce(largest, op=dist.ReduceOp.MAX, group=group)
    width = int(largest.item())
    flat_send = [F.pad(torch.cat([t.reshape(-1) for t in parts]), (0, width - sum(t.numel() for t in parts))) for parts in send]
    buffers = [like.new_empty(width) for _ in sizes]
    received = dist_fn.all_to_all(buffers, flat_send, group=group)
    out = []
    for flat, shapes, counts in zip(received, receive_shapes, sizes):
        pieces = torch.split(flat[: sum(counts)], counts)
        out.append([piece.view(shape) for piece, shape in zip(pieces, shapes)])
    return out


class SequenceParallelAttention(nn.Module):
    """Run a compiled pattern on sequence-sharded inputs across a process group.

    ``forward(q, k, v, gates=None, token_types=None)`` takes this rank's shard
    and returns this rank's shard of the output ``[B, Hq, L_r, D]``.
    """

    def __init__(self, attention: CompiledAttention, group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.attention = attention
        self.group = group

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        gates: torch.Tensor | None = None,
        token_types: torch.Tensor | None = None,
    ) -> torch.Tensor:
        pattern = self.attention.pattern
        # Shapes of the shard itself (the global length is only known after the exchange).
        check_inputs(pattern, q, k, v, gates, token_types)
        world = dist.get_world_size(self.group)
        rank = dist.get_rank(self.group)
        lengths = self._gather_lengths(q.shape[2], q.device)
        assignment = assign_heads(q.shape[1], k.shape[1], world)

        batch, query_heads, _, dim = q.shape
        longest = max(lengths)
        tensors = [q, k, v] + ([gates.to(q.dtype)] if gates is not None else [])
        head_lists = [assignment.query, assignment.kv, assignment.kv, assignment.query][: len(tensors)]
        send = [
            [_pad_to(t[:, list(heads[j])], longest, 2) for t, heads in zip(tensors, head_lists)]
            for j in range(world)
        ]
        shapes = [
            [(batch, len(heads[rank]), longest, t.shape[3]) for t, heads in zip(tensors, head_lists)]
            for _ in range(world)
        ]
        received = _exchange(send, shapes, self.group)
        # Whole sequences for this rank's heads: the shards in order, padding dropped.
        q_full, k_full, v_full, *rest = (
            torch.cat([received[i][n][:, :, : lengths[i]] for i in range(world)], dim=2) for n in range(len(tensors))
        )
        gates_full = rest[0].to(gates.dtype) if gates is not None else None
        types_full = None if token_types is None else self._gather_tokens(token_types, lengths)

        y = self.attention.run_heads(q_full, k_full, v_full, gates_full, types_full)

        # Back: each rank's shard of the sequence, for the heads this rank returns.
        own = assignment.query[rank]
        returned = y[:, [own.index(h) for h in assignment.returned[rank]]]
        send = [[_pad_to(chunk, longest, 2)] for chunk in torch.split(returned, lengths, dim=2)]
        shapes = [[(batch, len(assignment.returned[i]), longest, dim)] for i in range(world)]
        received = _exchange(send, shapes, self.group)
        stacked = torch.cat([received[i][0][:, :, : lengths[rank]] for i in range(world)], dim=1)
        # Every query head is returned by exactly one rank: permute back to 0..Hq-1.
        order = torch.tensor([h for heads in assignment.returned for h in heads], device=q.device)
        return stacked.new_zeros(batch, query_heads, lengths[rank], dim).index_copy(1, order, stacked)

    def _gather_lengths(self, length: int, device: torch.device) -> list[int]:
        world = dist.get_world_size(self.group)
        mine = torch.tensor([length], dtype=torch.long, device=device)
        every = [torch.zeros_like(mine) for _ in range(world)]
        dist.all_gather(every, mine, group=self.group)
        return [int(t.item()) for t in every]

    def _gather_tokens(self, token_types: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        padded = _pad_to(token_types, max(lengths), 1).contiguous()
        every = [torch.empty_like(padded) for _ in lengths]
        dist.all_gather(every, padded, group=self.group)
        return torch.cat([chunk[:, :length] for chunk, length in zip(every, lengths)], dim=1)
