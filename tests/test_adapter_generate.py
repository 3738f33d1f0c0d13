"""Decoding with the Qwen2.5-VL adapter: ``generate()`` against a step-by-step
evaluation with the reference, chunked decoding over a cache, the decode
step itself against the reference's last row on every prefix, and the batched
decode entry (flex backend) against the exact per-row path (reference
backend) and the unpatched model: tokens, logits and mrope positions.

The flex runs use a float64 model: FlexAttention then takes its eager dense
evaluation (no compile), and the batched decode computes in float64, so the
two paths agree to float64 rounding; ``generate`` hands back float32 logits,
compared to 1e-6 (a few float32 roundings of values of order 1-10). The
batched decode in float32 is checked against the reference in
tests/test_decoding.py."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nsaflex.adapters.decode import LayerDecodeCache, decode_attention
from nsaflex.adapters.qwen2_5_vl import apply
from nsaflex.pooling import MLPPooling
from nsaflex.reference import reference_attention
from nsaflex.spec import Compression, Gate, Hybrid, LayerOverride, Pattern, Selection, Window
from tests.adapter_support import (
    IMAGE,
    ScratchModel,
    make_batch,
    poolers_of,
    scratch_generate,
    small_pattern,
    takes_mm_token_type_ids,
    tiny_model,
)
from tests.strategies import patterns as random_patterns

STEPS = 6


def sparse_patterns():
    """Patterns whose decode steps run the sparse branches (no hybrid section:
    every generated token is sparse), crossing block boundaries while decoding."""
    overlap = Pattern(
        name="overlap",
        compression=Compression(block=4, stride=2),
        selection=Selection(block=4, count=2, forced=("first", "current")),
        window=Window(size=3),
        gate=Gate(kind="mlp", temperature=0.5),
    )
    return {
        "overlap": overlap,
        "query-block": dataclasses.replace(
            overlap, selection=Selection(block=8, count=2, granularity="query_block", query_block=4, scoring="head")
        ),
        "legacy": dataclasses.replace(overlap, compression=Compression(block=4, stride=4, visibility="videonsa_legacy")),
        "mlp-pooling": dataclasses.replace(overlap, compression=Compression(block=4, stride=2, pooling="mlp")),
        "constant-window-only": Pattern(name="w", window=Window(size=5), gate=Gate(kind="constant", values=(1.0,))),
        "overrides": dataclasses.replace(
            overlap, layers=(LayerOverride(at=(0,), remove=("window",)), LayerOverride(at=(1,), dense=True))
        ),
        "hybrid-all": dataclasses.replace(overlap, hybrid=Hybrid(vision_keys="all")),
    }


def randomise(adapter, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in adapter.gate_parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)


def generated(model, ids, mask, mm=None, steps=STEPS):
    out = model.generate(
        input_ids=ids, attention_mask=mask, mm_token_type_ids=mm, max_new_tokens=steps, do_sample=False
    )
    tokens = out[:, ids.shape[1] :]
    if tokens.shape[1] < steps:  # every row stopped early
        tokens = torch.cat([tokens, torch.full((ids.shape[0], steps - tokens.shape[1]), 2)], dim=1)
    return tokens


def test_generate_hybrid_matches_step_by_step_reference():
    """VideoNSA-like pattern, mixed vision spans, left padding: the prompt's
    vision tokens are sparse, generated text tokens dense over the cache."""
    model = tiny_model()
    pattern = small_pattern()
    adapter = apply(model, pattern, backend="reference")
    randomise(adapter, seed=2)
    ids, mask, mm = make_batch([[(3, 20)], [(2, 9), (14, 30)], []], [26, 34, 12], 36, left_pad=True)
    if not takes_mm_token_type_ids(model):
        mm = None  # transformers 4.57: classes from the token ids
    expected = scratch_generate(model, pattern, ids, mask, (ids == IMAGE).long() * mask, STEPS, text_only_new=mm is not None)
    assert torch.equal(generated(model, ids, mask, mm), expected)


@pytest.mark.parametrize("name", list(sparse_patterns()))
def test_generate_sparse_decode_matches_step_by_step_reference(name):
    pattern = sparse_patterns()[name]
    model = tiny_model()
    adapter = apply(model, pattern, backend="reference")
    randomise(adapter, seed=4)
    ids, mask, mm = make_batch([[(4, 12)], [], [(1, 5)]], [17, 21, 9], 21, left_pad=True, seed=3)
    types = (ids == IMAGE).long() * mask
    expected = scratch_generate(model, pattern, ids, mask, types, STEPS, poolers=poolers_of(adapter), text_only_new=False)
    # no mm_token_type_ids: classes come from the image token ids, generated tokens included
    assert torch.equal(generated(model, ids, mask), expected)


def cache_keyword(model):
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def returned_cache(output):
    for name in ("cache", "past_key_values"):
        value = getattr(output, name, None)
        if value is not None:
            return value
    raise AssertionError("no cache returned")


CHUNKED = {
    "videonsa-like": small_pattern(),
    "query-block": sparse_patterns()["query-block"],
    # text chunks go to the original attention but still count in their query tiles
    "query-block-hybrid-all": dataclasses.replace(sparse_patterns()["query-block"], hybrid=Hybrid(vision_keys="all")),
}


@pytest.mark.parametrize("backend", ["reference", "flex"])
@pytest.mark.parametrize("name", list(CHUNKED))
def test_chunked_decode_over_cache_matches_reference(name, backend):
    """A prompt, then chunks of several tokens (vision ones too) fed with the cache:
    each new token gets the reference's last row on the sequence so far. On
    flex the chunks go through the batched decode entry (several new tokens,
    text and vision mixed; query tiles summed across chunks), except the
    query_block tiles of a vision_keys 'all' pattern (the exact path)."""
    pattern = CHUNKED[name]
    model = tiny_model(dtype=torch.float64 if backend == "flex" else torch.float32)
    adapter = apply(model, pattern, backend=backend)
    batched = pattern.selection.granularity == "token" or pattern.hybrid is None
    assert all(("batched decode entry" in path) == (batched and backend == "flex") for path in (r["decode"] for r in adapter.describe()))
    randomise(adapter, seed=5)
    ids, _, _ = make_batch([[(5, 14), (20, 27)]], [30], 30, seed=9)
    types = (ids == IMAGE).long()
    scratch = ScratchModel(model, pattern, poolers=poolers_of(adapter))
    keyword = cache_keyword(model)
    cache = None
    for start, end in ((0, 11), (11, 12), (12, 18), (18, 19), (19, 30)):
        with torch.no_grad():
            positions = torch.arange(start, end)[None]  # transformers 4.57 restarts them without cache_position
            extra = {keyword: cache} if cache is not None else {}
            out = model(input_ids=ids[:, start:end], position_ids=positions, use_cache=True, **extra)
        cache = returned_cache(out)
        expected = torch.cat([scratch.step(ids[0, t : t + 1], types[0, t : t + 1]) for t in range(start, end)])
        torch.testing.assert_close(out.logits[0], expected, rtol=0, atol=1e-5)


# --- the decode step against the reference ------------------------------------------------------

DECODE = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def prefix_reference(pattern, q, k, v, gates, types, valid, t, pooler):
    """Last row of the reference on the real tokens of ``[0, t]``, per batch row."""
    rows = []
    for b in range(q.shape[0]):
        real = torch.nonzero(valid[b, : t + 1]).flatten()
        if not bool(valid[b, t]):
            rows.append(torch.zeros(q.shape[1], q.shape[3], dtype=torch.float64))
            continue
        out = reference_attention(
            q[b : b + 1, :, real], k[b : b + 1, :, real], v[b : b + 1, :, real], pattern,
            None if gates is None else gates[b : b + 1, :, real],
            None if pattern.hybrid is None else types[b : b + 1, real], pooler,
        )
        rows.append(out[0, :, -1])
    return torch.stack(rows)


def decode_inputs(pattern, data, batch=2, kv_heads=2, group=2, dim=8):
    length = data.draw(st.integers(1, 24), label="length")
    heads = kv_heads * group
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    q, k, v = randn(batch, heads, length, dim), randn(batch, kv_heads, length, dim), randn(batch, kv_heads, length, dim)
    gates = None if pattern.gate.kind == "constant" else torch.rand(batch, heads, length, len(pattern.branches), generator=generator, dtype=torch.float64)
    types = (torch.rand(batch, length, generator=generator) < 0.6).long()
    pad = [data.draw(st.integers(0, length - 1), label="left padding") for _ in range(batch)]
    valid = torch.ones(batch, length, dtype=torch.bool)
    for b, n in enumerate(pad):
        valid[b, :n] = False
    pooler = None
    if pattern.compression is not None and pattern.compression.pooling == "mlp":
        pooler = MLPPooling(pattern.compression, dim).double()
    return q, k, v, gates, types, valid, pooler


@DECODE
@given(pattern=random_patterns(small=True, allow_layers=False, allow_budget=False, allow_model=False), data=st.data())
def test_decode_step_is_reference_last_row(pattern, data):
    q, k, v, gates, types, valid, pooler = decode_inputs(pattern, data)
    cache = LayerDecodeCache()
    for t in range(q.shape[2]):
        out = decode_attention(
            pattern, q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1],
            None if gates is None else gates[:, :, t : t + 1], types[:, : t + 1], valid[:, : t + 1], t, cache,
            pooler=pooler, dtype=torch.float64,
        )
        expected = prefix_reference(pattern, q, k, v, gates, types, valid, t, pooler)
        torch.testing.assert_close(out[:, :, 0], expected, rtol=0, atol=1e-10)


def test_compressed_tokens_follow_a_reordered_cache():
    """Beam search reorders cache rows: the kept compressed tokens are checked
    against the cached keys at every step and rebuilt when they differ."""
    pattern = sparse_patterns()["overlap"]
    torch.manual_seed(0)
    batch, heads, kv_heads, length, dim = 2, 4, 2, 20, 8
    q = torch.randn(batch, heads, length, dim, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, length, dim, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, length, dim, dtype=torch.float64)
    gates = torch.rand(batch, heads, length, 3, dtype=torch.float64)
    cache = LayerDecodeCache()
    valid = torch.ones(batch, length, dtype=torch.bool)
    for t in range(length):
        if t == 12:  # swap the rows: the kept compressed tokens no longer match
            q, k, v, gates = q.flip(0), k.flip(0), v.flip(0), gates.flip(0)
        out = decode_attention(pattern, q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], gates[:, :, t : t + 1], None, None, t, cache, dtype=torch.float64)
        expected = prefix_reference(pattern, q, k, v, gates, None, valid, t, None)
        torch.testing.assert_close(out[:, :, 0], expected, rtol=0, atol=1e-10)
    assert cache.rows[0].cmp_k.shape[1] == pattern.compression.num_tokens(length)


# --- the batched decode entry against the exact path and the unpatched model ---------------------------

BATCHED = {"videonsa-like": small_pattern(), **sparse_patterns()}


def greedy(model, steps=STEPS, **inputs):
    """Greedy tokens ``[B, steps]`` and the logits of every step ``[steps, B, V]`` (float32)."""
    out = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                         output_logits=True, return_dict_in_generate=True)
    return out.sequences[:, -steps:], torch.stack(out.logits)


@pytest.mark.parametrize("name", list(BATCHED))
def test_batched_decode_generates_what_the_exact_path_does(name):
    """Left-padded rows of different lengths; classes from the token ids, so a
    generated image token decodes sparse. The flex adapter decodes through the
    batched entry, the reference adapter through the exact per-row path."""
    pattern = BATCHED[name]
    ids, mask, _ = make_batch([[(4, 12)], [], [(1, 5)]], [17, 21, 9], 21, left_pad=True, seed=3)
    runs = {}
    for backend in ("reference", "flex"):
        model = tiny_model(dtype=torch.float64)
        adapter = apply(model, pattern, backend=backend)
        randomise(adapter, seed=4)
        sparse_layers = [row["decode"] for row in adapter.describe() if not row["dense"]]
        assert all(("batched decode entry" in path) == (backend == "flex") for path in sparse_layers)
        runs[backend] = greedy(model, input_ids=ids, attention_mask=mask)
    assert torch.equal(runs["flex"][0], runs["reference"][0])
    torch.testing.assert_close(runs["flex"][1], runs["reference"][1], rtol=0, atol=1e-6)


def image_inputs(model):
    """A prompt with one real image (4 tokens after the 2x2 merge of a 4x4 grid) between text tokens."""
    vision = model.config.vision_config
    patch = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    pixel_values = torch.randn(16, patch, generator=torch.Generator().manual_seed(0), dtype=model.dtype)
    ids = torch.tensor([[5, 6, 122, IMAGE, IMAGE, IMAGE, IMAGE, 123, 7, 8, 9, 10, 11]])
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixel_values,
                image_grid_thw=torch.tensor([[1, 4, 4]]), mm_token_type_ids=(ids == IMAGE).long())


def positions_seen(model):
    """Records the ``position_ids`` the text model gets at every call."""
    seen = []

    def hook(module, args, kwargs):
        seen.append(kwargs["position_ids"].clone())

    return seen, model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)


DENSE_EQUIVALENT = {
    # every key in the window, the window's gate 1: dense causal attention
    "window": Pattern(name="window", window=Window(size=64), gate=Gate(kind="constant", values=(1.0,))),
    # every block selected (count >= blocks, the partial current one forced), the selection's gate 1
    "selection": Pattern(
        name="selection", compression=Compression(block=4, stride=2), selection=Selection(block=4, count=16, forced=("current",)),
        window=Window(size=2), gate=Gate(kind="constant", values=(0.0, 1.0, 0.0)),
    ),
}


@pytest.mark.parametrize("name", list(DENSE_EQUIVALENT))
def test_patched_decode_keeps_the_unpatched_positions_and_outputs(name):
    """A real image (3-D mrope positions) then greedy decoding: at every step the
    patched model's text model gets the unpatched model's mrope positions, and
    with a pattern that covers every key (dense-equivalent) the same tokens and
    logits, each step through the batched decode entry."""
    model = tiny_model(dtype=torch.float64)
    inputs = image_inputs(model)
    seen, hook = positions_seen(model)
    with torch.no_grad():
        expected = greedy(model, **inputs)
    unpatched = list(seen)
    seen.clear()
    adapter = apply(model, DENSE_EQUIVALENT[name], backend="flex")
    assert all("batched decode entry" in row["decode"] for row in adapter.describe())
    with torch.no_grad():
        got = greedy(model, **inputs)
    hook.remove()
    assert len(seen) == len(unpatched) == STEPS
    # mrope: temporal, height and width rows (transformers 5 puts the text positions first), unequal at the image
    assert unpatched[0].shape[0] in (3, 4) and not torch.equal(unpatched[0][-2], unpatched[0][-1])
    for step, (patched, plain) in enumerate(zip(seen, unpatched)):
        assert torch.equal(patched, plain), f"step {step}"
    assert torch.equal(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1], rtol=0, atol=1e-6)


def test_hybrid_decode_positions_match_the_unpatched_model():
    """The VideoNSA-like hybrid pattern (sparse over the image's tokens): the
    patched model computes the unpatched model's mrope positions at every step."""
    model = tiny_model(dtype=torch.float64)
    inputs = image_inputs(model)
    seen, hook = positions_seen(model)
    with torch.no_grad():
        greedy(model, **inputs)
    unpatched = list(seen)
    seen.clear()
    adapter = apply(model, small_pattern(), backend="flex")
    randomise(adapter, seed=1)
    with torch.no_grad():
        greedy(model, **inputs)
    hook.remove()
    assert len(seen) == len(unpatched) == STEPS
    assert all(torch.equal(patched, plain) for patched, plain in zip(seen, unpatched))


def test_batched_decode_follows_beam_search_reordering():
    """Beam search reorders the cache's rows at every step: the batched states
    follow (through the cache's reorder_cache), so the beams are the exact path's."""
    pattern = sparse_patterns()["overlap"]
    ids, mask, _ = make_batch([[(4, 12)], [(1, 5)]], [17, 13], 17, left_pad=True, seed=5)
    beams = {}
    for backend in ("reference", "flex"):
        model = tiny_model(dtype=torch.float64)
        randomise(apply(model, pattern, backend=backend), seed=6)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, num_beams=3,
                             num_return_sequences=3, do_sample=False, output_scores=True, return_dict_in_generate=True)
        beams[backend] = (out.sequences, out.sequences_scores)
    assert torch.equal(beams["flex"][0], beams["reference"][0])
    torch.testing.assert_close(beams["flex"][1], beams["reference"][1], rtol=0, atol=1e-6)


