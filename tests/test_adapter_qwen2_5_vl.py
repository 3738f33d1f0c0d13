"""The Qwen2.5-VL adapter on tiny random models (no downloads): prefill logits
against the unpatched model and a from-scratch float64 evaluation, padding,
token classes, gates in the state dict, training, refused inputs, the handle's
lifetime, and copies and pickles of a patched model."""

from __future__ import annotations

import copy
import dataclasses
import io
import os
import pickle
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nsaflex.adapters import qwen2_5_vl as adapter_module
from nsaflex.adapters.qwen2_5_vl import (
    AdapterError,
    StaleAdapterWarning,
    applied,
    apply,
    get_adapter,
    load_videonsa_gates,
    remove,
)
from nsaflex.errors import BackendUnavailable, NsaflexError, PatternError
from nsaflex.reference_release import release_pattern
from nsaflex.spec import Compression, Gate, Hybrid, LayerOverride, Model, Pattern, Selection, Window
from tests.adapter_support import (
    IMAGE,
    make_batch,
    position_ids_from_mask,
    randomise_gates,
    scratch_logits,
    small_pattern,
    takes_mm_token_type_ids,
    tiny_model,
)

ATOL = 1e-5

SPANS = [[(3, 20)], [(2, 9), (14, 30)], []]
LENGTHS = [26, 34, 12]


def logits(model, ids, mask=None, mm=None, positions=None, **extra):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, mm_token_type_ids=mm, position_ids=positions, **extra).logits


def real(x, mask):
    return x[mask.bool()]


def model_fingerprint(model):
    """What apply() may touch: state dict keys, hooks, attention implementation,
    the adapter's attributes on modules."""
    text = model.model.language_model
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    attributes = sorted(name for m in model.modules() for name in vars(m) if name.startswith("_nsaflex"))
    return (tuple(model.state_dict().keys()), hooks, text.config._attn_implementation, attributes)


# --- equality with the unpatched model ----------------------------------------------------


def dense_equivalent_patterns():
    """Budgets covering every key with gates selecting one branch: each is dense causal attention."""
    window_all = Pattern(
        name="window-covers-all",
        compression=Compression(block=4, stride=4),
        selection=Selection(block=4, count=2),
        window=Window(size=64),
        gate=Gate(kind="constant", values=(0.0, 0.0, 1.0)),
        hybrid=Hybrid(vision_keys="all"),
    )
    selection_all = Pattern(
        name="selection-covers-all",
        compression=Compression(block=4, stride=2),
        selection=Selection(block=4, count=16, forced=("current",)),
        window=Window(size=2),
        gate=Gate(kind="mlp", temperature=0.3),
    )
    return [window_all, selection_all]


@pytest.mark.parametrize("pattern", dense_equivalent_patterns(), ids=lambda p: p.name)
def test_full_budget_one_branch_equals_unpatched(pattern):
    model = tiny_model()
    ids, mask, mm = make_batch(SPANS, LENGTHS, 36, left_pad=True)
    positions = position_ids_from_mask(mask)
    expected = logits(model, ids, mask, mm, positions)
    adapter = apply(model, pattern, backend="reference")
    if pattern.gate.kind == "mlp":
        # zero weights and a +-100 bias: sigmoid(+-100/0.3) is exactly 1 or 0 in float32
        bias = torch.tensor([-100.0, 100.0, -100.0]).repeat(model.config.text_config.num_attention_heads)
        with torch.no_grad():
            for layer in adapter.layers:
                layer.gate.g_proj_2.weight.zero_()
                layer.gate.g_proj_2.bias.copy_(bias)
    got = logits(model, ids, mask, mm, positions)
    torch.testing.assert_close(real(got, mask), real(expected, mask), rtol=0, atol=ATOL)
    # and without padding
    full = torch.ones_like(mask)
    torch.testing.assert_close(logits(model, ids, full, mm), logits_unpatched(model, ids, full), rtol=0, atol=ATOL)


def logits_unpatched(model, ids, mask):
    adapter = get_adapter(model)
    pattern, backend = adapter.pattern, adapter.backend
    saved = {k: v.clone() for k, v in model.state_dict().items() if ".g_proj" in k}
    remove(model)
    out = logits(model, ids, mask)
    adapter = apply(model, pattern, backend=backend)
    model.load_state_dict(saved, strict=False)
    return out


