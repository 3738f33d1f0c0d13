"""benchmarks/adapter_layer.py: its ``release-stack`` baseline (the released
VideoNSA kernel stack: FlexAttention compression, fla-core's top-n and selection
kernels) against :mod:`nsaflex.reference_release`, on the CPU under
``TRITON_INTERPRET=1``, and its ``--profile`` summary (operators, the patched attention's times)."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path

import pytest
import torch

from nsaflex.loader import load_pattern
from nsaflex.reference_release import release_attention, release_pattern
from nsaflex.spec import Compression, Gate, Hybrid, Model, Pattern, Selection, Window

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_script():
    spec = importlib.util.spec_from_file_location("benchmark_adapter_layer", BENCHMARKS / "adapter_layer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    module = load_script()
    reason = module.release_stack_unavailable("cpu")
    if reason is not None:
        pytest.skip(reason)
    module.pin_fla_autotune()
    return module


def pattern(block: int = 16, count: int = 4, window: int = 8) -> Pattern:
    return release_pattern(Pattern(
        name="release-stack", compression=Compression(block=block, stride=block),
        selection=Selection(block=block, count=count), window=Window(size=window),
        gate=Gate(kind="mlp", temperature=0.3), hybrid=Hybrid(vision_keys="vision"),
    ))


def test_skip_reason_names_what_is_missing(monkeypatch):
    module = load_script()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reason = module.release_stack_unavailable("cpu")
    assert reason == "fla's Triton kernels need CUDA, or TRITON_INTERPRET=1 on the CPU"


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="fla's Triton kernels run on the CPU only interpreted")
@pytest.mark.parametrize("length, compared", [(40, 40), (100, 48)])
def test_release_stack_is_the_release_reference(script, length, compared):
    """fp32 against the float64 reference, relative 1e-5 of the output's scale.
    fla-core 0.6.0's top-n forces blocks 0, c - 1 and c (the release's forced c
    only): rows of the first three blocks (t < 48) have no other candidates, so
    they agree for any count; at L = 40 every row does."""
    torch.manual_seed(length)
    heads, kv_heads, dim = 4, 2, 16
    q = torch.randn(1, heads, length, dim)
    k, v = torch.randn(1, kv_heads, length, dim), torch.randn(1, kv_heads, length, dim)
    gates = torch.rand(1, heads, length, 3)
    types = torch.ones(1, length, dtype=torch.long)
    types[:, :5] = 0
    types[:, length - 7 :] = 0
    chosen = pattern()
    attention = script.ReleaseStackAttention(chosen, compiled=None)
    out = attention(q, k, v, gates, types)
    expected = release_attention(q, k, v, chosen, gates, types)
    scale = float(expected.abs().max())
    torch.testing.assert_close(out[:, :, :compared].double(), expected[:, :, :compared], rtol=1e-5, atol=1e-5 * scale)


def test_release_stack_refuses_padding(script):
    from nsaflex.errors import InputError

    attention = script.ReleaseStackAttention(pattern(), compiled=None)
    q = torch.zeros(1, 4, 8, 16)
    with pytest.raises(InputError, match="lengths"):
        attention(q, q[:, :2], q[:, :2], None, torch.ones(1, 8, dtype=torch.long), lengths=torch.tensor([6]))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="fla's Triton kernels run on the CPU only interpreted")
def test_release_stack_ranks_the_misread_lse(script):
    """The block the top-n picks besides fla-core's forced ones (0, c - 1, c) is
    the best earlier block by the release's score: ``sum_g exp(q_g . Kc_j * scale
    - lse_read[t, g])`` with the compression log-sum-exp ``[P, T]`` read as ``[T, P]`` (Q6)."""
    from nsaflex.reference_release import padded_slots, release_compression

    torch.manual_seed(3)
    # 16 heads over 2 kv heads fill all 32 slots: no kv head of zero slots only, whose blocks all tie.
    heads, kv_heads, dim, length, block = 16, 2, 16, 100, 16
    q = torch.randn(1, heads, length, dim)
    k, v = torch.randn(1, kv_heads, length, dim), torch.randn(1, kv_heads, length, dim)
    types = torch.ones(1, length, dtype=torch.long)
    attention = script.ReleaseStackAttention(pattern(block=block), compiled=None)
    attention(q, k, v, torch.rand(1, heads, length, 3), types)
    slots = padded_slots(heads, kv_heads)
    group = slots // kv_heads
    qp = torch.cat([q[0], q[0], q.new_zeros(slots - 2 * heads, length, dim)]).double()
    kc = release_compression(k[0].double(), block).repeat_interleave(group, dim=0)  # [P, N, D]
    logits = torch.einsum("std,snd->stn", qp, kc) * dim**-0.5
    visible = (torch.arange(kc.shape[1]) * block + block - 1)[None, :] >= torch.arange(length)[:, None]
    lse = torch.logsumexp(logits.masked_fill(~visible, float("-inf")), dim=-1)  # [P, T]
    lse_read = lse.reshape(length, slots).t()  # Q6
    scores = torch.exp(logits - lse_read[:, :, None]).view(kv_heads, group, length, -1).sum(dim=1)  # [Hkv, T, N]
    for t in range(4 * block, length):
        current = t // block
        for h in range(kv_heads):
            free = scores[h, t, 1 : current - 1].argmax().item() + 1
            picked = set(attention.last_indices[0, t, h].tolist()) - {-1}
            assert picked == {0, current - 1, current, free}, (t, h)


def test_profile_keeps_the_operators_with_the_most_self_time():
    """``--profile N``: a measurement of the tiny layer (CPU, reference backend)
    carries the N operators with the most self time in one more call, most
    first, each with its name, milliseconds and call count."""
    module = load_script()
    model = module.build_model(True, "cpu", torch.float32)
    inputs = module.make_inputs(64, 8, "cpu")
    result = module.measure(model, inputs, "cpu", True, 0, 1, profile=5)
    ops = result["top_ops"]
    assert len(ops) == 5 and all(set(op) == {"name", "ms", "calls"} for op in ops)
    assert [op["ms"] for op in ops] == sorted((op["ms"] for op in ops), reverse=True) and ops[0]["ms"] > 0
    assert result["attention"] == {"calls": 0, "host_ms": 0.0}  # unpatched: no nsaflex range
    assert "top_ops" not in module.measure(model, inputs, "cpu", False, 0, 1)


def test_profile_times_the_patched_attention():
    """``--profile``'s ``attention``: the adapter's attention ranges of the
    profiled call, one per patched layer and call (a forward+backward's
    backward adds none), with their host time (CPU: no device span)."""
    module = load_script()
    model = module.build_model(True, "cpu", torch.float32, layers=2)
    module.adapter_module.apply(model, dataclasses.replace(load_pattern("videonsa"), model=Model(), layers=()),
                                backend="reference")
    inputs = module.make_inputs(64, 8, "cpu")
    for backward in (False, True):
        attention = module.measure(model, inputs, "cpu", backward, 0, 1, profile=3)["attention"]
        assert set(attention) == {"calls", "host_ms"} and attention["calls"] == 2 and attention["host_ms"] > 0