def test_batched_decode_after_the_cache_is_cut_back():
    """A cache cut back (``crop``, as assisted generation does) holds fewer
    tokens than the batched state covers: the state is rebuilt from the cache,
    and the next tokens get the reference's last rows on the sequence kept."""
    pattern = sparse_patterns()["overlap"]
    model = tiny_model(dtype=torch.float64)
    adapter = apply(model, pattern, backend="flex")
    randomise(adapter, seed=7)
    ids, _, _ = make_batch([[(3, 9)]], [24], 24, seed=11)
    keyword = cache_keyword(model)

    def feed(tokens, start, cache):
        positions = torch.arange(start, start + tokens.shape[1])[None]
        extra = {keyword: cache} if cache is not None else {}
        with torch.no_grad():
            out = model(input_ids=tokens, position_ids=positions, use_cache=True, **extra)
        return out.logits[0], returned_cache(out)

    _, cache = feed(ids[:, :14], 0, None)
    for t in range(14, 18):
        _, cache = feed(ids[:, t : t + 1], t, cache)
    cache.crop(-3)  # keep 15 tokens: the states covered 18
    replacement = torch.tensor([[40, 41, 42]])
    got = torch.cat([feed(replacement[:, i : i + 1], 15 + i, cache)[0] for i in range(3)])
    sequence = torch.cat([ids[0, :15], replacement[0]])
    scratch = ScratchModel(model, pattern, poolers=poolers_of(adapter))
    expected = scratch.step(sequence, torch.zeros_like(sequence))[15:]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-9)