def test_text_only_inputs_give_exactly_the_unpatched_logits():
    model = tiny_model()
    ids, mask, mm = make_batch([[], []], [20, 14], 20, left_pad=True)
    positions = position_ids_from_mask(mask)
    expected = logits(model, ids, mask, None, positions)
    expected_unpadded = logits(model, ids[:1])
    with applied(model, small_pattern(), backend="reference") as adapter:
        randomise_gates(adapter)
        assert torch.equal(logits(model, ids, mask, mm, positions), expected)
        assert torch.equal(logits(model, ids, mask, None, positions), expected)
        assert torch.equal(logits(model, ids[:1]), expected_unpadded)


def test_token_class_facts_are_read_before_the_first_layer(monkeypatch):
    """An unpadded prefill reads what its layers need off the token classes
    (their layout, the text rows) when the text model is called, before any
    layer's work is queued; the layers read nothing more, and the logits are
    those of layers that read for themselves. (GPU tensors are remembered;
    CPU ones are declared so here.)"""
    from nsaflex import hybrid, tensor_memo

    model = tiny_model(layers=3)
    ids, _, mm = make_batch([[(3, 20)]], [30], 30)
    events = []
    for name in ("_token_layout", "text_rows"):
        original = getattr(hybrid, name)
        monkeypatch.setattr(hybrid, name, lambda *a, _f=original, _n=name: events.append(_n) or _f(*a))
    attend = adapter_module.Qwen25VLAdapter._attend
    monkeypatch.setattr(adapter_module.Qwen25VLAdapter, "_attend",
                        lambda self, *a: events.append("layer") or attend(self, *a))
    monkeypatch.setattr(tensor_memo, "cacheable", lambda tensor: True)
    with applied(model, small_pattern(), backend="flex") as adapter:
        randomise_gates(adapter)
        got = logits(model, ids, None, mm)
        assert events == ["_token_layout", "text_rows"] + ["layer"] * 3
        monkeypatch.setattr(adapter_module.Qwen25VLAdapter, "_read_token_facts", lambda *a: None)
        events.clear()
        expected = logits(model, ids, None, mm)
        assert events == ["layer", "_token_layout", "text_rows", "layer", "layer"]
    assert torch.equal(got, expected)


def test_dense_layers_are_the_original_attention():
    model = tiny_model()
    ids, mask, mm = make_batch(SPANS, LENGTHS, 36)
    expected = logits(model, ids, mask, mm, position_ids_from_mask(mask))
    pattern = small_pattern(layers=(LayerOverride(at=(0, 1), dense=True),))
    with applied(model, pattern, backend="reference") as adapter:
        assert [layer.gate for layer in adapter.layers] == [None, None]
        assert torch.equal(logits(model, ids, mask, mm, position_ids_from_mask(mask)), expected)


# --- equality with the from-scratch reference ------------------------------------------------


def reference_patterns():
    base = small_pattern()
    return {
        "videonsa-like": base,
        "vision-keys-all": dataclasses.replace(base, hybrid=Hybrid(vision_keys="all")),
        "overlap-qblock-nohybrid": Pattern(
            name="overlap-qblock",
            compression=Compression(block=4, stride=2),
            selection=Selection(block=8, count=2, forced=("first", "current"), granularity="query_block", query_block=4),
            window=Window(size=3),
            gate=Gate(kind="linear", temperature=2.0, bias=0.5),
        ),
        "legacy-hybrid": dataclasses.replace(base, compression=Compression(block=4, stride=4, visibility="videonsa_legacy")),
        "legacy-nohybrid-heads": Pattern(
            name="legacy",
            compression=Compression(block=4, stride=4, visibility="videonsa_legacy"),
            selection=Selection(block=4, count=3, scoring="head", forced=("previous", "current")),
            gate=Gate(kind="constant", values=(0.7, 0.4)),
        ),
        "mlp-pooling": dataclasses.replace(base, compression=Compression(block=4, stride=2, pooling="mlp")),
        "layer-overrides": dataclasses.replace(
            base,
            layers=(LayerOverride(at=(0,), dense=True), LayerOverride(at=(1,), remove=("selection",), window=Window(size=6))),
        ),
    }


