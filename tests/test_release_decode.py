"""Batched ``videonsa_release`` decode (``attn.decode`` of a release-mode
attention, :func:`nsaflex.decoding.decode_step` with ``release=True``): every
step equals the last row of :func:`nsaflex.reference_release.release_attention`
on the row's real tokens so far (fp32 against float64, relative 1e-5 of the
output's scale), over padded batches, text and vision queries, rows shorter and
longer than the ``P`` slots (the two shapes of the misread log-sum-exp, Q6) and
head counts with and without zero slots, steps of one new token or several,
and the exact ties of text tokens' block scores (Q5)."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nsaflex
from nsaflex import decoding
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


def decodes_as_the_reference(pattern: Pattern, heads: int, kv_heads: int, batch: int, total: int, steps: list[int],
                              seed: int, padding: list[int], generated_text: bool = False) -> None:
    """Decode ``steps`` (new tokens per step) after a prompt of ``total -
    sum(steps)`` slots (row ``b`` left-padded by ``padding[b]``; 70% vision
    tokens, and with ``generated_text`` the steps' tokens text, as generation
    appends), each step's outputs against :func:`expected_last_rows` (fp32
    against float64: relative 1e-5 of the output's scale)."""
    start = total - sum(steps)
    constant = pattern.gate.kind == "constant"
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, total, DIM, generator=generator)
    k = torch.randn(batch, kv_heads, total, DIM, generator=generator)
    v = torch.randn(batch, kv_heads, total, DIM, generator=generator)
    gates = None if constant else torch.rand(batch, heads, total, 3, generator=generator)
    types = (torch.rand(batch, total, generator=generator) < 0.7).long()
    if generated_text:
        types[:, start:] = 0
    valid = torch.ones(batch, total, dtype=torch.bool)
    for b in range(batch):  # left padding inside the prompt, as a batched prompt has
        valid[b, : padding[b]] = False
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


def draw_release_case(data, steps: st.SearchStrategy[list[int]],
                      generated_text: bool = False) -> tuple[int, int, list[int], list[int]]:
    """Draw a pattern, heads, a padded batch and the ``steps`` of a decode, and
    check it against the reference (:func:`decodes_as_the_reference`). Returns
    the block size, the cache slots, the steps and the rows' padding."""
    heads, kv_heads = data.draw(st.sampled_from(HEADS), label="heads")
    block = data.draw(st.sampled_from((2, 4, 8)), label="block")
    constant = data.draw(st.booleans(), label="constant gates")
    gate = Gate(kind="constant", values=(0.2, 0.5, 0.3)) if constant else Gate(kind="mlp")
    pattern = release(block, data.draw(st.integers(1, 5), label="count"), data.draw(st.integers(1, 9), label="window"), gate)
    batch = data.draw(st.integers(1, 3), label="batch")
    # Rows past P tokens read one slot's lse at P rows; shorter rows read several slots.
    total = data.draw(st.integers(4, padded_slots(heads, kv_heads) + 12), label="cache slots")
    drawn = data.draw(steps, label="steps")
    start = total - sum(drawn)
    if start < 1:
        start, total = 1, 1 + sum(drawn)
    seed = data.draw(st.integers(0, 2**16), label="seed")
    padding = [data.draw(st.integers(0, start - 1), label=f"padding {b}") for b in range(batch)]
    decodes_as_the_reference(pattern, heads, kv_heads, batch, total, drawn, seed, padding, generated_text)
    return block, total, drawn, padding


RELEASE_SETTINGS = settings(max_examples=12, deadline=None,
                            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@RELEASE_SETTINGS
@given(data=st.data())
def test_batched_release_decode_is_the_reference_last_row(data):
    draw_release_case(data, st.lists(st.integers(1, 3), min_size=1, max_size=4))


@st.composite
def steps_with_a_multi_token_step(draw) -> list[int]:
    """Steps of 1 to 3 new tokens, one of them (at a drawn place) of 2 or 3."""
    steps = draw(st.lists(st.integers(1, 3), max_size=3))
    steps.insert(draw(st.integers(0, len(steps))), draw(st.integers(2, 3)))
    return steps


@RELEASE_SETTINGS
@given(data=st.data())
def test_multi_token_release_steps_are_the_reference_last_rows(data):
    """A step appending several tokens gives each the last row of its own
    prefix, as one token per step would."""
    draw_release_case(data, steps_with_a_multi_token_step())


@RELEASE_SETTINGS
@given(data=st.data())
def test_generated_text_tokens_rank_their_earlier_blocks_as_exact_ties(data):
    """A text token's query is zeroed (Q3): every earlier block scores
    exp(0 - lse) per slot, an exact tie that the reference breaks to the
    lowest blocks (Q5). The block scores a step ranks
    (:func:`nsaflex.decoding._top_blocks`) keep those ties bit-equal, in steps
    of one token or several, else a later block wins wherever the rounding
    favours it."""
    keys = []

    def recording(state, key, take, missing=False):
        keys.append(key.clone())  # [B, Hkv, 1, T, N + 1]
        return top_blocks(state, key, take, missing)

    top_blocks = decoding._top_blocks
    with mock.patch.object(decoding, "_top_blocks", recording):
        block, total, steps, padding = draw_release_case(data, steps_with_a_multi_token_step(), generated_text=True)
    assert len(keys) == len(steps)
    length = total - sum(steps)
    for key, count in zip(keys, steps):
        for b, pad in enumerate(padding):
            for t in range(count):
                earlier = key[b, :, 0, t, : (length + t - pad) // block]  # the row's sparse position // block
                assert torch.equal(earlier, earlier[:, :1].expand_as(earlier)), (count, t, earlier)
        length += count


@pytest.mark.parametrize(("heads", "window", "total", "steps", "seed", "generated_text"), [
    ((4, 2), 1, 19, [2], 1, False),  # a vision token, then a text one, in one step
    ((4, 2), 2, 19, [2], 1, False),
    ((4, 2), 3, 19, [2], 1, False),
    ((8, 1), 3, 35, [1], 0, True),  # one text token after 17 blocks
    ((16, 2), 3, 36, [1, 1, 1], 0, True),
])
def test_text_tokens_take_the_lowest_tied_blocks(heads, window, total, steps, seed, generated_text):
    """A text token's zeroed query scores every earlier block exp(0 - lse)
    per slot, an exact tie that the reference breaks to the lowest block. The
    slots' sum must be bit-equal across the blocks for that (a sum over a dim
    that is not the innermost one rounds some of them differently, here in a
    step of two tokens or a row of many blocks, and the tie goes to a later
    block)."""
    decodes_as_the_reference(release(block=2, count=2, window=window), heads=heads[0], kv_heads=heads[1], batch=1,
                             total=total, steps=steps, seed=seed, padding=[0], generated_text=generated_text)


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
