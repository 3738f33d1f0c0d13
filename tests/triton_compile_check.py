"""Compile every Triton kernel for sm_90 without a GPU (catches front-end and
lowering errors before device time is spent).

    python tests/triton_compile_check.py            # [--all: more patterns; --small: only the small one]

With ``NSAFLEX_COMPILE_DUMP=DIR`` each compiled kernel's cubin is written to
``DIR/<kernel>-<n>.cubin`` (read it with ``cuobjdump -sass``) to compare the
generated code of two versions:

    python tests/triton_compile_check.py --compare BEFORE_DIR AFTER_DIR

disassembles each pair of cubins of the same name with triton's
``cuobjdump`` and compares the instruction sequences with the kernel
parameters' constant-bank offsets (``c[0x0][0x...]``) normalised: they move
when parameters are reordered or grouped into tuples, and nothing else about
the code does. Same sequence otherwise: the same code, the same speed.

Records each launch's arguments by running the videonsa-class forward and
backward on CPU under TRITON_INTERPRET=1 (tiny shapes), with the real tile
constants of a 28/4-head, D=128 bf16 call, then compiles those signatures with
``triton.compile`` for ``GPUTarget('cuda', 90, 32)``. Tuple arguments (stride
groups) are recorded as the launcher specialises them, element by element: a
signature of nested types, constants and 16-divisibility at paths such as
``sq.2`` (element 2 of argument ``sq``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

if sys.argv[1:2] not in (["--compile"], ["--compare"]):
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402

from nsaflex.kernels import backward as bwd  # noqa: E402
from nsaflex.kernels import forward as fwd  # noqa: E402

RECORDED: list = []


def _tname(x):
    if isinstance(x, tuple):
        return tuple(_tname(item) for item in x)
    if isinstance(x, torch.Tensor):
        return "*" + {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32",
                      torch.int64: "i64"}[x.dtype]
    if isinstance(x, bool):
        return "i1"
    if isinstance(x, int):
        return "i64" if abs(x) >= 2**31 else "i32"
    if isinstance(x, float):
        return "fp32"
    raise TypeError(type(x))


class Recorder:
    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def call(*args, **kwargs):
            RECORDED.append((self.kernel, args, kwargs))
            return self.kernel[grid](*args, **kwargs)

        return call


def record(pattern, shape, dtype, *, train=True, pointers=False, atomic=False):
    """Record the launches of one forward (and, where ``train``, its backward:
    the forward then saves residuals, a launch of its own); ``pointers``: key
    blocks through per-element pointers (the fallback where tensor descriptors
    cannot serve); ``atomic``: the plan's ``deterministic=False``."""
    from nsaflex.backends import triton as backend
    from nsaflex.kernels import ops

    for mod in (fwd, bwd):
        for name in dir(mod):
            obj = getattr(mod, name)
            if name.endswith("_kernel") and not isinstance(obj, Recorder):
                setattr(mod, name, Recorder(obj))
    B, Hkv, G, L, D = shape
    q = torch.randn(B, Hkv * G, L, D, dtype=dtype, requires_grad=train)
    k = torch.randn(B, Hkv, L, D, dtype=dtype, requires_grad=train)
    v = torch.randn(B, Hkv, L, D, dtype=dtype, requires_grad=train)
    gates = torch.rand(B, Hkv * G, L, len(pattern.branches), dtype=dtype, requires_grad=train)
    types = torch.ones(B, L, dtype=torch.long) if pattern.hybrid is not None else None
    tma_ready = ops.tma_ready
    if pointers:
        ops.tma_ready = lambda *tensors: False
    try:
        out = backend._sparse_forward(pattern, ops.make_config(pattern, atomic=atomic), q, k, v, gates, types, None)
        if train:
            out.sum().backward()
    finally:
        ops.tma_ready = tma_ready


