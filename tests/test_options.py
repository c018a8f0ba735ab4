"""Options own themselves: the command line and the Python API accept and refuse exactly the same things, presets
are data, and errors speak the caller's language (flags on the command line, arguments in Python)."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

import finetune_sparse
import options
import predict_updated
from options import PredictConfig, TrainConfig
from utils import UserError

ROOT = Path(__file__).resolve().parent.parent
PROGRAMS = {TrainConfig: (finetune_sparse.default_config, {}), PredictConfig: (predict_updated.default_config, {"model_path": "m"})}


def cli_config(cls, argv):
    extra = ["--model_path", "m"] if cls is PredictConfig else []
    return options.cli_config(cls, [*extra, *argv], "")


def api_config(cls, **given):
    make, required = PROGRAMS[cls]
    if cls is PredictConfig:
        return make(required["model_path"], **given)
    return make(**given)


def cli_options(cls):
    return [spec for spec in fields(cls) if spec.metadata.get("cli", True) and spec.name not in ("model_path",)]


def refused_value(spec):
    """A value the option's declaration refuses, or None when every value of its type is allowed."""
    meta = spec.metadata
    if meta["choices"] is not None:
        return "no-such-choice"
    if meta["check"] is not None:
        for candidate in (-1, -0.5, 0, 2, 10**12):
            try:
                value = options._convert(spec, candidate)
            except ValueError:
                continue
            if not meta["check"][0](value):
                return candidate
    if meta["convert"] is not None:
        return "no-such-value"
    return None


def as_text(value):
    return ",".join(value) if isinstance(value, tuple) else str(value)


@pytest.mark.parametrize("cls", [TrainConfig, PredictConfig], ids=["train", "predict"])
def test_defaults_are_the_same_from_the_command_line_and_from_python(cls):
    assert cli_config(cls, []).as_dict() == api_config(cls).as_dict()


@pytest.mark.parametrize("cls", [TrainConfig, PredictConfig], ids=["train", "predict"])
def test_every_option_is_refused_or_accepted_alike_on_both_paths(cls):
    checked = 0
    for spec in cli_options(cls):
        default = spec.default
        if default is not None and not isinstance(default, bool):  # the default, typed as text, is accepted by both
            assert getattr(cli_config(cls, [f"--{spec.name}", as_text(default)]), spec.name) == default, spec.name
            assert getattr(api_config(cls, **{spec.name: default}), spec.name) == default, spec.name
        bad = refused_value(spec)
        if bad is None:
            continue
        with pytest.raises(UserError) as from_cli:
            cli_config(cls, [f"--{spec.name}", str(bad)])
        with pytest.raises(UserError) as from_python:
            api_config(cls, **{spec.name: bad})
        assert f"--{spec.name}" in from_cli.value.cli_message, spec.name
        assert str(from_python.value).startswith(spec.name), (spec.name, str(from_python.value))
        assert "--" not in str(from_python.value).split(",")[0], str(from_python.value)
        checked += 1
    assert checked >= (30 if cls is TrainConfig else 4)


@pytest.mark.parametrize("given, expected", [
    ({"novelty_parts": "mahalanobis,entropy"}, ("mahalanobis", "entropy")),  # a string is converted as on the CLI
    ({"prune_layers": "fc1"}, ("fc1",)),
    ({"kl_weight": "elbo"}, "elbo"),
])
def test_python_strings_are_converted_like_the_command_line(given, expected):
    name = next(iter(given))
    assert getattr(finetune_sparse.default_config(**given), name) == expected


@pytest.mark.parametrize("given, words", [
    ({"prune_rule": "bogus"}, "prune_rule must be one of paired, f1"),
    ({"class_weight": "x"}, "class_weight must be one of balanced, none"),
    ({"novelty_parts": "mahalanobis,bogus"}, "novelty_parts"),
    ({"seed": -1}, "seed must be between 0 and 4294967295"),
    ({"seed": 2**32}, "seed must be between 0 and 4294967295"),
    ({"dim": 2.5}, "dim"),
])
def test_the_python_api_refuses_what_the_cli_refuses(given, words):
    with pytest.raises(UserError, match=words):
        finetune_sparse.default_config(**given)


