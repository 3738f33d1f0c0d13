"""The Qwen2.5-VL adapter under sequence parallelism (gloo, 2 CPU processes):
each rank runs the model on its shard of the sequence with the shard's
position ids; the logits and the gradients of the gate parameters equal the
single-process run (float64 model, reference backend: reorderings only). A
deep copy of the sharded model shares its process group and runs the same."""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nsaflex.adapters.qwen2_5_vl import AdapterError, apply
from tests.adapter_support import make_batch, small_pattern, tiny_model

TOLERANCE = 1e-9
LENGTH = 37  # not a multiple of the 2 ranks nor of the pattern's blocks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _setup():
    model = tiny_model(layers=2, heads=4, kv_heads=2, dtype=torch.float64)
    pattern = small_pattern()
    ids, _, mm = make_batch([[(3, 30)], [(1, 12), (20, 35)]], [LENGTH, LENGTH], LENGTH, left_pad=False)
    positions = torch.arange(LENGTH).expand(2, LENGTH)
    return model, pattern, ids, mm, positions


def _gate_grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if ".g_proj" in name}


def _worker(rank: int, world: int, port: int, results: dict) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, pattern, ids, mm, positions = _setup()
        apply(model, pattern, backend="reference", process_group=dist.group.WORLD)
        twin = copy.deepcopy(model)  # a process group cannot be copied: the copy must share it
        shard = torch.tensor_split(torch.arange(LENGTH), world)[rank]
        inputs = dict(input_ids=ids[:, shard], mm_token_type_ids=mm[:, shard], position_ids=positions[:, shard], use_cache=False)
        out = model(**inputs)
        with torch.no_grad():
            twin_logits = twin(**inputs).logits
        out.logits.sum().backward()
        grads = _gate_grads(model)
        for tensor in grads.values():
            dist.all_reduce(tensor)  # each rank's gates saw its own tokens only
        results[rank] = (out.logits.detach(), grads, twin_logits)
    finally:
        dist.destroy_process_group()


def test_sharded_model_matches_single_process():
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_worker, args=(2, _free_port(), results), nprocs=2, join=True)
    model, pattern, ids, mm, positions = _setup()
    apply(model, pattern, backend="reference")
    out = model(input_ids=ids, mm_token_type_ids=mm, position_ids=positions, use_cache=False)
    out.logits.sum().backward()
    expected = _gate_grads(model)
    sharded = torch.cat([results[0][0], results[1][0]], dim=1)
    assert all(torch.equal(results[rank][2], results[rank][0]) for rank in (0, 1))
    assert (sharded - out.logits.detach()).abs().max().item() <= TOLERANCE
    for name, grad in expected.items():
        assert (results[0][1][name] - grad).abs().max().item() <= TOLERANCE * max(1.0, grad.abs().max().item()), name


def test_sharded_refuses_padding_decode_and_release_mode():
    from nsaflex.reference_release import release_pattern

    model, pattern, ids, mm, positions = _setup()
    with pytest.raises(AdapterError, match="^process_group: expected None in mode 'videonsa_release'"):
        apply(model, release_pattern(pattern), backend="reference", mode="videonsa_release", process_group=object())
    # The refusals come before any collective, so a stand-in group is enough here.
    apply(model, pattern, backend="reference", process_group=object())
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with pytest.raises(AdapterError, match="found a padding mask"):
        model(input_ids=ids, attention_mask=mask, mm_token_type_ids=mm, use_cache=False)
