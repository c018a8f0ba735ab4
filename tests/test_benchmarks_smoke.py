"""The benchmarks run end to end in their smoke configurations and write complete, finite results (so they don't rot)."""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from options import load_preset

ROOT = Path(__file__).resolve().parents[1]
SMOKE_ARGS = ["--smoke", "--threads", "1"]  # one thread: a loaded CI machine makes two-thread runs stall


@pytest.fixture(autouse=True)
def restore_threads():
    """The benchmarks fix torch's thread count (and the OMP/MKL variables); give other tests theirs back."""
    threads = torch.get_num_threads()
    environment = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    yield
    torch.set_num_threads(threads)
    for key, value in environment.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def run_smoke(name: str, out_dir: Path) -> dict:
    module = importlib.import_module(f"benchmarks.{name}")
    assert module.main([*SMOKE_ARGS, "--out_dir", str(out_dir)]) == 0
    payload = json.loads((out_dir / f"{name}.json").read_text(encoding="utf-8"))
    assert payload["benchmark"] == name and payload["smoke"] is True
    machine = payload["machine"]
    assert machine["cpu_count"] >= 1 and machine["torch_threads"] == 1 and machine["versions"]["torch"]
    assert payload["config"]["threads"] == 1 and payload["config"]["smoke"] is True
    assert all({"target", "met", "detail"} <= set(t) for t in payload["targets"])  # scaling has none, only a crossover
    assert (out_dir / f"{name}.md").read_text(encoding="utf-8").startswith("## ")
    assert payload["plots"] and all((out_dir / plot).stat().st_size > 0 for plot in payload["plots"])
    return payload["results"]


def assert_finite(*values) -> None:
    for value in values:
        assert isinstance(value, (int, float)) and math.isfinite(value), value


def test_speed_reference_smoke_compares_same_weights_and_reports_ratios(tmp_path):
    results = run_smoke("speed_reference", tmp_path)
    assert_finite(results["matmul_peak"]["gflops"])
    for row in results["sequences"]:
        assert_finite(row["speedup_forward"], row["speedup_forward_backward"], row["flops_per_cell"]["forward"])
        for impl in ("ours", "reference"):
            assert_finite(row[impl]["forward"]["cells_per_s"], row[impl]["forward_backward"]["peak_fraction"])
        assert row["output_check"]["max_abs_diff"] < 1e-4  # the same weights give the same encodings
        assert "site-packages" in row["reference_location"]
        assert "site-packages" not in row["output_check"]["ours_location"]


def test_scaling_smoke_measures_every_method_and_size(tmp_path):
    results = run_smoke("scaling", tmp_path)
    methods = {(p["method"], p["tokens"]) for p in results["points"]}
    assert methods == {(m, n) for m in ("favor", "sdpa", "naive") for n in (32, 128)}
    for point in results["points"]:
        assert_finite(point["time_s"], point["peak_extra_mb"])
    assert set(results["crossover_tokens"]) == {"time_s", "peak_extra_mb"}


def test_mc_cost_smoke_reports_both_ratios(tmp_path):
    results = run_smoke("mc_cost", tmp_path)
    for row in results["sequences"]:
        assert_finite(row["naive_over_head_mc"], row["head_mc_over_deterministic"])
        assert row["head_mc"]["output_shape"] == [row["samples"], row["batch"], 10]
        assert row["max_sample_std"]["head_mc"] > 0  # the head samples really differ


def test_pruning_tradeoff_smoke_prunes_through_the_pipeline_and_shrinks_physical_but_not_masked(tmp_path):
    results = run_smoke("pruning_tradeoff", tmp_path)
    # the demo preset's round 2, read from presets/demo.json (the program's defaults where it sets none)
    assert set(results["preset"]) == {"prune_target", "prune_layers", "prune_score", "prune_refit", "prune_ft_epochs",
                                      "prune_distill", "group_lasso"}
    preset = load_preset("demo")["B2"]
    assert results["preset"]["prune_target"] == preset["prune_target"]
    assert results["preset"]["prune_layers"] == preset["prune_layers"].split(",")
    assert [r["variant"] for r in results["per_split"]] == ["preset", "sgd_distill", "group_lasso"]
    for row in results["per_split"]:
        assert len(row["levels"]) == 2  # one level per fold model
        # the smoke tolerances accept every level, so each fold reached the target and its head shrank
        assert row["levels"] == [0.2, 0.2] and row["removed"] > 0
        assert row["head_after"]["fc12_params_stored"] < row["head_before"]["fc12_params_stored"]
        assert row["checkpoint_mb_after"] < row["checkpoint_mb_before"]
        for stage in ("before", "after"):
            assert_finite(*row[stage].values())
    summary = results["summary"]["preset"]
    assert summary["same_level"] == 1 and summary["common_level"] == 0.2
    pruned = {r["mode"]: r for r in results["scale"] if r["level"] > 0}
    assert pruned["physical"]["fc12_params_stored"] < pruned["mask"]["fc12_params_stored"]
    assert pruned["physical"]["fc12_params_active"] == pruned["mask"]["fc12_params_active"]
    assert pruned["physical"]["checkpoint_mb"] < pruned["mask"]["checkpoint_mb"]
    for row in results["scale"]:
        assert_finite(row["mean_forward"]["median_s"], row["mc_forward"]["median_s"])


