"""What keeps Stage B and pruning from costing accuracy, and bins that follow the data's own scale.

- Stage B replaces the model it continues only with one that validates better; otherwise the run keeps the start.
- Every pruning level is judged against the model the chain of runs started from (carried in the checkpoint),
  so the losses of Stage B and of successive levels add up against one bar.
- Quantile bins come from the training cells' non-zero values, travel in the checkpoint and make the tokens, and
  so the model, the same for any monotone change of scale (log-normalized vs linear counts per million).
- One ensemble temperature, fitted to the out-of-fold predictions, divides the pooled log-probabilities where it
  sharpens them.

Tiny models on the 160-cell subset of pbmc68k_reduced that tests/test_training.py builds.
"""

from __future__ import annotations

import json

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from test_training import (  # noqa: F401  (data_path and one_torch_thread are fixtures)
    BAYES,
    TINY,
    Run,
    data_path,
    one_torch_thread,
    train,
)

import finetune_sparse
import predict_updated
from binning import Binning, bin_expression, quantile_binning
from checkpoints import load_checkpoint, save_checkpoint
from finetune_sparse import FoldState, better_mode, keep_pruned
from options import TrainConfig, make
from utils import UserError, load_dataset


@pytest.fixture(scope="module")
def stage_a(data_path, tmp_path_factory) -> Run:  # noqa: F811
    return train(data_path, tmp_path_factory.mktemp("promise_a"), "a", "--epoch", "3", "--prune_target", "0",
                 "--learning_rate", "3e-3")


@pytest.fixture(scope="module")
def stage_b1(data_path, stage_a, tmp_path_factory) -> Run:  # noqa: F811
    return train(data_path, tmp_path_factory.mktemp("promise_b1"), "b1", "--model_path", str(stage_a.best), *BAYES,
                 "--epoch", "2", "--pre_warm_epochs", "0", "--prune_target", "0")


# --------------------------------------------------------------------------------------------------------------
# Stage B keeps the better of its head and the model it continues
# --------------------------------------------------------------------------------------------------------------


def test_stage_b_that_does_not_beat_the_model_it_continues_keeps_that_model(data_path, stage_a, tmp_path):  # noqa: F811
    # A learning rate this large wrecks the head within a step: no epoch can validate better than the start.
    run = train(data_path, tmp_path / "b", "b", "--model_path", str(stage_a.best), *BAYES, "--epoch", "2",
                "--pre_warm_epochs", "0", "--prune_target", "0", "--learning_rate", "50")
    assert run.summary()["folds"][0]["kept"] == "start"
    kept = load_checkpoint(run.best)
    assert kept.model.is_bayesian and kept.model.config.head.posterior_means  # the start's weights are its means
    start = stage_a.val_predictions()
    np.testing.assert_allclose(run.val_predictions()[start.columns[2:]], start[start.columns[2:]], atol=2e-6)
    assert "kept the model it continued" in (tmp_path / "b" / "b.log").read_text(encoding="utf-8")


def test_stage_b_records_which_mode_it_kept_and_prediction_follows_it(stage_b1, data_path, tmp_path):  # noqa: F811
    fold = stage_b1.summary()["folds"][0]
    assert fold["kept"] in ("start", "sampled", "means")
    kept = load_checkpoint(stage_b1.best)
    assert kept.model.config.head.posterior_means == (fold["kept"] in ("start", "means"))
    assert kept.origin is not None and len(kept.origin) == len(stage_b1.val_cells())
    # A head that predicts with its posterior means gives the same probabilities whatever the Monte Carlo seed.
    set_means = kept.model.config.head.posterior_means
    outputs = []
    for seed in (1, 2):
        out = tmp_path / f"seed{seed}"
        assert predict_updated.main(["--model_path", str(stage_b1.best), "--data_path", str(data_path), "--seed", str(seed),
                                     "--bayes_mc_samples", "4", "--output_dir", str(out), "--device", "cpu"]) == 0
        outputs.append(pd.read_csv(out / "probabilities.csv", index_col=0).to_numpy())
    assert np.allclose(outputs[0], outputs[1]) == set_means