@pytest.mark.parametrize("name", list(reference_patterns()))
def test_logits_match_scratch_reference_with_padding(name):
    pattern = reference_patterns()[name]
    model = tiny_model(layers=2, heads=4, kv_heads=2)
    adapter = apply(model, pattern, backend="reference")
    randomise_gates(adapter, seed=3)
    poolers = {layer.index: layer.compiled.pooler for layer in adapter.layers if layer.compiled is not None}
    # left padding, classes from mm_token_type_ids (video), explicit positions
    ids, mask, mm = make_batch(SPANS, LENGTHS, 36, left_pad=True, video=True)
    got = logits(model, ids, mask, mm, position_ids_from_mask(mask))
    expected = scratch_logits(model, pattern, ids, mask, (mm != 0).long(), poolers=poolers)
    torch.testing.assert_close(real(got, mask), real(expected, mask), rtol=0, atol=ATOL)
    # right padding, classes from the image token ids, positions from the model
    ids, mask, mm = make_batch([[(5, 25)], [(0, 12)]], [30, 17], 32, left_pad=False, seed=5)
    got = logits(model, ids, mask)
    expected = scratch_logits(model, pattern, ids, mask, (ids == IMAGE).long(), poolers=poolers)
    torch.testing.assert_close(real(got, mask), real(expected, mask), rtol=0, atol=ATOL)


def test_gqa_seven_heads_per_kv_head():
    model = tiny_model(heads=7, kv_heads=1, hidden=56)
    pattern = small_pattern()
    adapter = apply(model, pattern, backend="reference")
    randomise_gates(adapter)
    ids, mask, mm = make_batch([[(2, 18)], [(4, 10)]], [22, 16], 22)
    got = logits(model, ids, mask, mm, position_ids_from_mask(mask))
    expected = scratch_logits(model, pattern, ids, mask, (mm != 0).long())
    torch.testing.assert_close(real(got, mask), real(expected, mask), rtol=0, atol=ATOL)


def test_vision_tower_keeps_its_attention():
    """Real pixel values through the tiny vision tower, 3-D rope positions: with a
    dense-equivalent pattern the patched model gives the unpatched logits."""
    model = tiny_model()
    vision_config = model.config.vision_config
    grid = torch.tensor([[1, 4, 4]])  # 16 patches, 4 tokens after the 2x2 merge
    patch = vision_config.in_channels * vision_config.temporal_patch_size * vision_config.patch_size**2
    pixel_values = torch.randn(16, patch, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[5, 6, 122, IMAGE, IMAGE, IMAGE, IMAGE, 123, 7, 8, 9]])
    mm = (ids == IMAGE).long()
    inputs = dict(input_ids=ids, pixel_values=pixel_values, image_grid_thw=grid, mm_token_type_ids=mm)
    with torch.no_grad():
        expected = model(**inputs).logits
    with applied(model, dense_equivalent_patterns()[0], backend="reference"):
        assert model.config.vision_config._attn_implementation == "sdpa"
        assert model.config.text_config._attn_implementation == "nsaflex"
        with torch.no_grad():
            got = model(**inputs).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)


