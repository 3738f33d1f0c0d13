"""The Qwen2.5-VL adapter's recorder and ``nsaflex inspect``.

The recorder's gate means and sink mass are checked against a hand
computation on a tiny random model: the decoder evaluated from scratch
(tests/adapter_support.py) gives each layer's q, k and gates, and the sink
mass is read off explicit softmax probabilities over the reference's masks.
Tolerance: absolute 1e-6 (float32 model, float64 statistics of O(1) values).
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from nsaflex.adapters.qwen2_5_vl import AdapterError, apply
from nsaflex.cli.main import main
from nsaflex.pooling import compress
from nsaflex.recorder import block_histogram, load_recording
from nsaflex.reference import (
    compression_visibility,
    masked_attention,
    reference_attention,
    selection_mask,
    window_mask,
)
from tests.adapter_support import ScratchModel, make_batch, randomise_gates, small_pattern, tiny_model

ATOL = 1e-6


def _recorded(pattern, backend="reference"):
    model = tiny_model(layers=2, heads=4, kv_heads=2)
    adapter = apply(model, pattern, backend=backend)
    randomise_gates(adapter, seed=3)
    ids, mask, mm = make_batch([[(3, 27)]], [34], 34, video=True)
    with torch.no_grad(), adapter.record() as rec:
        model(input_ids=ids, attention_mask=mask, mm_token_type_ids=mm,
              position_ids=torch.arange(34)[None])
    scratch = ScratchModel(model, pattern, poolers={l.index: l.compiled.pooler for l in adapter.layers})
    scratch.step(ids[0], (mm[0] != 0).long())
    return adapter, rec, scratch, (mm[0] != 0)


def _hand_sink(pattern, q, k, gates, types):
    """``[Hq, nb]``: mean over vision queries of each branch's probability on the
    first compressed token / the first selection block's keys."""
    vision = torch.nonzero(types[0]).flatten()
    qs, ks = q[0][:, vision].double(), k[0][:, vision].double()
    length = vision.numel()
    _, selections = reference_attention(q, k, k, pattern, gates, types, return_selection=True)
    masses = []
    c = pattern.compression
    kc, vc = compress(ks[None], ks[None], c)
    _, p = masked_attention(qs, kc[0], vc[0], compression_visibility(length, c))
    masses.append(p[..., 0].mean(dim=-1))
    _, p = masked_attention(qs, ks, ks, selection_mask(selections[0], pattern.selection.block, length))
    masses.append(p[..., : pattern.selection.block].sum(dim=-1).mean(dim=-1))
    _, p = masked_attention(qs, ks, ks, window_mask(length, pattern.window.size))
    masses.append(p[..., : pattern.selection.block].sum(dim=-1).mean(dim=-1))
    return torch.stack(masses, dim=-1)


def test_gate_means_and_sink_mass_equal_a_hand_computation():
    pattern = small_pattern(selection=small_pattern().selection.__class__(block=4, count=2, forced=("first",)))
    _, rec, scratch, vision = _recorded(pattern)
    assert sorted(rec.layers) == [0, 1]
    for index, run in enumerate(scratch.layers):
        record = rec.layers[index]
        gates = run.g.double()  # [1, Hq, L, nb]
        torch.testing.assert_close(record.gate_text(), gates[0][:, ~vision].mean(dim=1), rtol=0, atol=ATOL)
        torch.testing.assert_close(record.gate_vision(), gates[0][:, vision].mean(dim=1), rtol=0, atol=ATOL)
        assert record.text_tokens == int((~vision).sum()) and record.vision_tokens == int(vision.sum())
        expected = _hand_sink(pattern, run.q, run.k, run.g, run.types)
        torch.testing.assert_close(record.sink(), expected, rtol=0, atol=ATOL)
        # the first block is forced: every vision query's slot holds it once
        assert torch.all(record.block_counts[:, 0] == int(vision.sum()))


def test_flex_records_what_the_reference_records():
    """The recorder reads each backend's own info: flex (float32) against the
    reference (float64) within 1e-5 absolute on gates and sinks; the same counts."""
    pattern = small_pattern()
    _, want, _, _ = _recorded(pattern)
    _, got, _, _ = _recorded(pattern, backend="flex")
    for index, record in want.layers.items():
        other = got.layers[index]
        for name in ("gate_text", "gate_vision", "sink"):
            torch.testing.assert_close(getattr(other, name)(), getattr(record, name)(), rtol=0, atol=1e-5, equal_nan=True)
        assert torch.equal(other.block_counts, record.block_counts)


def test_block_histogram_counts_slots():
    lists = torch.tensor([[[[0, 2], [1, -1], [2, -1]]]])  # [B=1, Hsel=1, L=3, n=2]
    pattern = small_pattern()
    assert block_histogram(lists, pattern, 12).tolist() == [[1, 1, 2]]


def test_recording_refuses_padding_and_a_second_block():
    model = tiny_model()
    adapter = apply(model, small_pattern(), backend="reference")
    ids, mask, mm = make_batch([[(2, 10)], [(1, 5)]], [16, 10], 16)
    with adapter.record():
        with pytest.raises(AdapterError, match="one recording at a time"):
            with adapter.record():
                pass
        with pytest.raises(AdapterError, match="padding"), torch.no_grad():
            model(input_ids=ids, attention_mask=mask, mm_token_type_ids=mm)


@pytest.mark.parametrize("suffix", [".pt", ".json"])
def test_inspect_command_writes_json_and_figures(tmp_path, suffix):
    _, rec, _, _ = _recorded(small_pattern())
    saved = tmp_path / f"rec{suffix}"
    rec.save(saved)
    assert load_recording(saved) == json.loads(json.dumps(rec.to_dict()))
    result = CliRunner().invoke(main, ["inspect", str(saved), "--json", str(tmp_path / "out.json"),
                                       "--out", str(tmp_path / "figs")])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "out.json").read_text())
    assert set(data["layers"]) == {"0", "1"}
    assert len(data["layers"]["0"]["gate_vision"]) == 4  # heads
    from PIL import Image

    for name in ("gates.png", "sinks.png"):
        image = Image.open(tmp_path / "figs" / name)
        assert image.size[0] > 200 and image.size[1] > 100


def test_inspect_refuses_a_file_that_is_not_a_recording(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    result = CliRunner().invoke(main, ["inspect", str(bad)])
    assert result.exit_code == 2 and "recording" in result.output