def test_an_unknown_keyword_is_a_type_error_in_fit_and_annotate():
    with pytest.raises(TypeError, match="bogus_option"):
        finetune_sparse.default_config(bogus_option=1)
    with pytest.raises(TypeError, match="bogus_option"):
        predict_updated.annotate(None, "no/such/model", bogus_option=1)


def test_annotate_refuses_an_unknown_unassign_rule_before_reading_anything():
    with pytest.raises(UserError, match="unassign_by must be one of"):
        predict_updated.annotate(None, "no/such/model", unassign_by="foo")


def test_errors_name_python_arguments_in_python_and_flags_on_the_command_line():
    with pytest.raises(UserError) as caught:
        finetune_sparse.default_config(resume=True, overwrite=True)
    assert "resume=True and overwrite=True" in str(caught.value)
    assert "--resume and --overwrite" in caught.value.cli_message
    error = UserError("x exists; pass --overwrite or --cv_splits 3 or --no_pos_embed")
    assert str(error) == "x exists; pass overwrite=True or cv_splits=3 or pos_embed=False"


def test_given_options_are_known_exactly_even_when_they_equal_the_default():
    config = options.cli_config(TrainConfig, ["--dim", "200", "--seed", "2021"], "")
    assert {"dim", "seed"} <= config.given and "depth" not in config.given
    assert finetune_sparse.default_config(dim=200).given == {"dim"}


def test_a_preset_sets_each_stage_and_what_the_user_gives_wins():
    stage_a = finetune_sparse.default_config(preset="demo")
    assert (stage_a.dim, stage_a.binning, stage_a.bin_num, stage_a.cv_splits, stage_a.bayes_head) == (32, "quantile", 28, 5, False)
    stage_b2 = finetune_sparse.default_config(preset="demo", stage="B2", epoch=1)
    assert stage_b2.bayes_head and stage_b2.prune_target == 0.6 and stage_b2.epoch == 1
    assert "prune_target" not in stage_b2.given  # a preset's value is not the user's
    assert predict_updated.default_config("m", preset="demo").bayes_mc_samples == 8
    with pytest.raises(UserError, match="--preset nope does not exist|preset nope does not exist"):
        finetune_sparse.default_config(preset="nope")


def test_preset_help_shows_the_preset_values_and_the_pipeline_prints_them():
    result = subprocess.run([sys.executable, "finetune_sparse.py", "--preset", "demo", "--help"], cwd=ROOT,
                            capture_output=True, text=True, check=True)
    assert "(default: 28)" in " ".join(result.stdout.split())  # demo's bin count, not scBERT's 5
    printed = subprocess.run([sys.executable, "finetune_sparse.py", "pipeline", "--preset", "demo", "--print_preset"],
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "B2:" in printed and "prune_target=0.6" in printed


def test_training_mc_samples_takes_the_seed_name_and_the_old_flag_still_works(capsys):
    assert options.cli_config(TrainConfig, ["--mc_samples", "3"], "").mc_samples == 3
    assert options.cli_config(TrainConfig, ["--bayes_mc_samples", "2"], "").mc_samples == 2
    assert "deprecated" in capsys.readouterr().err
    with pytest.warns(DeprecationWarning):
        assert finetune_sparse.default_config(bayes_mc_samples=2).mc_samples == 2
    assert options.cli_config(PredictConfig, ["--model_path", "m", "--bayes_mc_samples", "4"], "").bayes_mc_samples == 4


@pytest.mark.parametrize("argv", [["--seed", "-1"], ["--seed", "4294967296"], ["--seed", "x"]])
@pytest.mark.parametrize("script", ["finetune_sparse.py", "predict_updated.py"])
def test_bad_seeds_are_one_line_errors_in_both_programs(script, argv, tmp_path):
    extra = ["--model_path", str(tmp_path / "m.pth"), "--output_dir", str(tmp_path / "out")] if script == "predict_updated.py" \
        else ["--ckpt_dir", str(tmp_path / "run")]
    result = subprocess.run([sys.executable, script, *extra, *argv], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and "--seed" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists() and not (tmp_path / "out").exists()