def signatures():
    """Recorded launches as (module, kernel, signature, constexprs, options), deduplicated."""
    out, seen = [], set()
    for kernel, args, kwargs in RECORDED:
        fn = kernel.fn
        import inspect

        names = list(inspect.signature(fn).parameters)
        params = dict(zip(names, args))
        opts = {k: v for k, v in kwargs.items() if k in ("num_warps", "num_stages", "maxnreg")}
        params.update({k: v for k, v in kwargs.items() if k not in opts})
        annotations = fn.__annotations__
        sig, const, aligned = {}, {}, []
        for name in names:
            if "constexpr" in str(annotations.get(name, "")):
                sig[name] = "constexpr"
                const[name] = params[name]
                continue
            kind, attr = _specialize(params[name])
            sig[name] = kind
            for path, leaf_kind, leaf_attr, value in _leaves(name, kind, attr, params[name]):
                if leaf_kind == "constexpr":  # an integer equal to 1, as the launcher specialises it
                    const[path] = value
                elif leaf_attr == "D":
                    aligned.append(path)
        opts["aligned"] = aligned
        key = json.dumps([fn.__module__, fn.__name__, sig, const, opts], sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            out.append((fn.__module__, fn.__name__, sig, const, opts))
    return out


def _specialize(value):
    """The launcher's specialisation of one argument: its type, and "D" when it is
    divisible by 16 (pointers: 16-byte aligned). Without the "D" attributes the
    compiler cannot vectorise a load whose offsets use a stride argument, so the
    code it makes would not be the code a GPU launch runs. A tuple argument
    gives a tuple of types and one of attributes, element by element."""
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend

        kind, attr = native_specialize_impl(BaseBackend, value, False, True, True)
    except (ImportError, TypeError):  # a triton without this entry point (or another signature): types only
        return _tname(value), ""
    return kind, attr


def _leaves(name: str, kind, attr, value, path: str = ""):
    """(path, type, attribute, value) of each scalar inside one argument: the
    argument itself, or for a tuple each element, its path ``name.i``."""
    if isinstance(kind, (tuple, list)):
        for i, item in enumerate(kind):
            yield from _leaves(name, item, attr[i] if isinstance(attr, (tuple, list)) else None, value[i],
                               f"{path}.{i}")
    else:
        yield name + path, kind, attr or "", value


def _path_key(names: list[str], path: str) -> tuple[int, ...]:
    """The compiler's key of a recorded path: ``sq.2`` -> (index of sq, 2)."""
    base, *rest = path.split(".")
    return (names.index(base), *map(int, rest))


def _as_tuples(kind):
    """A recorded signature entry with JSON's lists back as tuples (how the compiler takes tuple arguments)."""
    return tuple(_as_tuples(item) for item in kind) if isinstance(kind, list) else kind


def sass(cubin: str) -> list[str]:
    """The instructions of a cubin (triton's ``cuobjdump -sass``) without
    addresses and encodings, and with every kernel-parameter operand
    ``c[0x0][0x...]`` written ``c[0x0][PARAM]``: what stays the same when
    only the order or grouping of the parameters changes."""
    import re
    import shutil

    from triton.backends.nvidia import compiler as nvidia

    tool = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
    tool = tool if os.path.exists(tool) else shutil.which("cuobjdump")
    text = subprocess.run([tool, "-sass", cubin], capture_output=True, text=True, check=True).stdout
    lines = []
    for line in text.splitlines():
        match = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s*(.*?)\s*;", line)
        if match:
            lines.append(re.sub(r"c\[0x0\]\[0x[0-9a-f]+\]", "c[0x0][PARAM]", match.group(1)))
    return lines


def compare_dumps(before: str, after: str) -> bool:
    """Prints, per cubin of ``before`` (``NSAFLEX_COMPILE_DUMP`` directories),
    whether ``after`` has the same instructions (:func:`sass`); True when all do."""
    import difflib

    same_all = True
    names = sorted(set(os.listdir(before)) | set(os.listdir(after)))
    for name in names:
        if not (os.path.exists(os.path.join(before, name)) and os.path.exists(os.path.join(after, name))):
            print(f"DIFF {name}: only in {'after' if os.path.exists(os.path.join(after, name)) else 'before'}")
            same_all = False
            continue
        old, new = sass(os.path.join(before, name)), sass(os.path.join(after, name))
        if old == new:
            print(f"same {name}: {len(old)} instructions")
            continue
        same_all = False
        diff = [line for line in difflib.unified_diff(old, new, lineterm="", n=0) if line[:1] in "+-"]
        print(f"DIFF {name}: {len(old)} -> {len(new)} instructions, {len(diff) - 2} lines differ")
        print("\n".join(diff[2:22]))
    return same_all


def register_use(ptx: str | None, arch: int) -> str:
    """Registers per thread and spilled bytes from ``ptxas -v`` (triton's own
    ptxas): a kernel that spills runs far below its matrix rate. "wgmma
    serialised": ptxas waits after every asynchronous matrix product (C7512,
    too few registers for their pipeline)."""
    import re
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    if not ptx:
        return ""
    try:  # triton 3.6 takes no argument, 3.9 the architecture
        ptxas = get_ptxas(arch)
    except TypeError:
        ptxas = get_ptxas()
    ptxas = getattr(ptxas, "path", ptxas)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as handle:
        handle.write(ptx)
        handle.flush()
        try:
            result = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}a", handle.name, "-o", "/dev/null"],
                                    capture_output=True, text=True)
        except OSError as error:
            return f"(ptxas: {error})"
    regs = re.search(r"Used (\d+) registers", result.stderr)
    spills = re.search(r"(\d+) bytes spill stores", result.stderr)
    serial = " wgmma serialised" if "wgmma.mma_async instructions are serialized" in result.stderr else ""
    return f"regs={regs.group(1) if regs else '?'} spill={spills.group(1) if spills else '?'}{serial}"


