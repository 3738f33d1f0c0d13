"""``nsaflex show`` and ``nsaflex patterns``: the masks against the reference and
the budget, the pixels of the PNGs, the terminal picture, and the command line."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from nsaflex.budget import attended_fraction, count_attended_pairs
from nsaflex.cli.main import main
from nsaflex.errors import InputError, PatternError
from nsaflex.loader import bundled_patterns, load_pattern, loads_pattern
from nsaflex.reference import selection_mask, sparse_branches, sparse_row_indices
from nsaflex.show import (
    BRANCH_COLOURS,
    ShowInputs,
    attended_masks,
    budget_series,
    mask_counts,
    pattern_summaries,
    plot_budget,
    plot_masks,
    pyplot,
    terminal_picture,
)
from tests.strategies import lengths_for, patterns

WINDOW4 = "name: window4\nwindow: {size: 4}\ngate: {kind: constant, values: [1.0]}\n"
COMPRESSION4 = "name: compression4\ncompression: {block: 4, stride: 4}\ngate: {kind: constant, values: [1.0]}\n"
# One head, l = l' = d = 4, two blocks per query (the current one forced).
SELECTION4 = (
    "name: selection4\ncompression: {block: 4, stride: 4}\n"
    "selection: {block: 4, count: 2, forced: [current]}\ngate: {kind: constant, values: [1.0, 1.0]}\n"
)
LAYERED = (
    "name: layered\nmodel: {num_layers: 2}\nwindow: {size: 4}\ngate: {kind: constant, values: [1.0]}\n"
    "layers:\n  - at: [1]\n    dense: true\n"
)
HYBRID = (
    "name: hybrid4\ncompression: {block: 4, stride: 4}\nselection: {block: 4, count: 2}\nwindow: {size: 2}\n"
    "gate: {kind: constant, values: [1.0, 1.0, 1.0]}\nhybrid: {vision_keys: vision}\n"
)
# PNG colours are 8-bit: one step of 1/255 either way.
COLOUR_TOLERANCE = 1.5 / 255


def block_one_inputs(length: int = 16) -> ShowInputs:
    """One head whose queries all point at the keys of block 1 (positions 4..7):
    its compressed token, and so block 1, scores highest for every query that sees it."""
    q = torch.zeros(1, 1, length, 4, dtype=torch.float64)
    q[..., 0] = 1.0
    k = torch.zeros(1, 1, length, 4, dtype=torch.float64)
    k[0, 0, 4:8, 0] = 8.0
    return ShowInputs(q, k, torch.zeros(1, 1, length, 4, dtype=torch.float64), None, "block one")


def pixel(figure, image, panel: int, query: int, key: int):
    """RGB of the PNG ``image`` at the centre of cell (query, key) of panel ``panel``."""
    x, y = figure.axes[panel].transData.transform((key, query))
    return torch.tensor(image[int(image.shape[0] - y), int(x), :3], dtype=torch.float64)


def branch_colour(name: str) -> torch.Tensor:
    return torch.tensor(BRANCH_COLOURS[name], dtype=torch.float64) / 255


WHITE = torch.ones(3, dtype=torch.float64)


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=True)


def assert_clean_failure(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.output, (fragment, result.output)


# --- masks ----------------------------------------------------------------------------------------


def test_window_mask_is_the_band() -> None:
    masks = attended_masks(loads_pattern(WINDOW4), 16)
    assert list(masks) == ["window", "combined"]
    window = masks["window"]
    assert window[10, 8] and window[10, 7] and window[10, 10]
    assert not window[10, 6] and not window[10, 2] and not window[10, 11]
    assert mask_counts(masks)["window"]["pairs"] == count_attended_pairs(loads_pattern(WINDOW4), 16)["window"] == 58


def test_compression_marks_every_key_of_a_visible_block() -> None:
    compression = attended_masks(loads_pattern(COMPRESSION4), 16)["compression"]
    # Query 7 sees tokens 0 and 1 (last positions 3 and 7), query 6 only token 0.
    assert compression[7, :8].all() and not compression[7, 8:].any()
    assert compression[6, :4].all() and not compression[6, 4:].any()
    assert not compression[:3].any()  # no block complete before position 3


def test_selection_follows_the_input() -> None:
    selection = attended_masks(loads_pattern(SELECTION4), inputs=block_one_inputs())["selection"]
    # Current block forced, block 1 chosen by score: query 15 reads 4..7 and 12..15.
    expected = torch.zeros(16, dtype=torch.bool)
    expected[4:8] = True
    expected[12:16] = True
    assert torch.equal(selection[15], expected)
    assert torch.equal(selection[9], torch.tensor([False] * 4 + [True] * 4 + [True] * 2 + [False] * 6))


def test_selection_is_drawn_for_the_chosen_head() -> None:
    """``scoring: head``: each query head selects on its own; head 1 points at block 2."""
    pattern = loads_pattern(SELECTION4.replace("forced: [current]", "forced: [current], scoring: head"))
    inputs = block_one_inputs()
    q = inputs.q.repeat(1, 2, 1, 1)
    k = torch.zeros(1, 1, 16, 4, dtype=torch.float64)
    k[0, 0, 4:8, 0] = 8.0
    k[0, 0, 8:12, 1] = 8.0
    q[0, 1, :, 0], q[0, 1, :, 1] = 0.0, 1.0
    two_heads = ShowInputs(q, k, inputs.v, None, "two heads")
    for head, block in ((0, 1), (1, 2)):
        row = attended_masks(pattern, inputs=two_heads, head=head)["selection"][15]
        assert row.nonzero().flatten().tolist() == [*range(4 * block, 4 * block + 4), 12, 13, 14, 15], head


def test_layer_overrides_apply_and_bad_layers_are_refused() -> None:
    pattern = loads_pattern(LAYERED)
    assert list(attended_masks(pattern, 8, layer=0)) == ["window", "combined"]
    dense = attended_masks(pattern, 8, layer=1)
    assert list(dense) == ["dense", "combined"]
    assert torch.equal(dense["dense"], torch.ones(8, 8, dtype=torch.bool).tril())
    with pytest.raises(InputError, match=r"layer: expected a decoder layer index in 0\.\.1 \(model.num_layers = 2\), found 2"):
        attended_masks(pattern, 8, layer=2)


def test_hybrid_text_rows_are_dense_and_vision_rows_read_vision_keys() -> None:
    masks = attended_masks(loads_pattern(HYBRID), 16, text_tokens=4)
    assert list(masks) == ["compression", "selection", "window", "dense", "combined"]
    assert torch.equal(masks["dense"][:4], torch.ones(4, 16, dtype=torch.bool).tril())
    assert not masks["dense"][4:].any()
    for name in ("compression", "selection", "window"):
        assert not masks[name][:4].any() and not masks[name][:, :4].any(), name
    # The window counts positions in the compacted vision sequence: query 9 reads 8 and 9.
    assert masks["window"][9].nonzero().flatten().tolist() == [8, 9]
    assert torch.equal(masks["combined"], masks["compression"] | masks["selection"] | masks["window"] | masks["dense"])


@settings(max_examples=25)
@given(data=st.data())
def test_masks_match_the_reference(data) -> None:
    """Per query and key, against the reference's own selection and the semantics' definitions."""
    pattern = data.draw(patterns(small=True, allow_mlp_pooling=False, allow_model=False, allow_layers=False), label="pattern")
    length = data.draw(lengths_for(pattern, max_length=40), label="length")
    kv_heads, group = data.draw(st.sampled_from(((1, 1), (1, 2), (2, 2))), label="heads")
    head = data.draw(st.integers(0, kv_heads * group - 1), label="head")
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    q = torch.randn(1, kv_heads * group, length, 8, generator=generator, dtype=torch.float64)
    k, v = (torch.randn(1, kv_heads, length, 8, generator=generator, dtype=torch.float64) for _ in range(2))
    types = None
    if pattern.hybrid is not None:
        types = torch.tensor([data.draw(st.lists(st.integers(0, 1), min_size=length, max_size=length))])
    masks = attended_masks(pattern, inputs=ShowInputs(q, k, v, types, "test"), head=head)

    index = sparse_row_indices(pattern, types[0] if types is not None else None, length).tolist()
    sparse_queries = set(index) if types is None else {p for p in index if types[0, p] == 1}
    branches = sparse_branches(q[0][:, index], k[0][:, index], v[0][:, index], pattern) if index else {}
    chosen = None
    if pattern.selection is not None and index:
        chosen = selection_mask(branches["selected_blocks"], pattern.selection.block, len(index))[head]
    for t in range(length):
        for s in range(length):
            sparse = t in sparse_queries and s in index
            ct, cs = (index.index(t), index.index(s)) if sparse else (None, None)
            if pattern.window is not None:
                assert bool(masks["window"][t, s]) == (sparse and 0 <= ct - cs < pattern.window.size)
            if pattern.compression is not None:
                c = pattern.compression
                pooled_by_visible = sparse and any(
                    i * c.stride <= cs < i * c.stride + c.block
                    and (i * c.stride + c.block - 1 <= ct if c.visibility == "causal" else i * c.stride + c.block - 1 >= ct)
                    for i in range(c.num_tokens(len(index)))
                )
                assert bool(masks["compression"][t, s]) == pooled_by_visible
            if chosen is not None:
                assert bool(masks["selection"][t, s]) == (sparse and bool(chosen[ct, cs]))
            if "dense" in masks:
                assert bool(masks["dense"][t, s]) == (t not in sparse_queries and s <= t)
    assert torch.equal(masks["combined"], torch.stack([m for n, m in masks.items() if n != "combined"]).any(0))


@settings(max_examples=25)
@given(data=st.data())
def test_counts_match_the_budget(data) -> None:
    """Selection and window pairs of a picture are the budget's exact counts
    (they do not depend on the data); hybrid patterns on all-vision input."""
    pattern = data.draw(patterns(small=True, allow_mlp_pooling=False, allow_model=False, allow_layers=False), label="pattern")
    length = data.draw(lengths_for(pattern, max_length=48), label="length")
    kind = data.draw(st.sampled_from(("random", "video")), label="inputs")
    counts = mask_counts(attended_masks(pattern, length, inputs=kind, text_tokens=0 if pattern.hybrid else None, seed=length))
    expected = count_attended_pairs(pattern, length)
    for name in ("selection", "window"):
        if name in expected:
            assert counts[name]["pairs"] == expected[name], name


def test_budget_series_evaluates_the_closed_forms() -> None:
    pattern = load_pattern("videonsa")
    lengths = [1, 100, 4096, 4097, 131072]
    series = budget_series(pattern, lengths)
    for position, length in enumerate(lengths):
        exact = count_attended_pairs(pattern, length)
        for name, values in series["branches"].items():
            assert values["pairs"][position] == exact[name]
            assert values["keys_per_query"][position] == pytest.approx(exact[name] / length, rel=1e-12)
        assert series["attended"]["attended_fraction"][position] == pytest.approx(attended_fraction(pattern, length), rel=1e-12)


# --- pictures -------------------------------------------------------------------------------------


def test_window_png_pixels(tmp_path) -> None:
    from matplotlib.image import imread

    path = tmp_path / "window.png"
    figure = plot_masks(attended_masks(loads_pattern(WINDOW4), 16), path, pattern=loads_pattern(WINDOW4))
    image = imread(path)
    width, height = figure.get_size_inches() * figure.dpi
    assert image.shape[:2] == (round(height), round(width))
    assert len(figure.axes) == 2  # window, combined
    for panel in (0, 1):
        assert torch.allclose(pixel(figure, image, panel, 10, 8), branch_colour("window"), atol=COLOUR_TOLERANCE)
        assert torch.allclose(pixel(figure, image, panel, 10, 2), WHITE, atol=COLOUR_TOLERANCE)
        assert torch.allclose(pixel(figure, image, panel, 3, 12), WHITE, atol=COLOUR_TOLERANCE)  # above the diagonal
    pyplot().close(figure)


def test_compression_and_selection_png_pixels(tmp_path) -> None:
    from matplotlib.image import imread

    pattern = loads_pattern(SELECTION4)
    masks = attended_masks(pattern, inputs=block_one_inputs())
    path = tmp_path / "selection.png"
    figure = plot_masks(masks, path, pattern=pattern)
    image = imread(path)
    assert [axis.get_title().split("\n")[0] for axis in figure.axes] == [
        "compression (l=4, d=4)", "selection (l'=4, n=2)", "combined (overlaps mix colours)"]
    compression, selection = branch_colour("compression"), branch_colour("selection")
    # Compression: query 7 sees blocks 0 and 1, not block 2.
    for key, colour in ((0, compression), (7, compression), (8, WHITE)):
        assert torch.allclose(pixel(figure, image, 0, 7, key), colour, atol=COLOUR_TOLERANCE), key
    # Selection: query 15 reads block 1 (chosen) and block 3 (current), not blocks 0 and 2.
    for key, colour in ((5, selection), (13, selection), (2, WHITE), (9, WHITE)):
        assert torch.allclose(pixel(figure, image, 1, 15, key), colour, atol=COLOUR_TOLERANCE), key
    # Combined: where both branches read a key, the mean of their colours.
    assert torch.allclose(pixel(figure, image, 2, 15, 5), (compression + selection) / 2, atol=COLOUR_TOLERANCE)
    pyplot().close(figure)


def test_budget_png(tmp_path) -> None:
    from matplotlib.image import imread

    path = tmp_path / "budget.png"
    figure = plot_budget(load_pattern("nsa"), path, lengths=[256, 1024, 4096, 16384], mark=4096)
    width, height = figure.get_size_inches() * figure.dpi
    assert imread(path).shape[:2] == (round(height), round(width))
    labels = [line.get_label() for line in figure.axes[0].get_lines()]
    assert labels[:5] == ["compression (compressed tokens)", "selection", "window", "selection + window", "dense causal"]
    keys = figure.axes[0].get_lines()[2].get_ydata()
    assert list(keys) == pytest.approx([count_attended_pairs(load_pattern("nsa"), n)["window"] / n for n in (256, 1024, 4096, 16384)])
    pyplot().close(figure)


TERMINAL_WINDOW4 = """\
window            combined
█▄                █▄
███▄              ███▄
 ▀███▄             ▀███▄
   ▀███▄             ▀███▄
     ▀███▄             ▀███▄
       ▀███▄             ▀███▄
         ▀███▄             ▀███▄
           ▀███▄             ▀███▄