def test_a_mode_with_fewer_correct_calls_than_the_origin_is_not_eligible_whatever_its_nll():
    config = make(TrainConfig, {"select_metric": "nll"})
    modes = {"sampled": ({"nll": 0.30, "accuracy": 0.80}, None), "means": ({"nll": 0.40, "accuracy": 0.85}, None)}
    assert better_mode(config, modes)[0] == "sampled"  # no origin: the better NLL
    assert better_mode(config, modes, FoldState(origin_accuracy=0.85))[0] == "means"
    assert better_mode(config, modes, FoldState(origin_accuracy=0.90)) is None


# --------------------------------------------------------------------------------------------------------------
# Pruning is held to the origin, cumulatively
# --------------------------------------------------------------------------------------------------------------


def test_the_paired_rule_compares_each_level_with_the_bar_not_with_the_level_before():
    config = make(TrainConfig, {"prune_nll_tol": 0.05, "prune_max_changed": 1.0})
    labels = np.zeros(200, dtype=int)
    bar = np.tile([0.9, 0.1], (200, 1))  # NLL 0.105 per cell
    state = FoldState(reference_probs=bar.tolist(), reference_calls=[0] * 200)

    def level(p_true: float) -> bool:
        probs = np.tile([p_true, 1 - p_true], (200, 1))
        return keep_pruned(config, state, labels, {}, probs, np.zeros(200, dtype=int))[0]

    # Each step loses 0.03 NLL per cell against the one before; the second is 0.06 behind the bar: refused.
    assert level(0.9 * np.exp(-0.03))
    assert not level(0.9 * np.exp(-0.06))


def test_round_2_holds_every_level_to_the_origin_carried_in_the_checkpoint(data_path, stage_b1, tmp_path):  # noqa: F811
    """A B1 checkpoint whose origin predicted every validation cell perfectly leaves no pruning level within
    tolerance; the same checkpoint with a hopeless origin (uniform probabilities) lets pruning proceed."""
    start = load_checkpoint(stage_b1.best)
    val = stage_b1.val_predictions()
    classes = start.classes
    perfect = np.eye(len(classes))[pd.Index(classes).get_indexer(val["true_label"])]
    prune = ["--epoch", "0", "--prune_target", "0.5", "--prune_step", "0.25", "--prune_max_changed", "1.0"]
    amounts = {}
    for name, origin in {"perfect": np.clip(perfect, 1e-6, None), "uniform": np.full_like(perfect, 1 / len(classes))}.items():
        path = tmp_path / f"{name}.pth"
        save_checkpoint(path, start.model, genes=start.genes, classes=classes, bin_num=start.bin_num,
                        bin_width=start.bin_width, bin_edges=start.bin_edges, stage=start.stage, args=start.args,
                        metrics=start.metrics, origin=origin.tolist())
        run = train(data_path, tmp_path / name, name, "--model_path", str(path), *BAYES, *prune)
        amounts[name] = run.summary()["folds"][0]["prune_amount"]
    assert amounts == {"perfect": 0.0, "uniform": 0.5}


# --------------------------------------------------------------------------------------------------------------
# Bins from the data
# --------------------------------------------------------------------------------------------------------------


def test_quantile_bins_hold_equal_shares_of_the_non_zero_values():
    rng = np.random.default_rng(0)
    matrix = sp.random(400, 300, density=0.2, random_state=1, format="csr", dtype=np.float64)
    matrix.data = rng.lognormal(0, 1, matrix.nnz)
    binning = quantile_binning(matrix, 8)
    assert binning.kind == "quantile" and len(binning.edges) == 7
    tokens = binning.tokens(matrix.toarray())[:, :-1].numpy()
    counts = np.bincount(tokens[tokens > 0], minlength=9)[1:]
    assert counts.sum() == matrix.nnz and np.all(np.abs(counts / matrix.nnz - 1 / 8) < 0.002)
    assert (tokens[matrix.toarray() == 0] == 0).all()
    # Beyond the training range: the first and the last bin.
    assert bin_expression(np.array([[1e-9, 1e9, 0.0]]), 8, edges=binning.edges).tolist() == [[1, 8, 0, 0]]


