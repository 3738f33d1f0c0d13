"""The bundled patterns on Qwen2.5-VL models of any size: ``apply`` takes the
model's own heads, head dim, hidden size and layer count, and refuses only
where a constraint of the pattern cannot hold for that model.

Tiny random models of several head counts (no downloads) stand in for the
real sizes; the real sizes' configs are checked through :func:`model_shape`
and :func:`fit_pattern` alone (building those models would take gigabytes)."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nsaflex.adapters.qwen2_5_vl import AdapterError, apply, fit_pattern, get_adapter, model_shape
from nsaflex.errors import InputError, PatternError
from nsaflex.loader import bundled_patterns, load_pattern
from nsaflex.spec import LayerOverride, Model
from tests.adapter_support import (
    make_batch,
    poolers_of,
    position_ids_from_mask,
    randomise_gates,
    scratch_logits,
    tiny_model,
)

BUNDLED = sorted(bundled_patterns())
# (query heads, kv heads, decoder layers); head dim 16 throughout (hidden = 16 x heads).
HEAD_COUNTS = [(4, 2, 2), (6, 2, 3), (8, 1, 2), (16, 2, 2)]
# Long enough for every bundled pattern's compression blocks (up to 64 tokens)
# and several selection blocks; row 0 an image, row 1 (left-padded) a video.
SPANS = [[(6, 150)], [(4, 60), (70, 126)]]
LENGTHS = [156, 132]
TOTAL = 156
# The flex backend in float32 against the float64 from-scratch evaluation, through
# a few float32 layers: relative to the largest logit, as float32 accumulation allows.
RTOL = 1e-5

# Qwen2.5-VL text configs (Hugging Face config.json of the Instruct checkpoints).
SIZES = {
    "3B": dict(num_attention_heads=16, num_key_value_heads=2, hidden_size=2048, num_hidden_layers=36),
    "7B": dict(num_attention_heads=28, num_key_value_heads=4, hidden_size=3584, num_hidden_layers=28),
    "32B": dict(num_attention_heads=40, num_key_value_heads=8, hidden_size=5120, num_hidden_layers=64),
    "72B": dict(num_attention_heads=64, num_key_value_heads=8, hidden_size=8192, num_hidden_layers=80),
}


def cases():
    """Every bundled pattern on every head count on the reference backend, and
    each pattern once on FlexAttention (its CPU compile takes tens of seconds
    a shape), the head counts taken in turn."""
    out = []
    for index, name in enumerate(BUNDLED):
        for heads, kv_heads, layers in HEAD_COUNTS:
            out.append(pytest.param(name, heads, kv_heads, layers, "reference", id=f"{name}-{heads}q{kv_heads}kv{layers}l-reference"))
        heads, kv_heads, layers = HEAD_COUNTS[index % len(HEAD_COUNTS)]
        out.append(pytest.param(name, heads, kv_heads, layers, "flex", id=f"{name}-{heads}q{kv_heads}kv{layers}l-flex"))
    return out


@pytest.mark.parametrize("name, heads, kv_heads, layers, backend", cases())
def test_bundled_pattern_on_any_head_count_equals_the_reference(name, heads, kv_heads, layers, backend):
    """Image and video rows, one left-padded: the patched model's logits are the
    from-scratch float64 evaluation of the pattern with the model's shape."""
    model = tiny_model(layers=layers, heads=heads, kv_heads=kv_heads, hidden=16 * heads)
    adapter = apply(model, name, backend=backend)
    assert adapter.pattern.model == Model(heads, kv_heads, 16, 16 * heads, layers)
    assert adapter.backend == backend
    randomise_gates(adapter)
    ids, mask, mm = make_batch(SPANS, LENGTHS, TOTAL, left_pad=True)
    mm[1][mm[1] == 1] = 2  # row 1 is a video, as mm_token_type_ids classes it
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, mm_token_type_ids=mm, position_ids=position_ids_from_mask(mask)).logits
    expected = scratch_logits(model, adapter.pattern, ids, mask, mm, poolers=poolers_of(adapter))
    real = mask.bool()
    scale = expected[real].abs().max().item()
    torch.testing.assert_close(got[real], expected[real].to(got.dtype), rtol=0, atol=RTOL * scale)


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_pattern_fits_every_qwen2_5_vl_size(name, size):
    config = SimpleNamespace(head_dim=None, **SIZES[size])
    fitted = fit_pattern(load_pattern(name), config)
    shape = SIZES[size]
    assert fitted.model == Model(shape["num_attention_heads"], shape["num_key_value_heads"], 128, shape["hidden_size"],
                                 shape["num_hidden_layers"])
    assert model_shape(config).head_dim == 128
    for layer in range(shape["num_hidden_layers"]):
        assert fitted.for_layer(layer).branches == load_pattern(name).for_layer(layer).branches