def test_a_pruning_variant_may_list_layers_and_only_names_pruning_options():
    from benchmarks.pruning_tradeoff import parse_variant, variant_options

    assert parse_variant("fc1_fc2:prune_layers=fc1,fc2,prune_target=0.5") == (
        "fc1_fc2", {"prune_layers": "fc1,fc2", "prune_target": "0.5"})
    assert parse_variant("fc1_fc2:PRUNE_LAYERS=fc1,fc2") == ("fc1_fc2", {"prune_layers": "fc1,fc2"})  # older spelling
    assert parse_variant("preset:") == ("preset", {})
    for bad in ("fast:epoch=1", "fast:EPOCHS_A=1", "far:prune_target=1.5", "odd:prune_score=snr,group_lasso"):
        with pytest.raises(SystemExit, match="bad variant"):
            parse_variant(bad)
    # the penalty and the layers act in both Bayesian rounds, the rest in round 2 only, on top of the benchmark's options
    base = {"A": {"epoch": "1"}, "B1": {"epoch": "1"}, "B2": {"prune_target": "0.2"}}
    stages = variant_options(base, {"group_lasso": "1e-3", "prune_refit": "0"})
    assert stages == {"A": {"epoch": "1"}, "B1": {"epoch": "1", "group_lasso": "1e-3"},
                      "B2": {"prune_target": "0.2", "group_lasso": "1e-3", "prune_refit": "0"}}


def test_pipeline_settings_go_to_every_stage_or_the_one_named():
    from benchmarks.pipeline import parse_settings

    stages = parse_settings(["", "cv_splits=2", "A.epoch=3", "epoch=1", "B2.prune_target=0.2"])
    assert stages == {"A": {"cv_splits": "2", "epoch": "3"}, "B1": {"cv_splits": "2", "epoch": "1"},
                      "B2": {"cv_splits": "2", "epoch": "1", "prune_target": "0.2"}}  # the stage's own value wins
    for bad in ("EPOCHS_A=1", "C.epoch=1", "A.epochs=1", "epoch"):
        with pytest.raises(SystemExit, match="bad setting"):
            parse_settings([bad])


def test_accuracy_calibration_smoke_summarises_every_method(tmp_path):
    results = run_smoke("accuracy_calibration", tmp_path)["datasets"]["standin"]  # the smoke runs the stand-in only
    for method in ("logistic_regression", "lr_temperature", "knn", "stage_a", "stage_b1", "stage_b2"):
        for metric in ("accuracy", "macro_f1", "ece", "nll"):
            summary = results["summary"][method][metric]
            assert summary["n"] == 2
            assert_finite(summary["mean"], summary["std"])
    difference = results["differences"]["stage_b2_minus_logistic_regression"]["accuracy"]
    assert_finite(difference["mean"]) and 0 <= difference["wins"] <= 2
    # The pipeline ran with the smoke overrides: two cross-fitted folds per stage.
    assert all(row["folds"] == 2 for row in results["per_split"]["stage_b2"])


def test_novel_type_smoke_scores_each_left_out_type(tmp_path):
    results = run_smoke("novel_type", tmp_path)
    assert len(results["per_case"]) == 2  # two left-out types, one split
    scores = ("novelty", "view_mahalanobis", "view_input_knn", "view_input_mahalanobis", "view_input_likelihood", "entropy",
              "mutual_info", "one_minus_confidence", "pca_knn")
    for row in results["per_case"]:
        for score in scores:
            assert 0 <= row["auroc"][score] <= 1
        assert 0 <= row["flagged_unseen"] <= 1 and 0 <= row["flagged_known"] <= 1
        assert 0 <= row["scbert_flagged_unseen"] <= 1 and 0 <= row["scbert_flagged_known"] <= 1
    for score in scores:
        assert results["summary"]["auroc"][score]["n"] == 2
        assert 0 <= results["summary"]["accuracy_at_80"][score]["mean"] <= 1
        assert "misclassification_auroc" in results["per_case"][0]


def test_memory_smoke_measures_every_variant(tmp_path):
    results = run_smoke("memory", tmp_path)
    assert {p["variant"] for p in results["points"]} == {"plain", "checkpointing", "last_block", "reference"}