def test_the_cache_goes_with_its_last_user():
    """Neither the adapter nor the wrappers it puts on a cache keep it alive: once the
    caller drops a prefill's output, or generate() returns, the KV cache (on a GPU,
    gigabytes at long contexts) is freed by reference counting alone, without
    waiting for Python's cycle collector."""
    import gc
    import weakref

    model = tiny_model()
    randomise(apply(model, sparse_patterns()["overlap"], backend="reference"), seed=1)
    ids, mask, _ = make_batch([[(2, 10)]], [14], 14, seed=2)
    caches = []
    original = type(model).forward

    def keep(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        cache = getattr(out, "past_key_values", None) or getattr(out, "cache", None)
        if cache is not None:
            caches.append(weakref.ref(cache))
        return out

    gc.disable()
    try:
        with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
            patch.setattr(type(model), "forward", keep)
            out = model(input_ids=ids, attention_mask=mask, use_cache=True)
            assert len(caches) == 1 and caches[0]() is not None
            del out
            assert caches[0]() is None, "the prefill's cache outlived its output"
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
            assert len(caches) > 1 and all(ref() is None for ref in caches), "generate()'s cache outlived the call"
    finally:
        gc.enable()


def test_a_copied_cache_follows_its_own_rows():
    """A prefilled cache copied (a prompt reused) or pickled carries the decode
    states and row wrappers of its own: reordering the copy moves the copy's rows
    and states, not the original's."""
    import copy
    import pickle

    pattern = sparse_patterns()["overlap"]
    model = tiny_model()
    randomise(apply(model, pattern, backend="flex"), seed=3)
    ids, mask, _ = make_batch([[(2, 10)], [(1, 6)]], [14, 9], 14, left_pad=True, seed=4)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
    cache = getattr(out, "past_key_values", None) or getattr(out, "cache", None)
    for twin in (copy.deepcopy(cache), pickle.loads(pickle.dumps(cache))):
        follower = vars(twin)["reorder_cache"]
        assert follower.cache() is twin and vars(cache)["reorder_cache"].cache() is cache
        before = cache.layers[0].keys.clone()
        twin.reorder_cache(torch.tensor([1, 0]))
        assert torch.equal(twin.layers[0].keys, before[[1, 0]]) and torch.equal(cache.layers[0].keys, before)