def test_base_model_can_be_patched():
    model = tiny_model()
    base = model.model
    ids, mask, mm = make_batch(SPANS[:2], LENGTHS[:2], 34)
    with torch.no_grad():
        before = base(input_ids=ids, attention_mask=mask).last_hidden_state
    with applied(base, small_pattern(), backend="reference"):
        with torch.no_grad():
            during = base(input_ids=ids, attention_mask=mask).last_hidden_state
    with torch.no_grad():
        after = base(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(before, after)
    assert not torch.allclose(real(before, mask), real(during, mask))


def test_auto_backend_resolves():
    model = tiny_model()
    with applied(model, small_pattern()) as adapter:
        assert adapter.backend in ("reference", "flex", "triton")
        assert all(layer.compiled.backend == adapter.backend for layer in adapter.layers)


# --- gates in the state dict ------------------------------------------------------------------


def test_gates_round_trip_through_state_dict():
    pattern = small_pattern()
    ids, mask, mm = make_batch(SPANS, LENGTHS, 36)
    source = tiny_model(seed=0)
    source_adapter = apply(source, pattern, backend="reference")
    randomise_gates(source_adapter, seed=7)
    state = source.state_dict()
    gate_keys = [k for k in state if ".g_proj" in k]
    assert gate_keys == [
        f"model.language_model.layers.{i}.self_attn.{n}.{p}" for i in range(2) for n in ("g_proj_1", "g_proj_2") for p in ("weight", "bias")
    ]
    expected = logits(source, ids, mask, mm)

    target = tiny_model(seed=0)
    apply(target, pattern, backend="reference")
    assert not torch.allclose(logits(target, ids, mask, mm), expected)
    target.load_state_dict(state)
    torch.testing.assert_close(logits(target, ids, mask, mm), expected, rtol=0, atol=0)

    # apply(state_dict=...) loads in one step
    other = tiny_model(seed=0)
    apply(other, pattern, backend="reference", state_dict=state)
    torch.testing.assert_close(logits(other, ids, mask, mm), expected, rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["model.layers.{i}", "model.language_model.layers.{i}"], ids=["4.x", "5.x"])
def test_videonsa_checkpoint_gates_load(layout):
    model = tiny_model()
    adapter = apply(model, small_pattern(), backend="reference")
    hidden, heads = 64, 4
    generator = torch.Generator().manual_seed(11)
    checkpoint = {}
    for i in range(2):
        prefix = layout.format(i=i) + ".self_attn."
        checkpoint[prefix + "g_proj_1.weight"] = torch.randn(hidden, hidden, generator=generator)
        checkpoint[prefix + "g_proj_1.bias"] = torch.randn(hidden, generator=generator)
        checkpoint[prefix + "g_proj_2.weight"] = torch.randn(heads * 3, hidden, generator=generator)
        checkpoint[prefix + "g_proj_2.bias"] = torch.randn(heads * 3, generator=generator)
        checkpoint[prefix + "q_proj.weight"] = torch.randn(hidden, hidden)  # not a gate: ignored
    checkpoint["visual.blocks.0.attn.qkv.weight"] = torch.randn(3, 3)
    result = load_videonsa_gates(model, checkpoint)
    assert len(result["loaded"]) == 8 and result["unused"] == []
    for i, layer in enumerate(adapter.layers):
        prefix = layout.format(i=i) + ".self_attn."
        assert torch.equal(layer.attention.g_proj_1.weight, checkpoint[prefix + "g_proj_1.weight"])
        assert torch.equal(layer.attention.g_proj_2.bias, checkpoint[prefix + "g_proj_2.bias"])


def test_dense_layer_gate_tensors_are_reported_unused():
    model = tiny_model()
    apply(model, small_pattern(layers=(LayerOverride(at=(1,), dense=True),)), backend="reference")
    checkpoint = {}
    for i in range(2):
        for name, shape in (("g_proj_1", (64, 64)), ("g_proj_2", (12, 64))):
            checkpoint[f"model.layers.{i}.self_attn.{name}.weight"] = torch.zeros(shape)
            checkpoint[f"model.layers.{i}.self_attn.{name}.bias"] = torch.zeros(shape[0])
    result = load_videonsa_gates(model, checkpoint)
    assert len(result["loaded"]) == 4
    assert sorted(result["unused"]) == sorted(k for k in checkpoint if ".layers.1." in k)


# --- training ----------------------------------------------------------------------------------


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient-checkpointing"])
def test_backward_reaches_gates_and_projections(checkpointing):
    model = tiny_model()
    apply(model, small_pattern(), backend="reference")
    model.train()
    if checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    ids, mask, mm = make_batch(SPANS, LENGTHS, 36)
    labels = ids.masked_fill(mask == 0, -100)
    out = model(input_ids=ids, attention_mask=mask, mm_token_type_ids=mm, labels=labels)
    out.loss.backward()
    for layer in model.model.language_model.layers:
        attention = layer.self_attn
        for module in (attention.g_proj_1, attention.g_proj_2, attention.q_proj, attention.k_proj, attention.v_proj):
            for parameter in module.parameters():
                assert parameter.grad is not None
                assert torch.isfinite(parameter.grad).all()
                assert parameter.grad.abs().sum() > 0


# --- refused inputs: nothing half-applied -------------------------------------------------------


def test_not_a_qwen_model():
    with pytest.raises(AdapterError, match="Qwen2_5_VLForConditionalGeneration.*found Linear"):
        apply(torch.nn.Linear(2, 2), small_pattern())
    model = tiny_model()
    with pytest.raises(AdapterError, match="Qwen2_5_VLTextModel"):
        apply(model.model.language_model, small_pattern())


@pytest.mark.parametrize(
    "model_section",
    [Model(query_heads=28, kv_heads=4), Model(kv_heads=4), Model(head_dim=128), Model(num_layers=28), Model()],
    ids=["heads", "kv-heads", "head-dim", "layers", "none"],
)
def test_pattern_written_for_another_model_runs_with_this_models_shape(model_section):
    """A pattern's model section describes the model it was written for; the
    patched model's own shape replaces it."""
    model = tiny_model()
    adapter = apply(model, small_pattern(model=model_section), backend="reference")
    assert adapter.pattern.model == Model(query_heads=4, kv_heads=2, head_dim=16, hidden_size=64, num_layers=2)
    assert all(layer.pattern.model == adapter.pattern.model for layer in adapter.layers)
    ids, mask, mm = make_batch(SPANS, LENGTHS, 36, left_pad=True)
    positions = position_ids_from_mask(mask)
    got = logits(model, ids, mask, mm, positions)
    expected = scratch_logits(model, adapter.pattern, ids, mask, mm)
    torch.testing.assert_close(real(got, mask), real(expected, mask).to(got.dtype), rtol=0, atol=ATOL)


def test_layer_override_beyond_model():
    model = tiny_model()
    before = model_fingerprint(model)
    with pytest.raises(PatternError, match=r"layers\[0\]\.at.*below 2"):
        apply(model, small_pattern(layers=(LayerOverride(at=(5,), dense=True),)), backend="reference")
    assert model_fingerprint(model) == before


def bad_checkpoints():
    good = {}
    for i in range(2):
        good[f"model.layers.{i}.self_attn.g_proj_1.weight"] = torch.zeros(64, 64)
        good[f"model.layers.{i}.self_attn.g_proj_1.bias"] = torch.zeros(64)
        good[f"model.layers.{i}.self_attn.g_proj_2.weight"] = torch.zeros(12, 64)
        good[f"model.layers.{i}.self_attn.g_proj_2.bias"] = torch.zeros(12)
    missing = dict(good)
    del missing["model.layers.1.self_attn.g_proj_2.bias"]
    misshapen = dict(good)
    misshapen["model.layers.0.self_attn.g_proj_2.weight"] = torch.zeros(28 * 3, 64)
    beyond = dict(good)
    beyond["model.layers.9.self_attn.g_proj_1.weight"] = torch.zeros(64, 64)
    return {
        "missing": (missing, r"model\.language_model\.layers\.1\.self_attn\.g_proj_2\.bias"),
        "misshapen": (misshapen, r"model\.layers\.0\.self_attn\.g_proj_2\.weight: expected shape \[12, 64\].*found \[84, 64\]"),
        "other-model": (beyond, r"model\.layers\.9\.self_attn\.g_proj_1\.weight: expected a layer index below 2"),
    }


@pytest.mark.parametrize("case", list(bad_checkpoints()))
def test_bad_checkpoint_leaves_model_unchanged(case):
    checkpoint, message = bad_checkpoints()[case]
    model = tiny_model()
    before = model_fingerprint(model)
    with pytest.raises(AdapterError, match=message):
        apply(model, small_pattern(), backend="reference", state_dict=checkpoint)
    assert model_fingerprint(model) == before and get_adapter(model) is None
    # on a patched model, nothing is loaded
    adapter = apply(model, small_pattern(), backend="reference")
    saved = [p.detach().clone() for p in adapter.gate_parameters()]
    with pytest.raises(AdapterError, match=message):
        load_videonsa_gates(model, checkpoint)
    assert all(torch.equal(a, b) for a, b in zip(saved, adapter.gate_parameters()))


def test_apply_twice_remove_unpatched_and_bad_mode():
    model = tiny_model()
    with pytest.raises(AdapterError, match="not applied"):
        remove(model)
    with pytest.raises(AdapterError, match="mode"):
        apply(model, small_pattern(), backend="reference", mode="fast")
    apply(model, small_pattern(), backend="reference")
    with pytest.raises(AdapterError, match="already patched"):
        apply(model, small_pattern(), backend="reference")
    remove(model)
    assert model.config.text_config._attn_implementation == "sdpa"
    assert not any(".g_proj" in k for k in model.state_dict())


def test_release_mode_refuses_faithful_patterns_and_unservable_shapes():
    model = tiny_model()
    before = model_fingerprint(model)
    with pytest.raises(PatternError, match="compression.visibility.*videonsa_release"):
        apply(model, small_pattern(hybrid=Hybrid(vision_keys="all")), backend="reference", mode="videonsa_release")
    with pytest.raises(BackendUnavailable, match="head dim"):
        apply(tiny_model(hidden=96), release_pattern(small_pattern()), backend="triton", mode="videonsa_release")
    assert model_fingerprint(model) == before


def test_token_classes_are_required_for_hybrid_patterns():
    model = tiny_model()
    ids, mask, mm = make_batch(SPANS[:1], LENGTHS[:1], 26)
    with applied(model, small_pattern(), backend="reference"):
        embeds = model.get_input_embeddings()(ids)
        with pytest.raises(AdapterError, match="token classes"), torch.no_grad():
            model(inputs_embeds=embeds, attention_mask=mask)
        # with mm_token_type_ids the classes are known
        with torch.no_grad():
            model(inputs_embeds=embeds, attention_mask=mask, mm_token_type_ids=mm)


def test_context_manager_restores_on_error():
    model = tiny_model()
    before = model_fingerprint(model)
    with pytest.raises(RuntimeError, match="boom"):
        with applied(model, small_pattern(), backend="reference"):
            assert model_fingerprint(model) != before
            raise RuntimeError("boom")
    assert model_fingerprint(model) == before


def test_errors_are_project_errors():
    assert issubclass(AdapterError, NsaflexError)
    assert adapter_module.ATTN_NAME == "nsaflex"


# --- mm_token_type_ids values ---------------------------------------------------------------------


@given(
    st.integers(1, 3).flatmap(
        lambda batch: st.integers(1, 12).flatmap(
            lambda length: st.lists(
                st.lists(st.integers(-3, 6), min_size=length, max_size=length), min_size=batch, max_size=batch
            )
        )
    )
)
def test_token_classes_refuse_values_other_than_text_image_video(rows):
    """0 text, 1 image, 2 video: any other value is refused, naming every one found."""
    mm = torch.tensor(rows)
    bad = sorted({value for row in rows for value in row if value not in (0, 1, 2)})
    if bad:
        with pytest.raises(AdapterError, match=r"^mm_token_type_ids: expected 0 \(text\), 1 \(image\) or 2 \(video\)") as raised:
            adapter_module._token_classes(None, mm, None)
        assert str(raised.value).endswith(f"found values {bad}")
    else:
        assert torch.equal(adapter_module._token_classes(None, mm, None), (mm != 0).long())


def test_model_call_with_unknown_token_type_is_refused():
    model = tiny_model()
    ids, mask, mm = make_batch(SPANS, LENGTHS, 36)
    with applied(model, small_pattern(), backend="reference"):
        expected = logits(model, ids, mask, mm)
        wrong = mm.clone()
        wrong[0, -3] = 3  # no such class: not "vision" by being nonzero
        with pytest.raises(AdapterError, match=r"mm_token_type_ids: .*found values \[3\]"):
            logits(model, ids, mask, wrong)
        with pytest.raises(AdapterError, match=r"mm_token_type_ids: expected an integer tensor.*found torch\.float32"):
            logits(model, ids, mask, mm.float())
        # the refusal changed nothing
        assert torch.equal(logits(model, ids, mask, mm), expected)


# --- the handle acts only while it is the model's adapter -------------------------------------------


def test_stale_handle_leaves_the_reapplied_adapter_in_place():
    model = tiny_model()
    unpatched = model_fingerprint(model)
    ids, mask, mm = make_batch(SPANS, LENGTHS, 36)
    old = apply(model, small_pattern(), backend="reference")
    remove(model)
    new = apply(model, small_pattern(), backend="reference")
    randomise_gates(new)
    patched = logits(model, ids, mask, mm)
    before = model_fingerprint(model)
    with pytest.warns(StaleAdapterWarning, match="no longer the model's adapter.*left as it is"):
        old.remove()
    assert get_adapter(model) is new and new.active and not old.active
    assert model_fingerprint(model) == before
    assert torch.equal(logits(model, ids, mask, mm), patched)
    assert list(old.gate_parameters()) == []
    new.remove()
    assert model_fingerprint(model) == unpatched


def test_second_remove_is_silent_and_a_stale_context_exit_warns():
    model = tiny_model()
    adapter = apply(model, small_pattern(), backend="reference")
    adapter.remove()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adapter.remove()  # nothing applied: nothing to do, nothing to say
    with pytest.warns(StaleAdapterWarning):
        with applied(model, small_pattern(), backend="reference"):
            remove(model)
            newer = apply(model, small_pattern(), backend="reference")
    assert get_adapter(model) is newer
    assert model.config.text_config._attn_implementation == "nsaflex"


# --- copies and pickles of a patched model ------------------------------------------------------------


def copy_cases():
    return {
        "reference-mlp-pooling": ("reference", small_pattern(compression=Compression(block=4, stride=2, pooling="mlp"))),
        "flex": ("flex", small_pattern()),
        "triton": ("triton", small_pattern()),
    }


def patched_for_copy(case, monkeypatch):
    backend, pattern = copy_cases()[case]
    if backend == "triton" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the triton backend on CPU runs under TRITON_INTERPRET=1")
    monkeypatch.setenv("NSAFLEX_FLEX_MODE", "eager")  # no torch.compile on a shared CPU
    model = tiny_model()
    adapter = apply(model, pattern, backend=backend)
    randomise_gates(adapter, seed=5)
    if adapter.layers[0].compiled.pooler is not None:
        with torch.no_grad():
            for layer in adapter.layers:
                for parameter in layer.compiled.pooler.parameters():
                    parameter.add_(0.1 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(2)))
    return model, adapter


