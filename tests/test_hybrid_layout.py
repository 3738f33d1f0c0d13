"""The sparse layout of token classes (``nsaflex.hybrid.sparse_layout``): its
fields against a direct reading of the token types; and what is read off a GPU
token-type tensor (its layout, that its values are 0 or 1) being reused only
while the tensor is unchanged (tried on CPU tensors declared cacheable)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nsaflex import hybrid, tensor_memo
from nsaflex.errors import InputError
from nsaflex.inputs import check_inputs
from nsaflex.spec import Compression, Gate, Hybrid, Pattern
from tests.device import DEVICE


def pattern(vision_keys: str) -> Pattern:
    return Pattern(name="p", compression=Compression(block=4, stride=4), gate=Gate(kind="constant", values=(1.0,)),
                   hybrid=Hybrid(vision_keys=vision_keys))


token_types = st.integers(1, 3).flatmap(
    lambda batch: st.integers(1, 40).flatmap(
        lambda length: st.lists(st.lists(st.sampled_from((0, 1)), min_size=length, max_size=length),
                                min_size=batch, max_size=batch)))


@settings(max_examples=60, deadline=None)
@given(token_types, st.sampled_from(("vision", "all")))
def test_layout_fields_follow_the_token_types(rows, vision_keys):
    types = torch.tensor(rows)
    batch, length = types.shape
    layout = hybrid.sparse_layout(pattern(vision_keys), types, batch, length, "cpu")
    vision = types == 1
    assert layout.has_text == (not bool(vision.all()))
    assert torch.equal(layout.sparse_queries, vision)
    assert layout.host_lengths == tuple(layout.lengths.tolist())
    if vision_keys == "all" or bool(vision.all()):
        assert layout.identity and layout.max_length == length
        assert torch.equal(layout.lengths, torch.full((batch,), length))
    else:
        assert not layout.identity
        assert torch.equal(layout.lengths, vision.sum(1))
        assert layout.max_length >= int(vision.sum(1).max())
        for b in range(batch):
            n = int(vision[b].sum())
            assert torch.equal(layout.positions[b, :n], torch.nonzero(vision[b]).flatten())
    assert torch.equal(layout.cu_seqlens.long(), torch.cat([torch.zeros(1, dtype=torch.long), layout.lengths.cumsum(0)]))


@settings(max_examples=30, deadline=None)
@given(token_types, st.data())
def test_a_layout_is_reused_only_for_the_same_unmodified_tensor(rows, data):
    with cpu_tensors_remembered():
        types = torch.tensor(rows)
        batch, length = types.shape
        vision = pattern("vision")
        first = hybrid.sparse_layout(vision, types, batch, length, "cpu")
        assert hybrid.sparse_layout(vision, types, batch, length, "cpu") is first
        # Another pattern section, or an equal but distinct tensor: built anew.
        assert hybrid.sparse_layout(pattern("all"), types, batch, length, "cpu") is not first
        assert hybrid.sparse_layout(vision, types.clone(), batch, length, "cpu") is not first
        # An in-place write, here through a view, is seen.
        b, t = data.draw(st.integers(0, batch - 1)), data.draw(st.integers(0, length - 1))
        types[b].select(0, t).fill_(1 - int(types[b, t]))
        changed = hybrid.sparse_layout(vision, types, batch, length, "cpu")
        assert changed is not first
        assert torch.equal(changed.sparse_queries, types == 1)
        assert changed.has_text == (not bool((types == 1).all()))


@contextlib.contextmanager
def cpu_tensors_remembered():
    original = tensor_memo.cacheable
    tensor_memo.cacheable = lambda tensor: True
    try:
        yield
    finally:
        tensor_memo.cacheable = original


@settings(max_examples=30, deadline=None)
@given(token_types, st.data())
def test_token_values_are_checked_again_after_every_write(rows, data):
    types = torch.tensor(rows)
    batch, length = types.shape
    q = torch.zeros(batch, 2, length, 8)
    k = v = torch.zeros(batch, 1, length, 8)
    with cpu_tensors_remembered():
        check_inputs(pattern("vision"), q, k, v, None, types)
        check_inputs(pattern("vision"), q, k, v, None, types)
        b, t = data.draw(st.integers(0, batch - 1)), data.draw(st.integers(0, length - 1))
        bad = data.draw(st.sampled_from((3, -1, 7)))
        types[b, t] = bad
        for _ in range(2):  # a refusal is not remembered as a pass
            try:
                check_inputs(pattern("vision"), q, k, v, None, types)
            except InputError as error:
                assert error.argument == "token_types" and str(bad) in str(error)
            else:
                raise AssertionError("a token class outside {0, 1, 2} was accepted")


def test_an_entry_goes_with_its_tensor():
    from nsaflex.tensor_memo import _ENTRIES

    with cpu_tensors_remembered():
        types = torch.ones(2, 9, dtype=torch.long)
        layout = hybrid.sparse_layout(pattern("vision"), types, 2, 9, "cpu")
        slots = [slot for slot, entry in _ENTRIES.items() if entry[2] is layout]
        assert len(slots) == 1
        del types
        assert slots[0] not in _ENTRIES


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 2), st.integers(1, 3), st.integers(1, 6), st.integers(1, 12), st.integers(0, 2**31 - 1))
def test_text_attention_gradients(batch, heads, queries, keys, seed):
    """The text queries' attention (SDPA with a boolean mask) goes through a
    function whose backward recomputes it where SDPA's memory-efficient kernel
    does not serve (here float64; on CUDA that kernel's split backward, tested
    below): its gradients are SDPA's (float64 gradcheck), and with no gradient
    asked its output is plain SDPA's."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, queries, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(batch, heads, keys, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(batch, heads, keys, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(batch, 1, queries, keys, generator=gen) < 0.6
    mask[..., 0] = True  # no row fully masked (text_dense_attention's padding rows see key 0)
    assert torch.autograd.gradcheck(lambda a, b, c: hybrid._masked_attention(a, b, c, mask), (q, k, v))
    with torch.no_grad():
        plain = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        assert torch.equal(hybrid._masked_attention(q, k, v, mask), plain)