@given(
    name=st.sampled_from(BUNDLED),
    kv_heads=st.integers(1, 16),
    group=st.integers(1, 8),
    head_dim=st.sampled_from([16, 64, 80, 128, 256]),
    layers=st.integers(1, 96),
    at=st.lists(st.integers(0, 100), min_size=1, max_size=4, unique=True),
)
def test_fit_pattern_takes_any_shape_and_refuses_only_overrides_past_the_layers(name, kv_heads, group, head_dim, layers, at):
    heads = kv_heads * group
    config = SimpleNamespace(num_attention_heads=heads, num_key_value_heads=kv_heads, hidden_size=heads * head_dim,
                             head_dim=None, num_hidden_layers=layers)
    pattern = dataclasses.replace(load_pattern(name), model=Model(), layers=(LayerOverride(at=tuple(at), dense=True),))
    if max(at) >= layers:
        with pytest.raises(PatternError, match=rf"layers\[0\]\.at: expected layer indices below {layers} .*found {next(i for i in at if i >= layers)}"):
            fit_pattern(pattern, config)
        return
    fitted = fit_pattern(pattern, config)
    assert fitted.model == Model(heads, kv_heads, head_dim, heads * head_dim, layers)
    assert dataclasses.replace(fitted, model=Model()) == pattern
    assert all(fitted.for_layer(layer).dense == (layer in at) for layer in range(layers))


def test_an_override_past_the_models_layers_names_the_layer_and_the_count():
    model = tiny_model(layers=2, heads=6, kv_heads=2, hidden=96)
    pattern = dataclasses.replace(load_pattern("videonsa"), layers=(LayerOverride(at=(0, 5), dense=True),))
    with pytest.raises(PatternError) as raised:
        apply(model, pattern, backend="reference")
    message = str(raised.value)
    assert "layers[0].at" in message and "found 5" in message
    assert "below 2" in message and "num_hidden_layers" in message
    assert "drop 5 from layers[0].at" in message
    assert get_adapter(model) is None and model.config.text_config._attn_implementation == "sdpa"


def test_a_constraint_the_models_shape_breaks_says_which_and_how_to_fix_it():
    """An override inside the model's layers is kept; one past them is refused
    even when the pattern's own model section allowed it (the model decides)."""
    base = load_pattern("videonsa")
    pattern = dataclasses.replace(base, layers=(LayerOverride(at=(27,), dense=True),))
    assert fit_pattern(pattern, SimpleNamespace(head_dim=None, **SIZES["72B"])).for_layer(27).dense
    with pytest.raises(PatternError, match=r"layers\[0\]\.at: expected layer indices below 2 .*found 27"):
        fit_pattern(pattern, SimpleNamespace(head_dim=None, num_attention_heads=4, num_key_value_heads=2,
                                             hidden_size=64, num_hidden_layers=2))


def test_a_head_dim_the_backend_does_not_serve_is_refused_before_anything_is_applied():
    pytest.importorskip("triton")
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the triton backend plans on the CPU only under TRITON_INTERPRET=1")
    from nsaflex.errors import BackendUnavailable

    model = tiny_model(heads=4, kv_heads=2, hidden=96)  # head dim 24
    with pytest.raises(BackendUnavailable, match="head dim 24"):
        apply(model, "videonsa", backend="triton")
    assert get_adapter(model) is None


def test_token_class_two_is_vision_and_other_values_are_refused():
    model = tiny_model()
    apply(model, "videonsa", backend="reference")
    ids, mask, mm = make_batch([[(2, 30)]], [34], 34)
    with torch.no_grad():
        image = model(input_ids=ids, mm_token_type_ids=mm, position_ids=position_ids_from_mask(mask)).logits
        video = model(input_ids=ids, mm_token_type_ids=mm * 2, position_ids=position_ids_from_mask(mask)).logits
    torch.testing.assert_close(video, image, rtol=0, atol=0)
    with pytest.raises(AdapterError, match=r"mm_token_type_ids.*values \[3\]"):
        model(input_ids=ids, mm_token_type_ids=mm * 3, position_ids=position_ids_from_mask(mask))


@pytest.mark.parametrize("backend", ["reference", "flex"])
def test_compiled_attention_takes_video_tokens_as_vision(backend):
    """Token class 2 (video, as mm_token_type_ids writes it) wherever token
    classes enter: the compiled attention gives what class 1 (image) gives."""
    import nsaflex

    attention = nsaflex.compile(dataclasses.replace(load_pattern("videonsa"), model=Model()), backend)
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 160, 16, generator=generator)
    k, v = (torch.randn(2, 2, 160, 16, generator=generator) for _ in range(2))
    gates = torch.rand(2, 4, 160, 3, generator=generator)
    image = torch.zeros(2, 160, dtype=torch.long)
    image[0, 10:150] = 1
    image[1, 30:100] = 1
    video = image * 2
    mixed = image.clone()
    mixed[1, 60:100] = 2
    with torch.no_grad():
        expected = attention(q, k, v, gates, image)
        torch.testing.assert_close(attention(q, k, v, gates, video), expected, rtol=0, atol=0)
        torch.testing.assert_close(attention(q, k, v, gates, mixed), expected, rtol=0, atol=0)
        with pytest.raises(InputError, match=r"token_types: expected values 0 \(text\), 1 \(image\) or 2 \(video\)"):
            attention(q, k, v, gates, image * 3)