def assert_independent(model, twin, ids, mask, mm, expected):
    """``twin`` carries its own adapter: removing it leaves ``model`` patched, and back."""
    unpatched = model_fingerprint(tiny_model())
    assert get_adapter(twin) is not None and get_adapter(twin) is not get_adapter(model)
    remove(twin)
    assert model_fingerprint(twin) == unpatched
    assert torch.equal(logits(model, ids, mask, mm), expected)
    assert not torch.allclose(real(logits(twin, ids, mask, mm), mask), real(expected, mask))
    apply(twin, get_adapter(model).pattern, backend="reference")
    remove(model)
    assert model_fingerprint(model) == unpatched
    assert get_adapter(twin) is not None and twin.config.text_config._attn_implementation == "nsaflex"


@pytest.mark.parametrize("case", list(copy_cases()))
def test_deepcopy_of_patched_model_runs_and_is_independent(case, monkeypatch):
    model, _ = patched_for_copy(case, monkeypatch)
    ids, mask, mm = make_batch(SPANS, LENGTHS, 36)
    expected = logits(model, ids, mask, mm)
    twin = copy.deepcopy(model)
    assert torch.equal(logits(twin, ids, mask, mm), expected)
    assert_independent(model, twin, ids, mask, mm, expected)


# torch.save pickles: one case of it is enough (the interpreted triton kernels are slow on CPU)
@pytest.mark.parametrize(
    "how, case", [("pickle", case) for case in copy_cases()] + [("torch.save", "reference-mlp-pooling")]
)
def test_pickled_patched_model_loads_and_runs(how, case, monkeypatch):
    model, _ = patched_for_copy(case, monkeypatch)
    ids, mask, mm = make_batch(SPANS, LENGTHS, 36)
    expected = logits(model, ids, mask, mm)
    if how == "pickle":
        twin = pickle.loads(pickle.dumps(model))
    else:
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        twin = torch.load(buffer, weights_only=False)
    assert torch.equal(logits(twin, ids, mask, mm), expected)
    assert_independent(model, twin, ids, mask, mm, expected)


