"""Batched ``videonsa_release`` decode (``attn.decode`` of a release-mode
attention, :func:`nsaflex.decoding.decode_step` with ``release=True``): every
step equals the last row of :func:`nsaflex.reference_release.release_attention`
on the row's real tokens so far (fp32 against float64, relative 1e-5 of the
output's scale), over padded batches, text and vision queries, rows shorter and
longer than the ``P`` slots (the two shapes of the misread log-sum-exp, Q6) and
head counts with and without zero slots."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nsaflex
from nsaflex.reference_release import padded_slots, release_attention, release_pattern
from nsaflex.spec import Compression, Gate, Hybrid, Pattern, Selection, Window

DIM = 8
# (query heads, kv heads): P = 32 with 24 zero slots; P = 16 = 2 Hq (no zero slot); P = 32 over 2 kv heads, all filled.
HEADS = ((4, 2), (8, 1), (16, 2))


def release(block: int, count: int, window: int, gate: Gate = Gate(kind="mlp")) -> Pattern:
    return release_pattern(Pattern(
        name="release", compression=Compression(block=block, stride=block), selection=Selection(block=block, count=count),
        window=Window(size=window), gate=gate, hybrid=Hybrid(vision_keys="vision"),
    ))


def expected_last_rows(pattern, q, k, v, gates, types, valid, slots):
    """``[B, Hq, T, D]``: the reference's last row on each row's real tokens up to each new slot."""
    batch, heads, count = q.shape[0], q.shape[1], slots.shape[1]
    out = torch.zeros(batch, heads, count, q.shape[3], dtype=torch.float64)
    for b in range(batch):
        for i in range(count):
            real = torch.nonzero(valid[b, : int(slots[b, i]) + 1]).flatten()
            row_gates = None if gates is None else gates[b : b + 1, :, real]
            row = release_attention(q[b : b + 1, :, real], k[b : b + 1, :, real], v[b : b + 1, :, real], pattern,
                                    row_gates, types[b : b + 1, real])
            out[b, :, i] = row[0, :, -1]
    return out


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_batched_release_decode_is_the_reference_last_row(data):
    heads, kv_heads = data.draw(st.sampled_from(HEADS), label="heads")
    block = data.draw(st.sampled_from((2, 4, 8)), label="block")
    constant = data.draw(st.booleans(), label="constant gates")
    gate = Gate(kind="constant", values=(0.2, 0.5, 0.3)) if constant else Gate(kind="mlp")
    pattern = release(block, data.draw(st.integers(1, 5), label="count"), data.draw(st.integers(1, 9), label="window"), gate)
    slots_needed = padded_slots(heads, kv_heads)
    batch = data.draw(st.integers(1, 3), label="batch")
    # Rows past P tokens read one slot's lse at P rows; shorter rows read several slots.
    total = data.draw(st.integers(4, slots_needed + 12), label="cache slots")
    steps = data.draw(st.lists(st.integers(1, 3), min_size=1, max_size=4), label="steps")
    start = total - sum(steps)
    if start < 1:
        start, total = 1, 1 + sum(steps)
    seed = data.draw(st.integers(0, 2**16), label="seed")
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, total, DIM, generator=generator)
    k = torch.randn(batch, kv_heads, total, DIM, generator=generator)
    v = torch.randn(batch, kv_heads, total, DIM, generator=generator)
    gates = None if constant else torch.rand(batch, heads, total, 3, generator=generator)
    types = (torch.rand(batch, total, generator=generator) < 0.7).long()
    valid = torch.ones(batch, total, dtype=torch.bool)
    for b in range(batch):  # left padding inside the prompt, as a batched prompt has
        valid[b, : data.draw(st.integers(0, start - 1), label=f"padding {b}")] = False
    types = types * valid
    attn = nsaflex.compile(pattern, "flex", device="cpu", mode="videonsa_release", head_dim=DIM)
    state = attn.decode_state(k[:, :, :start], v[:, :, :start], torch.full((batch,), start), types[:, :start],
                              valid[:, :start], queries=q[:, :, :start])
    length = start
    for count in steps:
        length += count
        slots = length - count + torch.arange(count).expand(batch, -1)
        lengths = torch.full((batch,), length)
        step_gates = None if gates is None else gates[:, :, length - count : length]
        out = attn.decode(q[:, :, length - count : length], k[:, :, :length], v[:, :, :length], lengths, state,
                          step_gates, types[:, length - count : length])
        expected = expected_last_rows(pattern, q.double(), k.double(), v.double(), None if gates is None else gates.double(),
                                      types, valid, slots)
        scale = float(expected.abs().max())
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5 * scale)


def test_release_state_needs_the_cached_queries():
    attn = nsaflex.compile(release(4, 2, 3), "flex", device="cpu", mode="videonsa_release", head_dim=DIM)
    k = torch.zeros(1, 2, 6, DIM)
    with pytest.raises(nsaflex.errors.InputError, match="queries"):
        attn.decode_state(k, k, torch.tensor([6]), torch.ones(1, 6, dtype=torch.long))


def test_adapter_release_generation_through_the_batched_entry_equals_the_exact_path(monkeypatch):
    """The Qwen2.5-VL adapter in release mode on FlexAttention: greedy tokens and
    the generated logits through the batched release decode equal those of the
    exact per-row path, on a left-padded batch of vision and text rows."""
    import nsaflex.adapters.decode as decode_module
    from nsaflex.adapters.qwen2_5_vl import apply
    from tests.adapter_support import IMAGE, make_batch, tiny_model

    model = tiny_model()
    pattern = release(block=4, count=2, window=4)
    adapter = apply(model, pattern, "flex", mode="videonsa_release")
    with torch.no_grad():
        for parameter in adapter.gate_parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(2)) * 0.2)
    ids, mask, _ = make_batch([[(3, 15)], [(2, 7)]], [19, 11], 19, left_pad=True, seed=4)
    batched_steps = []
    original = decode_module.release_batched
    monkeypatch.setattr(decode_module, "release_batched", lambda *args: batched_steps.append(1) or original(*args))

    def generate():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
        return out.sequences[:, ids.shape[1] :], torch.stack(out.logits)

    tokens, logits = generate()
    assert batched_steps, "the release steps did not take the batched entry"
    monkeypatch.setattr(decode_module, "takes_batched_release", lambda *args: False)
    exact_tokens, exact_logits = generate()
    assert torch.equal(tokens, exact_tokens)
    torch.testing.assert_close(logits, exact_logits, rtol=1e-4, atol=1e-4)
    assert (ids == IMAGE).any()