def compile_all(items, arch=90):
    import importlib

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.errors import PTXASError

    target = GPUTarget("cuda", arch, 32)
    ok = True
    for module, name, sig, const, opts in items:
        fn = getattr(importlib.import_module(module), name)
        names = fn.arg_names
        sig = {k: _as_tuples(v) for k, v in sig.items()}
        constexprs = {_path_key(names, k): v for k, v in const.items()}
        opts = dict(opts)
        attrs = {_path_key(names, k): [["tt.divisibility", 16]] for k in opts.pop("aligned", [])}
        try:
            note = ""
            try:
                compiled = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=target, options=opts)
            except PTXASError:
                # as ops._launch does: a register cap that ptxas cannot meet is dropped
                if "maxnreg" not in opts:
                    raise
                note = f" (maxnreg {opts.pop('maxnreg')} dropped: ptxas cannot meet it)"
                compiled = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=target, options=opts)
            meta = compiled.metadata
            dump = os.environ.get("NSAFLEX_COMPILE_DUMP")
            if dump:
                os.makedirs(dump, exist_ok=True)
                index = sum(1 for f in os.listdir(dump) if f.startswith(name + "-"))
                with open(os.path.join(dump, f"{name}-{index}.cubin"), "wb") as handle:
                    handle.write(compiled.asm["cubin"])
            print(f"ok   {name:24s} shared={getattr(meta, 'shared', '?')} warps={opts.get('num_warps', 4)} "
                  f"stages={opts.get('num_stages', 3)} cap={opts.get('maxnreg', 0)} "
                  f"{register_use(compiled.asm.get('ptx'), arch)} "
                  f"{ {k: v for k, v in const.items() if k in ('BT', 'G', 'D', 'NT', 'BN', 'BS', 'ATOMIC', 'TMA', 'JP', 'JT', 'SAVE')} }"
                  f"{note}", flush=True)
        except Exception as error:  # noqa: BLE001
            ok = False
            print(f"FAIL {name}: {str(error)[-3000:]}", flush=True)
    return ok