def test_copy_of_patched_model_generates_the_same_tokens():
    """Prefill and decode over the KV cache run on the copy as on the original."""
    model = tiny_model()
    randomise_gates(apply(model, small_pattern(), backend="reference"), seed=4)
    ids, mask, mm = make_batch(SPANS[:2], LENGTHS[:2], 34)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    if takes_mm_token_type_ids(model):
        kwargs["mm_token_type_ids"] = mm
    expected = model.generate(**kwargs)
    twin = copy.deepcopy(model)
    assert torch.equal(twin.generate(**kwargs), expected)
    assert torch.equal(model.generate(**kwargs), expected)


class UncopyableGroup:
    """Stands in for a torch.distributed process group, which cannot be copied or pickled."""

    def __reduce_ex__(self, protocol):
        raise TypeError("cannot pickle 'ProcessGroup' object")


def test_copy_of_sequence_parallel_model_shares_its_process_group_and_pickle_is_refused():
    model = tiny_model()
    group = UncopyableGroup()
    apply(model, small_pattern(), backend="reference", process_group=group)
    twin = copy.deepcopy(model)
    assert get_adapter(twin).process_group is group
    with pytest.raises(AdapterError, match=r"^process_group: expected None to pickle.*found UncopyableGroup"):
        pickle.dumps(model)
