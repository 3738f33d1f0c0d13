"""Plan options: the kernel and precision choices that used to hide in
environment variables are arguments of ``nsaflex.compile``/``make_plan``,
validated up front, recorded in the plan and printed by ``nsaflex compile``."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from click.testing import CliRunner

import nsaflex
from nsaflex.backends import flex
from nsaflex.errors import BackendUnavailable, InputError
from nsaflex.plan import OPTION_CHOICES, PlanOptions

SELECTING = nsaflex.pattern_from_dict({
    "name": "small-nsa",
    "compression": {"block": 4, "stride": 4},
    "selection": {"block": 4, "count": 2, "forced": ["current"]},
    "window": {"size": 8},
    "gate": {"kind": "constant", "values": [1.0, 1.0, 1.0]},
    "layers": [{"at": [1], "dense": True}],
})


def test_defaults_are_recorded_in_the_plan_and_its_dict():
    plan = nsaflex.make_plan(SELECTING, "flex", "cpu")
    assert plan.options == PlanOptions()
    assert plan.to_dict()["options"] == {name: choices[0] for name, choices in OPTION_CHOICES.items()}


@pytest.mark.parametrize("name", sorted(OPTION_CHOICES))
def test_every_value_reaches_the_plan_and_the_layer_plans(name):
    for value in OPTION_CHOICES[name]:
        attn = nsaflex.compile(SELECTING, "flex", device="cpu", **{name: value})
        assert getattr(attn.plan.options, name) == value
        assert attn.plan.to_dict()["options"][name] == value
        assert all(getattr(sub.options, name) == value for _, sub in attn.plan.layers)


@pytest.mark.parametrize(("name", "value"), [("flex_mode", "fast"), ("flex_mode", None), ("score_dtype", "fp32"),
                                             ("score_dtype", torch.float32), ("scoring_kernel", "1"),
                                             ("flex_dynamic", 1), ("flex_dynamic", "yes")])
def test_bad_values_name_the_option_and_the_choices(name, value):
    with pytest.raises(InputError) as error:
        nsaflex.compile(SELECTING, "flex", device="cpu", **{name: value})
    message = str(error.value)
    assert message.startswith(name + ":") and repr(OPTION_CHOICES[name][1]) in message


def test_unknown_option_gets_a_did_you_mean():
    with pytest.raises(InputError, match="did you mean 'flex_mode'"):
        nsaflex.make_plan(SELECTING, "flex", "cpu", flex_mod="eager")
    with pytest.raises(InputError, match="options: expected a PlanOptions"):
        nsaflex.make_plan(SELECTING, "flex", "cpu", options={"flex_mode": "eager"})


def test_flex_kernel_follows_the_options():
    options = PlanOptions(scoring_kernel="torch", score_dtype="float32", flex_mode="eager", flex_dynamic=True)
    kernel = nsaflex.compile(SELECTING, "flex", device="cpu", **dataclasses.asdict(options))._kernel
    assert isinstance(kernel, flex.FlexKernel)
    assert (kernel.mode, kernel.score_dtype, kernel.scoring_kernel, kernel.dynamic) == ("eager", torch.float32, "torch", True)
    default = nsaflex.compile(SELECTING, "flex", device="cpu")._kernel
    assert (default.mode, default.score_dtype, default.scoring_kernel, default.dynamic) == ("auto", None, "auto", False)


def test_eager_mode_takes_the_dense_evaluation_and_agrees_with_auto():
    q, k, v = (torch.randn(1, 2, 24, 16, generator=torch.Generator().manual_seed(s)) for s in range(3))
    eager = nsaflex.compile(SELECTING, "flex", device="cpu", flex_mode="eager")
    out = eager(q, k, v)
    assert eager._kernel.stats["compiled"] is False
    reference = nsaflex.compile(SELECTING, "reference", device="cpu")(q, k, v)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)  # fp32 against float64


def test_triton_scoring_where_it_cannot_run_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if torch.cuda.is_available():  # pragma: no cover - the refusal is the CPU one
        pytest.skip("CUDA present: the scoring kernels can run")
    attn = nsaflex.compile(SELECTING, "flex", device="cpu", scoring_kernel="triton", flex_mode="eager")
    q, k, v = (torch.randn(1, 2, 24, 16) for _ in range(3))
    with pytest.raises(BackendUnavailable, match="scoring_kernel 'triton'.*TRITON_INTERPRET=1"):
        attn(q, k, v)


def test_cli_prints_the_options():
    from nsaflex.cli.main import main

    result = CliRunner().invoke(main, ["compile", "window", "--device", "cpu"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "options:" in result.output and "flex_mode auto" in result.output
