"""The operator launches of one batched decode step (:mod:`nsaflex.decoding`).

A decode step of one layer works on a few thousand keys per head: each op is
tiny on a GPU, so the host's dispatch of the ops is the step's cost. These
tests count the top-level aten ops of one steady-state step (after a first
step, which also builds the state's constants) with ``torch.profiler`` on the
CPU, for VideoNSA's shapes (28 query heads over 4 kv heads, head dim 128, a
16K-token context, vision tokens only: ``has_text=False``), and bound them:
the count does not depend on the context length, so a change that adds ops
to the step shows here before it shows in a GPU timing.
"""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import nsaflex

# The step's top-level aten ops, with a margin of a few ops for library versions.
FAITHFUL_STEP_OPS = 79
RELEASE_STEP_OPS = 165

BATCH, QUERY_HEADS, KV_HEADS, DIM, CONTEXT = 1, 28, 4, 128, 16384


def top_level_ops(run) -> list[str]:
    """The names of the aten ops ``run()`` dispatches that no other aten op called."""
    with profile(activities=[ProfilerActivity.CPU]) as trace:
        run()
    return [event.name for event in trace.events() if event.name.startswith("aten::")
            and (event.cpu_parent is None or not event.cpu_parent.name.startswith("aten::"))]


def step_ops(attn, release: bool = False) -> list[str]:
    """The top-level ops of the second decode step after a VideoNSA-sized prefix."""
    generator = torch.Generator().manual_seed(0)
    slots = CONTEXT + 64
    k = torch.randn(BATCH, KV_HEADS, slots, DIM, generator=generator)
    v = torch.randn(BATCH, KV_HEADS, slots, DIM, generator=generator)
    types = torch.ones(BATCH, slots, dtype=torch.long)
    types[:, :200] = 0  # a text prompt before the video
    lengths = torch.full((BATCH,), CONTEXT)
    queries = torch.randn(BATCH, QUERY_HEADS, slots, DIM, generator=generator) if release else None
    state = attn.decode_state(k, v, lengths, types, queries=queries)
    q = torch.randn(BATCH, QUERY_HEADS, 1, DIM, generator=generator)
    gates = torch.rand(BATCH, QUERY_HEADS, 1, 3, generator=generator)
    first, second = lengths + 1, lengths + 2
    attn.decode(q, k, v, first, state, gates, types[:, CONTEXT : CONTEXT + 1], has_text=False)
    return top_level_ops(lambda: attn.decode(q, k, v, second, state, gates, types[:, CONTEXT + 1 : CONTEXT + 2],
                                             has_text=False))


@pytest.mark.parametrize("backend", ["flex", "triton"])
def test_a_faithful_decode_step_stays_within_its_op_count(backend, monkeypatch):
    """Faithful mode (both backends share the batched decode): at most
    FAITHFUL_STEP_OPS top-level ops (the step before the batched gather of
    selection and window and the state's constants took 244)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    attn = nsaflex.compile("videonsa", backend=backend)
    ops = step_ops(attn)
    assert len(ops) <= FAITHFUL_STEP_OPS, sorted(ops)


def test_a_release_decode_step_stays_within_its_op_count():
    """``videonsa_release`` mode: at most RELEASE_STEP_OPS top-level ops (419
    before selection and window shared one gathered candidate list and the
    slots' block scores one sum)."""
    attn = nsaflex.compile("videonsa-release", backend="flex", mode="videonsa_release")
    ops = step_ops(attn, release=True)
    assert len(ops) <= RELEASE_STEP_OPS, sorted(ops)