L = 16: queries down, keys across; a character is 1 key x 2 queries"""


def test_terminal_picture_of_a_window() -> None:
    text = terminal_picture(attended_masks(loads_pattern(WINDOW4), 16))
    assert text.plain == TERMINAL_WINDOW4
    styles = {str(span.style) for span in text.spans if "rgb" in str(span.style)}
    assert styles == {"rgb(44,160,44)"}  # every cell fully attended: the branch's own colour


def test_terminal_picture_fits_80_columns() -> None:
    text = terminal_picture(attended_masks(load_pattern("qblock-small"), 1024))
    lines = text.plain.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert lines[-1].endswith("a character is 32 keys x 64 queries")
    assert lines[0].startswith("compression") and "selection" in lines[0]


# --- bad input ------------------------------------------------------------------------------------


def test_bad_tensors_are_refused(tmp_path) -> None:
    pattern = loads_pattern(WINDOW4)
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(InputError, match="k: expected a number of kv heads dividing the 2 query heads"):
        attended_masks(pattern, inputs=ShowInputs(q, torch.randn(1, 3, 8, 4), torch.randn(1, 3, 8, 4), None, "t"))
    good = ShowInputs(q, torch.randn(1, 1, 8, 4), torch.randn(1, 1, 8, 4), None, "t")
    with pytest.raises(InputError, match=r"head: expected a query head index in 0\.\.1, found 2"):
        attended_masks(pattern, inputs=good, head=2)
    with pytest.raises(InputError, match="length: expected the length of the given tensors"):
        attended_masks(pattern, 16, inputs=good)
    with pytest.raises(InputError, match=r"length: expected an integer in 1\.\.8192"):
        attended_masks(pattern, 0)


def test_unknown_bundled_name_lists_the_bundled_patterns() -> None:
    with pytest.raises(PatternError) as caught:
        load_pattern("nope")
    assert ", ".join(bundled_patterns()) in str(caught.value)


# --- command line ---------------------------------------------------------------------------------


def test_show_writes_pngs_and_json(tmp_path) -> None:
    pattern_file = tmp_path / "window4.yaml"
    pattern_file.write_text(WINDOW4)
    result = run("show", str(pattern_file), "--length", "16", "--out", str(tmp_path / "pictures"), "--json", "-")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["length"] == 16 and document["inputs"] == "random"
    assert document["branches"]["window"] == {"pairs": 58, "keys_per_query": 58 / 16, "attended_fraction": 58 / 136}
    assert [p.rsplit("/", 1)[1] for p in document["files"]] == ["window4-L16-masks.png", "window4-budget.png"]
    for path in document["files"]:
        assert pyplot().imread(path).shape[0] > 100
        assert f"wrote {path}" in result.stderr
    assert "█" not in result.stdout  # the picture stays off standard output when the JSON takes it


def test_show_terminal_picture_and_tensors(tmp_path) -> None:
    pattern_file = tmp_path / "selection4.yaml"
    pattern_file.write_text(SELECTION4)
    inputs = block_one_inputs()
    torch.save({"q": inputs.q, "k": inputs.k, "v": inputs.v}, tmp_path / "qkv.pt")
    result = run("show", str(pattern_file), "--tensors", str(tmp_path / "qkv.pt"), "--json", str(tmp_path / "c.json"))
    assert result.exit_code == 0, result.output
    assert "selection4, L = 16, head 0" in result.output and "compression       selection" in result.output
    counts = json.loads((tmp_path / "c.json").read_text())["branches"]
    assert counts["selection"]["pairs"] == int(attended_masks(loads_pattern(SELECTION4), inputs=inputs)["selection"].sum())


def test_show_hybrid_tensors_with_token_types(tmp_path) -> None:
    pattern_file = tmp_path / "hybrid4.yaml"
    pattern_file.write_text(HYBRID)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 16, 4, generator=generator) for _ in range(3))
    types = torch.tensor([[1] * 16, [0] * 6 + [1] * 10])
    torch.save({"q": q, "k": k, "v": v, "token_types": types}, tmp_path / "qkv.pt")
    result = run("show", str(pattern_file), "--tensors", str(tmp_path / "qkv.pt"), "--row", "1", "--head", "1", "--json", "-")
    assert result.exit_code == 0, result.output
    counts = json.loads(result.stdout)["branches"]
    assert counts["dense"]["pairs"] == 6 * 7 // 2  # the six text queries, dense and causal
    expected = attended_masks(loads_pattern(HYBRID), inputs=ShowInputs(q, k, v, types, "t"), row=1, head=1)
    assert counts == mask_counts(expected)
    missing_types = tmp_path / "no-types.pt"
    torch.save({"q": q, "k": k, "v": v}, missing_types)
    assert_clean_failure(run("show", str(pattern_file), "--tensors", str(missing_types)),
                         "token_types: expected a [B, L] tensor of token classes")


def test_patterns_lists_the_bundled_patterns() -> None:
    result = run("patterns", "--json", "-")
    assert result.exit_code == 0, result.output
    listed = json.loads(result.stdout)
    assert [entry["name"] for entry in listed] == list(bundled_patterns())
    for entry in listed:
        pattern = load_pattern(entry["name"])
        assert entry["keys_per_query"] == pattern.keys_per_query
        assert entry["attended_fraction"] == attended_fraction(pattern, 131072)
    assert listed == pattern_summaries()
    table = run("patterns")
    assert table.exit_code == 0
    assert "videonsa" in table.output and "2,304" in table.output and "3.44%" in table.output


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (("show", "nope"), ("expected an existing pattern file or a bundled pattern name (nsa, ", "window)")),
        (("compile", "nope"), ("videonsa-w512",)),
        (("show", "window", "--length", "0"), ("--length", "at least 1 token")),
        (("show", "window", "--length", "16k"), ("--length: expected an integer in 1..8192",)),
        (("show", "videonsa", "--layer", "28"), ("--layer: expected a decoder layer index in 0..27",)),
        (("show", "window", "--length", "16", "--head", "9"), ("--head: expected a query head index in 0..3",)),
        (("show", "window", "--tensors", "missing.pt"), ("--tensors: expected an existing file written by torch.save",)),
        (("show", "window", "--tensors", "x.pt", "--inputs", "video"), ("--inputs: expected no --inputs with --tensors",)),
        (("show", "window", "--json", "no/such/folder/counts.json"), ("--json: expected a path in an existing folder",)),
        (("show", "window", "--text-tokens", "3"), ("--text-tokens: expected 0: the pattern has no hybrid section",)),
    ],
)
def test_bad_command_lines(args, fragments) -> None:
    assert_clean_failure(run(*args), *fragments)


@pytest.mark.parametrize(
    ("tensors", "fragments"),
    [
        ({"q": torch.randn(2, 8, 4), "k": torch.randn(2, 8, 4), "v": torch.randn(2, 8, 4)},
         ("--tensors: expected q, k, v in the API layout [B, H, L, D]", "q [2, 8, 4]")),
        ({"q": torch.randn(1, 2, 8, 4), "k": torch.randn(1, 1, 8, 4)}, ("missing v",)),
        ({"q": torch.randn(1, 2, 8, 4), "k": torch.randn(1, 1, 9, 4), "v": torch.randn(1, 1, 9, 4)},
         ("k: expected length 8 (as q), found 9",)),
        ([torch.randn(1)], ("a dict with keys q, k, v",)),
    ],
)
def test_bad_tensor_files(tmp_path, tensors, fragments) -> None:
    torch.save(tensors, tmp_path / "bad.pt")
    assert_clean_failure(run("show", "window", "--tensors", str(tmp_path / "bad.pt")), *fragments)