@pytest.mark.parametrize("caller", [None, True, False], ids=["off", "warn-only", "on"])
@pytest.mark.parametrize("raises", [False, True])
def test_deterministic_mode_is_scoped(caller, raises):
    """The text attention's backward turns torch's deterministic mode on (errors,
    not warnings) for its own duration only: the caller's setting (off, on
    with warnings only, on) is back afterwards, also when the block raises."""
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        if caller is not None:
            torch.use_deterministic_algorithms(True, warn_only=caller)
        setting = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
        with contextlib.suppress(KeyError), hybrid._deterministic_algorithms():
            assert (torch.are_deterministic_algorithms_enabled(),
                    torch.is_deterministic_algorithms_warn_only_enabled()) == (True, False)
            if raises:
                raise KeyError("inside")
        assert (torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled()) == setting
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 2), st.integers(1, 2), st.integers(1, 3), st.integers(1, 6), st.integers(1, 70),
       st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_split_keys_merge_to_the_whole_attention(batch, heads, repeat, queries, keys, chunks, seed):
    """Text queries over keys cut into chunks (SDPA's memory-efficient kernel on
    CUDA, explicit ops elsewhere), merged by their log-sum-exps, equal the
    attention over all keys (float32 against float64, relative 1e-5), chunks
    that a query cannot see included; the no-gradient text path takes the split
    where it is asked for."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, n, 16, generator=gen).to(DEVICE) for n in (repeat * queries, keys, keys))
    mask = torch.rand(batch, 1, queries, keys, generator=gen) < 0.3
    mask[..., torch.randint(keys, (1,), generator=gen)] = True  # no row fully masked
    mask = mask.to(DEVICE)
    whole = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), attn_mask=mask.repeat(1, 1, repeat, 1))
    got = hybrid.split_key_attention(q, k, v, mask, repeat, chunks)
    assert float((got.double() - whole).norm() / whole.norm()) < 1e-5
    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(hybrid, "_key_chunks", lambda *args: chunks)
        plain = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask.repeat(1, 1, repeat, 1))
        assert torch.equal(hybrid._masked_attention(q, k, v, mask, repeat), got if chunks > 1 else plain)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 2), st.integers(1, 3), st.integers(1, 3), st.integers(1, 6), st.integers(1, 70),
       st.integers(1, 4), st.integers(1, 6), st.booleans(), st.sampled_from([torch.float32, torch.bfloat16]),
       st.integers(0, 2**31 - 1))
def test_split_keys_backward_equals_the_whole_gradient(batch, heads, repeat, queries, keys, chunks, runs,
                                                       heads_outer, dtype, seed):
    """The text attention's backward over keys cut into runs (a batch of runs
    against the same queries, dq summed over the runs), from the split forward's
    output and log-sum-exp, equals the gradient of the attention over all keys:
    runs a query cannot see, a last run padded past the keys, repeated mask
    rows, and an output laid out heads-outer or rows-outer (the CUDA kernel
    reads its rows H * D apart whatever its strides) included.

    Against float64 autograd of the same (rounded) inputs, per entry: float32
    relative and absolute 1e-5; bf16 2e-2 (the output, the runs' dq shares and
    the gradients are each rounded to bf16, 2^-8 relative, over values of
    about unit size)."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v, grad_out = (torch.randn(batch, heads, n, 16, generator=gen).to(DEVICE, dtype)
                         for n in (repeat * queries, keys, keys, repeat * queries))
    mask = torch.rand(batch, 1, queries, keys, generator=gen) < 0.3
    mask[..., torch.randint(keys, (1,), generator=gen)] = True  # no row fully masked
    mask = mask.to(DEVICE)
    leaves = [x.double().requires_grad_(True) for x in (q, k, v)]
    whole = torch.nn.functional.scaled_dot_product_attention(*leaves, attn_mask=mask.repeat(1, 1, repeat, 1))
    expected = torch.autograd.grad(whole, leaves, grad_out.double())
    out, lse = hybrid._split_key_lse(q, k, v, mask, repeat, chunks)
    out = out.contiguous() if heads_outer else out.transpose(1, 2).contiguous().transpose(1, 2)
    size = -(-keys // runs)
    if q.is_cuda:
        size = -(-size // 16) * 16  # the memory-efficient kernel's alignment rule for the bias rows
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(hybrid, "_backward_runs", lambda *args: (-(-keys // size), size))
        got = hybrid._split_key_backward(grad_out, q, k, v, mask, out, lse, repeat)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    for name, a, b in zip("qkv", got, expected):
        # Elementwise, with an absolute floor: a row that sees one key has dq = 0 exactly
        # in float64 and float32 rounding (~1e-8 for inputs of unit scale) in float32.
        assert a.dtype == dtype, name
        torch.testing.assert_close(a.double(), b, rtol=tolerance, atol=tolerance, msg=f"d{name}")


def test_backward_key_runs_for_the_benchmark_shapes():
    """The text backward's runs for a 28/4-head layer on a 132-multiprocessor
    GPU (264 programs wanted, GQA fold: 4 heads, D = 128): 200 text tokens
    (1,400 rows) at 32K and 128K keys give 64 runs of 128-key multiples; a
    32K-token text prompt (229,376 rows) keeps one run (its copies would pass
    the bound)."""
    assert hybrid.key_runs(4, 1400 * 128, 32768, 264) == (64, 512)
    assert hybrid.key_runs(4, 1400 * 128, 131072, 264) == (64, 2048)
    assert hybrid.key_runs(4, 7 * 32768 * 128, 32768, 264) == (1, 32768)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 64), st.integers(1, 10**8), st.integers(1, 10**6), st.integers(1, 1000))
def test_backward_key_runs_cover_the_keys_and_bound_the_copies(row_heads, head_elements, length, programs):
    """Runs cover every key in 128-key multiples with less than one run of
    padding, number at most the programs wanted per row-head, and copy the
    query side within the bound (or are a single run)."""
    runs, size = hybrid.key_runs(row_heads, head_elements, length, programs)
    assert size % hybrid.BACKWARD_KEY_BLOCK == 0 and runs >= 1
    assert (runs - 1) * size < length <= runs * size
    assert runs <= max(1, -(-programs // row_heads))
    assert runs == 1 or runs * row_heads * head_elements <= hybrid.BACKWARD_COPY_ELEMENTS


@pytest.mark.parametrize("grad", [False, True])
def test_text_before_a_long_video_attends_only_its_keys(monkeypatch, grad):
    """One row of text, a vision run longer than MIN_KEY_CHUNK, text: the text
    before the run attends apart over its own keys, the text after it over
    every key; the text rows equal causal attention over all keys (float32
    against float64), gradients included."""
    length, before, after = hybrid.MIN_KEY_CHUNK + 150, 40, 60
    text = torch.zeros(1, length, dtype=torch.bool)
    text[:, :before] = True
    text[:, length - after:] = True
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, h, length, 16, generator=gen).requires_grad_(grad) for h in (4, 2, 2))
    seen = []
    original = hybrid._text_group_attention
    monkeypatch.setattr(hybrid, "_text_group_attention", lambda *args: seen.append(args[5]) or original(*args))
    with torch.set_grad_enabled(grad):
        out = hybrid.text_dense_attention(q, k, v, text)
    assert seen == [before, length]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    whole = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double().repeat_interleave(2, 1), v.double().repeat_interleave(2, 1), attn_mask=causal)
    rows = text[0]
    assert float((out[:, :, rows].double() - whole[:, :, rows]).norm() / whole[:, :, rows].norm()) < 1e-5
    assert torch.equal(out[:, :, ~rows], torch.zeros_like(out[:, :, ~rows]))
    if grad:
        grad_out = torch.randn(out.shape, generator=gen) * rows[None, None, :, None]
        got = torch.autograd.grad(out, (q, k, v), grad_out)
        want = torch.autograd.grad(whole, (q, k, v), grad_out.double())
        for a, b in zip(got, want):
            assert float((a.double() - b).norm() / b.norm()) < 1e-5


def test_a_hybrid_forward_reads_the_host_only_before_its_kernels(monkeypatch):
    """Once a token-class tensor's layout is remembered, the Triton backend's
    hybrid forward (a prompt, a video, a question: the in-place run) reads
    nothing on the host once its first kernel is queued but the finiteness of
    q, k and v, whose reduction was queued before that kernel
    (:func:`nsaflex.hybrid.finite_later`): on a GPU a read there would wait for
    the kernels and leave the GPU idle while the host queues the text path."""
    import nsaflex
    from torch.utils._python_dispatch import TorchDispatchMode

    from nsaflex.backends import triton as backend
    from nsaflex.kernels import ops
    from nsaflex.spec import Selection, Window

    events = []

    class Reads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in ("_local_scalar_dense", "item"):
                events.append("read")
            return func(*args, **(kwargs or {}))

    tolist = torch.Tensor.tolist  # a CPU tensor's tolist reads without a dispatched op
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: events.append("read") or tolist(self))
    launch = ops._launch
    monkeypatch.setattr(ops, "_launch", lambda *a, **k: events.append("kernel") or launch(*a, **k))
    finite_later = backend.finite_later

    def traced_finite_later(*tensors):
        events.append("reduction")
        read = finite_later(*tensors)
        return lambda: events.append("finite read") or read()

    monkeypatch.setattr(backend, "finite_later", traced_finite_later)
    p = Pattern(name="p", compression=Compression(block=8, stride=8), selection=Selection(block=8, count=2),
                window=Window(size=8), gate=Gate(kind="constant", values=(0.3, 0.3, 0.4)),
                hybrid=Hybrid(vision_keys="vision"))
    attn = nsaflex.compile(p, backend="triton", device=DEVICE)
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, h, 96, 16, generator=gen).to(DEVICE) for h in (2, 1, 1))
    types = torch.zeros(1, 96, dtype=torch.long, device=DEVICE)
    types[:, 10:80] = 1
    with cpu_tensors_remembered():
        attn(q, k, v, None, types)  # reads and remembers the layout
        events.clear()
        with Reads():
            attn(q, k, v, None, types)
    first = events.index("kernel")
    assert events.index("reduction") < first
    after = events[first:]
    reads = [i for i, event in enumerate(after) if event == "read"]
    # Each read after the first kernel is the deferred finiteness read (CPU: bool(flag); CUDA: an event's wait).
    assert reads and all(after[i - 1] == "finite read" for i in reads), events
