"""Sequence parallelism on the gloo backend: 2 and 4 CPU processes against the
single-process run, outputs and gradients, for lengths that do not split evenly.

The attention runs on the float64 reference backend with float64 inputs, so
the only differences are floating-point reorderings: 1e-10 absolute.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import nsaflex
from nsaflex.distributed import SequenceParallelAttention, assign_heads
from nsaflex.errors import InputError
from nsaflex.spec import Compression, Gate, Hybrid, Pattern, Selection, Window

TOLERANCE = 1e-10

PATTERN = Pattern(
    name="sp",
    compression=Compression(block=4, stride=2),
    selection=Selection(block=4, count=2, forced=("first", "current")),
    window=Window(size=5),
    gate=Gate(kind="linear"),
    hybrid=Hybrid(vision_keys="vision"),
)

# (query heads, kv heads, length): kv heads split across ranks, replicated (fewer
# kv heads than ranks), G = 7 as in Qwen2.5-VL, lengths not divisible by the world.
CASES = [(8, 4, 23), (6, 2, 19), (7, 1, 30)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inputs(query_heads: int, kv_heads: int, length: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    shape = (2, query_heads, length, 8)
    q = torch.randn(*shape, generator=generator, dtype=torch.float64)
    k = torch.randn(2, kv_heads, length, 8, generator=generator, dtype=torch.float64)
    v = torch.randn(2, kv_heads, length, 8, generator=generator, dtype=torch.float64)
    gates = torch.rand(2, query_heads, length, 3, generator=generator, dtype=torch.float64)
    types = (torch.rand(2, length, generator=generator) < 0.7).long()
    types[1, :4] = 0  # a text prefix in one row only: rows differ
    return q, k, v, gates, types


def _worker(rank: int, world: int, port: int, results: dict) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        attention = nsaflex.compile(PATTERN, backend="reference")
        parallel = SequenceParallelAttention(attention)
        for case, (query_heads, kv_heads, length) in enumerate(CASES):
            q, k, v, gates, types = _inputs(query_heads, kv_heads, length, seed=case)
            upstream = torch.randn(2, query_heads, length, 8, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
            shards = [torch.tensor_split(t, world, dim=2)[rank] for t in (q, k, v, gates)]
            shards = [t.clone().requires_grad_() for t in shards]
            local_types = torch.tensor_split(types, world, dim=1)[rank]
            out = parallel(*shards, token_types=local_types)
            local_upstream = torch.tensor_split(upstream, world, dim=2)[rank]
            (out * local_upstream).sum().backward()
            results[(world, case, rank)] = (out.detach(), *(t.grad for t in shards))
    finally:
        dist.destroy_process_group()


def _run(world: int) -> dict:
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_worker, args=(world, _free_port(), results), nprocs=world, join=True)
    return dict(results)


@pytest.mark.parametrize("world", [2, 4])
def test_sequence_parallel_matches_single_process(world):
    results = _run(world)
    attention = nsaflex.compile(PATTERN, backend="reference")
    for case, (query_heads, kv_heads, length) in enumerate(CASES):
        q, k, v, gates, types = (t.clone() for t in _inputs(query_heads, kv_heads, length, seed=case))
        for t in (q, k, v, gates):
            t.requires_grad_()
        upstream = torch.randn(2, query_heads, length, 8, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
        out = attention(q, k, v, gates, types)
        (out * upstream).sum().backward()
        expected = (out.detach(), q.grad, k.grad, v.grad, gates.grad)
        for index, name in enumerate(("out", "dq", "dk", "dv", "dgates")):
            pieces = torch.cat([results[(world, case, rank)][index] for rank in range(world)], dim=2)
            error = (pieces - expected[index]).abs().max().item()
            assert error <= TOLERANCE, f"world {world}, case {case}: {name} differs by {error}"


def test_head_assignment():
    split = assign_heads(28, 4, 2)
    assert split.query == (tuple(range(14)), tuple(range(14, 28))) and split.kv == ((0, 1), (2, 3))
    replicated = assign_heads(28, 4, 8)
    assert replicated.kv[0] == replicated.kv[1] == (0,) and replicated.replicas == 2
    assert replicated.returned[1] == () and sorted(h for r in replicated.returned for h in r) == list(range(28))
    with pytest.raises(InputError, match="^k: expected a number of kv heads that divides or is a multiple of the 3 ranks, found 4"):
        assign_heads(28, 4, 3)