def test_novelty_fit_smoke_measures_both_ways_at_every_size(tmp_path):
    results = run_smoke("novelty_fit", tmp_path)
    assert sorted((p["way"], p["cells"]) for p in results["points"]) == [
        ("at_once", 300), ("at_once", 600), ("blocked", 300), ("blocked", 600)]
    for point in results["points"]:
        assert_finite(point["peak_extra_mb"], point["seconds"])


def test_gpu_check_smoke_trains_under_torchrun_and_compares_amp_with_fp32(tmp_path):
    """The GPU check's every step on the CPU: throughput, the full preset's stages under a one-process torchrun
    (gloo here, NCCL on a GPU), and prediction with and without --amp (identical on the CPU, where autocast is off)."""
    results = run_smoke("gpu_check", tmp_path)
    for entry in results["genes"].values():
        assert_finite(entry["throughput"]["fp32"]["forward"]["cells_per_s"], entry["train_amp_seconds"]["stage_b"])
        assert entry["label_agreement"] == 1.0 and entry["max_prob_diff"] == 0.0


def test_run_all_command_line_writes_a_summary(tmp_path):
    command = [sys.executable, "-m", "benchmarks.run_all", *SMOKE_ARGS, "--only", "mc_cost", "--out_dir", str(tmp_path)]
    completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-2000:]
    summary = (tmp_path / "SUMMARY.md").read_text(encoding="utf-8")
    assert "## Targets" in summary and "mc_cost" in summary


def test_flop_count_matches_a_hand_count():
    from benchmarks.speed_reference import encoder_flops_per_cell

    n, dim, heads, dim_head, features = 10, 4, 2, 3, 5
    inner = heads * dim_head
    by_hand = (2 * n * dim * 3 * inner + 4 * n * heads * dim_head * features + 4 * n * heads * features * dim_head
               + 4 * n * heads * features + 2 * n * inner * dim + 16 * n * dim * dim)
    flops = encoder_flops_per_cell(n, dim, 2, heads, dim_head, features)
    assert flops["forward"] == 2 * by_hand and flops["forward_backward"] == 6 * by_hand


def test_crossover_interpolates_where_favor_becomes_cheaper():
    from benchmarks.scaling import crossover

    tokens = [100, 1000, 10000]
    assert crossover(tokens, [1.0, 1.0, 1.0], [0.1, 1.0, 10.0]) == pytest.approx(1000.0)
    assert crossover(tokens, [1.0, 1.0, 1.0], [0.1, 0.5, 0.9]) is None
    assert crossover(tokens, [1.0, 2.0, 3.0], [5.0, 6.0, 7.0]) == 100.0


def test_backed_training_smoke_trains_both_ways_with_equal_accuracy(tmp_path):
    results = run_smoke("backed_training", tmp_path)
    for measured in ("data", "train"):
        assert [point["mode"] for point in results[measured]["points"]] == ["memory", "backed"]
        for point in results[measured]["points"]:
            assert_finite(point["epoch_s"], point["peak_rss_mb"])
    memory, backed = results["train"]["points"]
    assert memory["accuracy"] == backed["accuracy"]
    assert len(results["batch_reads"]) == 2


def test_scale_smoke_predicts_every_size_streamed_with_the_reference_points(tmp_path):
    results = run_smoke("scale", tmp_path)
    assert sorted((p["name"], p["cells"]) for p in results["points"]) == [
        ("ensemble", 300), ("ensemble", 600), ("single", 300), ("single", 600)]
    for point in results["points"]:
        assert_finite(point["peak_extra_mb"], point["cells_per_s"])
    assert_finite(results["novelty_us_per_cell"], results["logistic_regression"]["cells_per_s"],
                  *(forward["cells_per_s"] for forward in results["forward"].values()),
                  *results["throughput_vs_forward"].values())


def test_encoder_profile_smoke_profiles_before_and_after_and_bf16(tmp_path):
    results = run_smoke("encoder_profile", tmp_path)
    assert_finite(results["flops_per_cell"]["forward"], *results["before_after_max_abs_diff"].values())
    assert max(results["before_after_max_abs_diff"].values()) < 1e-4  # HEAD's package and ours: same encodings
    assert "head" in results["before"]["performer_pytorch"] and "head" not in results["after"]["performer_pytorch"]
    for impl in ("before", "after"):
        for row in results[impl]["batches"].values():
            for mode in ("forward", "forward_backward"):
                assert_finite(row[mode]["cells_per_s"], row[mode]["peak_fraction"], row["peak"]["gflops"])
                profile = row["profile"][mode]
                assert profile["top_ops"] and abs(sum(c["percent"] for c in profile["categories"].values()) - 100) < 1e-6
    for row in results["after"]["batches"].values():
        assert_finite(row["bf16_forward"]["median_s"], row["bf16_max_abs_diff"])