if __name__ == "__main__":
    from nsaflex.loader import load_pattern
    from nsaflex.spec import Compression, Gate, Pattern, Selection, Window
    import dataclasses

    videonsa = load_pattern("videonsa")
    videonsa = dataclasses.replace(videonsa, model=dataclasses.replace(videonsa.model, query_heads=None, kv_heads=None))
    if sys.argv[1:2] == ["--compare"]:
        sys.exit(0 if compare_dumps(sys.argv[2], sys.argv[3]) else 1)
    if sys.argv[1:2] == ["--compile"]:
        items = json.load(open(sys.argv[2]))
        sys.exit(0 if compile_all(items) else 1)
    full = "--small" not in sys.argv  # --small: only the small pattern below (tests/test_triton_compile.py)
    if full:
        record(videonsa, (1, 1, 7, 130, 128), torch.bfloat16)
        # inference (no residuals saved: the branch outputs stay in registers)
        record(videonsa, (1, 1, 7, 130, 128), torch.bfloat16, train=False)
        # the non-deterministic backward: atomic dk, dv (deterministic=False)
        record(videonsa, (1, 1, 7, 130, 128), torch.bfloat16, atomic=True)
        # per-element pointer loads where descriptors cannot serve (misaligned tensors)
        record(videonsa, (1, 1, 7, 130, 128), torch.bfloat16, pointers=True)
    if "--all" in sys.argv:
        # head dim 256: the lse pass's [128, 256] output accumulator does not fit its register cap
        record(videonsa, (1, 1, 7, 130, 256), torch.bfloat16)
    if "--all" in sys.argv:
        nsa = Pattern(name="nsa", compression=Compression(block=32, stride=16), gate=Gate(kind="mlp"),
                      selection=Selection(block=64, count=16, forced=("first", "previous", "current"), scoring="head"),
                      window=Window(size=64))
        record(nsa, (1, 1, 4, 130, 64), torch.bfloat16)
    # the small end of the GPU property test's draws: blocks of 8 keys (matrix products
    # need 16 columns: the kernels pad), head dim 16, one head per group
    small = Pattern(name="small", compression=Compression(block=8, stride=4), gate=Gate(kind="mlp"),
                    selection=Selection(block=8, count=4, forced=("current",)), window=Window(size=16))
    record(small, (1, 1, 1, 70, 16), torch.bfloat16)
    record(small, (1, 1, 1, 70, 16), torch.bfloat16, atomic=True)
    path = os.environ.get("NSAFLEX_COMPILE_CHECK_JSON", "/tmp/triton_compile_check.json")
    items = signatures()
    # the select kernel at the row widths of 16K..128K tokens (JP 256..2048;
    # the tiny recorded shapes only reach JP = 2), with the warps ops._chunked_topn gives them
    # and the buffer strides a multiple of 16 as there (rows of 256..2048 scores): the launcher
    # specialises on that, and it decides whether a thread gets 4 consecutive scores
    for module, name, sig, const, opts in list(items):
        if name == "topn_select_kernel":
            aligned = sorted(set(opts.get("aligned", [])) | {"sbb", "sbh", "sbt"})
            # (head, tail) parts of a row as ops.topn_row_parts gives them: one part, or
            # 1,024 + 256 / 512 for the chunks from 64K to 96K tokens
            for jp, jt, rows, warps in ((256, 0, 4, 1), (2048, 0, 1, 4), (1024, 256, 1, 4), (1024, 512, 1, 4)):
                items.append((module, name, sig, dict(const, JP=jp, ROWS=rows, JT=max(1, jt), TAIL=jt > 0),
                              dict(opts, num_warps=warps, aligned=aligned)))
            break
    json.dump(items, open(path, "w"))
    env = dict(os.environ, TRITON_INTERPRET="0")
    sys.exit(subprocess.call([sys.executable, __file__, "--compile", path], env=env))