def test_quantile_tokens_do_not_depend_on_the_scale_of_the_values():
    data = load_dataset(None)
    log_values = data.matrix
    cpm = log_values.copy()
    cpm.data = np.expm1(cpm.data.astype(np.float64)) * 100  # counts per million, no log
    on_log, on_cpm = quantile_binning(log_values, 28), quantile_binning(cpm, 28)
    rows = np.arange(50)
    assert torch.equal(on_log.tokens(log_values[rows].toarray()), on_cpm.tokens(cpm[rows].toarray()))
    # scBERT's fixed-width bins put nearly every CPM value into the last bin.
    fixed = Binning(28, 0.25).tokens(cpm[rows].toarray())[:, :-1].numpy()
    assert (fixed[fixed > 0] == 28).mean() > 0.9


def _cpm_file(source, path):
    adata = anndata.read_h5ad(source)
    adata.X = sp.csr_matrix(adata.X, dtype=np.float64)
    adata.X.data = np.expm1(adata.X.data) * 100
    adata.X = adata.X.astype(np.float32)
    adata.write_h5ad(path)
    return path


def test_a_model_trained_on_cpm_records_its_bins_and_predicts_like_one_trained_on_log_values(data_path, tmp_path):  # noqa: F811
    cpm_path = _cpm_file(data_path, tmp_path / "cpm.h5ad")
    runs = {name: train(path, tmp_path / name, name, "--epoch", "1", "--prune_target", "0")
            for name, path in (("log", data_path), ("cpm", cpm_path))}
    models = {name: load_checkpoint(run.best) for name, run in runs.items()}
    assert models["cpm"].bin_edges is not None and models["cpm"].binning.kind == "quantile"
    assert models["cpm"].args["binning"] == "quantile" and models["cpm"].bin_num == 28
    # Same tokens, same seed: the same model, whatever the scale of its training values.
    np.testing.assert_allclose(runs["cpm"].val_predictions().iloc[:, 2:], runs["log"].val_predictions().iloc[:, 2:], atol=1e-5)
    out = tmp_path / "pred"
    assert predict_updated.main(["--model_path", str(runs["cpm"].best), "--data_path", str(cpm_path),
                                 "--output_dir", str(out), "--device", "cpu"]) == 0
    assert len(pd.read_csv(out / "predictions.csv")) == 160


def test_width_bins_still_refuse_values_that_are_not_log_normalized(data_path, tmp_path, capsys):  # noqa: F811
    cpm_path = _cpm_file(data_path, tmp_path / "cpm.h5ad")
    argv = ["--data_path", str(cpm_path), *TINY, "--ckpt_dir", str(tmp_path / "w"), "--binning", "width", "--epoch", "1"]
    assert finetune_sparse.main(argv) == 2
    assert "too large to be log-normalized" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_bin_width_with_quantile_bins_is_refused():
    with pytest.raises(UserError, match="bin_width"):
        finetune_sparse.default_config(binning="quantile", bin_width=0.5)


# --------------------------------------------------------------------------------------------------------------
# The ensemble's temperature
# --------------------------------------------------------------------------------------------------------------


def test_the_ensemble_temperature_is_fitted_to_the_out_of_fold_predictions_and_applied(stage_b1, data_path, tmp_path):  # noqa: F811
    manifest = json.loads((stage_b1.directory / "manifest.json").read_text(encoding="utf-8"))
    calibration = manifest["calibration"]
    assert calibration["cells"] == len(stage_b1.val_cells()) and calibration["fitted"] > 0
    assert calibration["nll"][1] <= calibration["nll"][0] + 1e-9  # fitted to minimise exactly this NLL
    assert calibration["temperature"] == min(calibration["fitted"], 1.0)  # applied only where it sharpens
    outputs = {}
    for name, model in (("run", stage_b1.directory), ("file", stage_b1.best)):  # a lone checkpoint has no temperature
        out = tmp_path / name
        assert predict_updated.main(["--model_path", str(model), "--data_path", str(data_path), "--output_dir", str(out),
                                     "--device", "cpu", "--bayes_mc_samples", "4"]) == 0
        outputs[name] = pd.read_csv(out / "probabilities.csv", index_col=0).to_numpy()
    logits = np.log(outputs["file"]) / calibration["temperature"]
    expected = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(outputs["run"], expected / expected.sum(1, keepdims=True), atol=1e-5)
