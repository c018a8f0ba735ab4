"""The accuracy levers of the pipeline: cross-fitted fold ensembles, finer expression bins, selection by validation
NLL, temperature scaling, the ELBO's KL weight and a KL schedule that continues across rounds.

Tiny models on the 160-cell subset of pbmc68k_reduced that tests/test_training.py builds.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from test_training import (  # noqa: F401  (data_path and one_torch_thread are fixtures)
    BAYES,
    TINY,
    Run,
    _kill_after_next_checkpoint,
    assert_ok,
    data_path,
    one_torch_thread,
    run_command,
    train,
)

import finetune_sparse
import predict_updated
from binning import bin_expression
from checkpoints import checkpoint_paths, load_checkpoint, load_ensemble
from run_manifest import ensemble_temperature
from utils import fit_temperature, stratified_splits, tempered

FOLDS = 2


@pytest.fixture(scope="module")
def stage_a_folds(data_path, tmp_path_factory) -> Run:  # noqa: F811
    return train(data_path, tmp_path_factory.mktemp("stageA_folds"), "a", "--epoch", "2", "--prune_target", "0",
                 "--cv_splits", str(FOLDS), "--bin_width", "0.5", "--bin_num", "12", "--learning_rate", "3e-3")


@pytest.fixture(scope="module")
def stage_b_folds(data_path, stage_a_folds, tmp_path_factory) -> Run:  # noqa: F811
    return train(data_path, tmp_path_factory.mktemp("stageB_folds"), "b", "--model_path", str(stage_a_folds.directory),
                 *BAYES, "--epoch", "2", "--pre_warm_epochs", "0", "--prune_target", "0", "--cv_splits", str(FOLDS),
                 "--kl_anneal_steps", "1000")


# --------------------------------------------------------------------------------------------------------------
# Folds and ensembles
# --------------------------------------------------------------------------------------------------------------


def test_k_fold_validation_cells_partition_every_cell_once():
    labels = np.repeat(np.arange(4), [30, 20, 12, 6])
    splits = stratified_splits(labels, n_splits=3, seed=0)
    validation = np.concatenate([val for _, val in splits])
    assert np.array_equal(np.sort(validation), np.arange(len(labels)))  # disjoint, and together every cell
    for train_idx, val_idx in splits:
        assert np.intersect1d(train_idx, val_idx).size == 0
        assert set(labels[val_idx]) == set(range(4))  # stratified: every class in every fold


def test_a_run_directory_is_an_ensemble_of_its_fold_models(stage_a_folds):
    paths = checkpoint_paths(stage_a_folds.directory)
    assert [p.name for p in paths] == [f"a{fold}_best.pth" for fold in range(FOLDS)]
    members = load_ensemble(stage_a_folds.directory)
    assert len(members) == FOLDS and all(m.bin_width == 0.5 and m.bin_num == 12 for m in members)
    # each member stores its training cells per class: every cell trains all members but the one it validates
    counts = np.array([m.class_counts for m in members])  # (members, classes)
    assert counts.shape == (FOLDS, len(members[0].classes)) and (counts > 0).all()
    assert (counts.sum(axis=0) % (FOLDS - 1) == 0).all()


def test_ensemble_prediction_pools_its_members_probabilities_geometrically(stage_b_folds, data_path, tmp_path):  # noqa: F811
    def probabilities(model_path, seed: int, name: str) -> pd.DataFrame:
        out = tmp_path / name
        argv = ["--model_path", str(model_path), "--data_path", str(data_path), "--bayes_mc_samples", "3",
                "--seed", str(seed), "--output_dir", str(out), "--device", "cpu"]
        assert predict_updated.main(argv) == 0
        return pd.read_csv(out / "probabilities.csv", index_col=0)

    ensemble = probabilities(stage_b_folds.directory, 5, "ensemble")
    # Member k of the ensemble draws its head samples from seed + k; the ensemble pools the members' posterior
    # means geometrically: softmax of the mean log-probability.
    members = [probabilities(path, 5 + k, f"member{k}") for k, path in enumerate(checkpoint_paths(stage_b_folds.directory))]
    mean_log = np.mean([np.log(m.to_numpy()) for m in members], axis=0)
    expected = np.exp(mean_log) / np.exp(mean_log).sum(1, keepdims=True)
    expected = tempered(expected[None], ensemble_temperature(stage_b_folds.directory))[0]  # the run's, from its manifest
    np.testing.assert_allclose(ensemble.to_numpy(), expected, atol=1e-5)
    assert not np.allclose(members[0].to_numpy(), members[1].to_numpy())  # two different models


def test_stage_b_from_a_run_directory_continues_each_fold_on_its_own_cells(stage_a_folds, stage_b_folds):
    for fold in range(FOLDS):
        assert stage_b_folds.val_cells(fold) == stage_a_folds.val_cells(fold)
        start, continued = load_checkpoint(stage_a_folds.fold("best.pth", fold)), load_checkpoint(stage_b_folds.fold("best.pth", fold))
        assert continued.model.is_bayesian and continued.bin_width == start.bin_width
        # The encoder went on from its own fold's model: closer to it than to the other fold's.
        other = load_checkpoint(stage_a_folds.fold("best.pth", 1 - fold))
        own_distance = (continued.model.encoder.token_emb.weight - start.model.encoder.token_emb.weight).norm()
        other_distance = (continued.model.encoder.token_emb.weight - other.model.encoder.token_emb.weight).norm()
        assert own_distance < other_distance


def test_a_run_directory_needs_as_many_folds_as_it_has_models(stage_a_folds, data_path, tmp_path, capsys):  # noqa: F811
    argv = ["--data_path", str(data_path), *TINY, "--model_path", str(stage_a_folds.directory), *BAYES, "--epoch", "1",
            "--ckpt_dir", str(tmp_path / "out"), "--model_name", "b"]
    assert finetune_sparse.main(argv) == 2
    assert f"--cv_splits {FOLDS}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_ensemble_run_killed_in_its_second_fold_resumes_to_the_same_result(stage_a_folds, data_path, tmp_path):  # noqa: F811
    def command(directory) -> list[str]:
        return [sys.executable, "finetune_sparse.py", "--data_path", str(data_path), *TINY, "--model_path",
                str(stage_a_folds.directory), *BAYES, "--epoch", "3", "--pre_warm_epochs", "1", "--prune_target", "0",
                "--cv_splits", str(FOLDS), "--temperature_scaling", "--ckpt_dir", str(directory), "--model_name", "run"]

    class SecondFold(Run):
        def fold(self, suffix: str, fold: int = 1):
            return super().fold(suffix, fold)

    whole = Run(tmp_path / "whole", "run")
    assert_ok(run_command(command(whole.directory)))
    killed = SecondFold(tmp_path / "killed", "run")
    if not _kill_after_next_checkpoint(command(killed.directory), killed, tmp_path / "killed.log", 0.0):
        pytest.skip("the run finished before it could be killed")
    assert_ok(run_command([*command(killed.directory), "--resume"]))
    assert killed.summary() == whole.summary()
    for fold in range(FOLDS):
        assert Run.fold(killed, "val_predictions.csv", fold).read_text() == Run.fold(whole, "val_predictions.csv", fold).read_text()
        expected, actual = load_checkpoint(Run.fold(whole, "best.pth", fold)), load_checkpoint(Run.fold(killed, "best.pth", fold))
        assert actual.metrics == expected.metrics
        for key, value in expected.model.state_dict().items():
            assert torch.equal(actual.model.state_dict()[key], value), key


# --------------------------------------------------------------------------------------------------------------
# Binning, selection, calibration, KL
# --------------------------------------------------------------------------------------------------------------


def test_bin_width_divides_log_expression_before_flooring():
    rows = np.array([[0.0, 0.3, 0.72, 1.49, 9.0]])
    assert bin_expression(rows, 5).tolist() == [[0, 0, 0, 1, 5, 0]]  # scBERT's floor bins (and the appended 0)
    assert bin_expression(rows, 28, bin_width=0.25).tolist() == [[0, 1, 2, 5, 28, 0]]


def test_a_checkpoints_bin_width_is_kept_and_another_refused(stage_a_folds, data_path, tmp_path, capsys):  # noqa: F811
    argv = ["--data_path", str(data_path), *TINY, "--model_path", str(stage_a_folds.best), "--epoch", "1",
            "--prune_target", "0", "--bin_width", "1", "--ckpt_dir", str(tmp_path / "out"), "--model_name", "x"]
    assert finetune_sparse.main(argv) == 2
    assert "--bin_width 1.0 differs from the checkpoint's 0.5" in capsys.readouterr().err


def test_select_metric_nll_keeps_the_epoch_with_the_lowest_validation_nll(data_path, tmp_path):  # noqa: F811
    run = train(data_path, tmp_path, "nll", "--epoch", "4", "--prune_target", "0", "--learning_rate", "3e-3",
                "--select_metric", "nll", "--patience", "10")
    losses = [float(row["val_loss"]) for row in run.metrics() if row["val_loss"]]
    assert load_checkpoint(run.best).metrics["nll"] == pytest.approx(min(losses), rel=1e-6)


def test_class_weight_none_weighs_every_present_class_alike():
    labels = np.array([0, 0, 0, 1, 2, 2])
    assert finetune_sparse.class_weights(labels, 4, "none").tolist() == [1.0, 1.0, 1.0, 0.0]
    balanced = finetune_sparse.class_weights(labels, 4, "balanced").tolist()
    assert balanced == pytest.approx([6 / 12, 6 / 4, 6 / 8, 0.0])


def test_fit_temperature_recovers_the_temperature_that_generated_the_labels():
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=(4000, 5))
    true_temperature = 2.5
    calibrated = tempered(torch.tensor(logits).softmax(-1).numpy()[None], true_temperature)[0]
    labels = np.array([rng.choice(5, p=p) for p in calibrated])
    overconfident = torch.tensor(logits).softmax(-1).numpy()[None]  # (1, cells, classes)
    assert fit_temperature(overconfident, labels) == pytest.approx(true_temperature, rel=0.1)


def test_temperature_scaling_is_stored_and_only_rescales_confidence(stage_b_folds, data_path, tmp_path):  # noqa: F811
    run = train(data_path, tmp_path, "t", "--model_path", str(stage_b_folds.directory), *BAYES, "--epoch", "0",
                "--prune_target", "0", "--cv_splits", str(FOLDS), "--temperature_scaling")
    for fold in range(FOLDS):
        before, after = load_checkpoint(stage_b_folds.fold("best.pth", fold)), load_checkpoint(run.fold("best.pth", fold))
        temperature = after.model.config.head.temperature
        assert temperature != 1.0 and after.metrics["temperature"] == temperature
        assert after.metrics["nll"] <= before.metrics["nll"] + 1e-9  # the fitted T minimises NLL on these cells
        assert after.metrics["accuracy"] == before.metrics["accuracy"]  # T > 0 never changes the arg max
        torch.testing.assert_close(after.model.state_dict(), before.model.state_dict())


def test_kl_annealing_continues_across_rounds(stage_b_folds, data_path, tmp_path):  # noqa: F811
    round1 = load_checkpoint(stage_b_folds.best)
    kl_step = round1.metrics["kl_step"]
    assert kl_step > 0
    round2 = train(data_path, tmp_path, "r2", "--model_path", str(stage_b_folds.directory), *BAYES, "--epoch", "0",
                   "--prune_target", "0.25", "--prune_step", "0.25", "--prune_ft_epochs", "1", "--prune_rule", "f1", "--prune_f1_tol", "1.0",
                   "--cv_splits", str(FOLDS), "--kl_anneal_steps", "1000")
    first = next(row for row in round2.metrics() if row["phase"] == "prune_ft")
    # The first fine-tuning epoch's KL scale starts where round 1's annealing stopped, not at 0.
    assert float(first["kl_scale"]) > float(BAYES[BAYES.index("--kl_weight") + 1]) * kl_step / 1000 - 1e-12
    assert load_checkpoint(round2.best).metrics["kl_step"] > kl_step


def test_kl_weight_elbo_is_one_over_the_training_cells(data_path, tmp_path):  # noqa: F811
    stage_a = train(data_path, tmp_path / "a", "a", "--epoch", "1", "--prune_target", "0")
    run = train(data_path, tmp_path / "b", "b", "--model_path", str(stage_a.best), "--bayes_head", "--kl_weight", "elbo",
                "--kl_anneal_steps", "0", "--epoch", "1", "--pre_warm_epochs", "0", "--prune_target", "0")
    n_train = 160 - len(run.val_cells())
    assert float(run.metrics()[0]["kl_scale"]) == pytest.approx(1 / n_train)
    assert math.isfinite(float(run.metrics()[0]["kl"]))


# --------------------------------------------------------------------------------------------------------------
# The pruning decision
# --------------------------------------------------------------------------------------------------------------


def _paired_verdict(reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray) -> bool:
    """keep_pruned with the paired rule's defaults, on given validation probabilities (standing in for the
    posterior means' predictions too)."""
    config = finetune_sparse.default_config()
    state = finetune_sparse.FoldState(reference_probs=reference.tolist(), reference_calls=reference.argmax(1).tolist())
    ok, verdict = finetune_sparse.keep_pruned(config, state, labels, {}, candidate, candidate.argmax(1))
    assert "NLL" in verdict and "changed type" in verdict
    return ok


def test_paired_rule_keeps_a_level_that_predicts_like_the_unpruned_model_and_refuses_one_that_does_not():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=120)
    reference = rng.dirichlet(np.ones(4), size=120)
    reference[np.arange(120), labels] += 1.0
    reference /= reference.sum(1, keepdims=True)
    assert _paired_verdict(reference, reference.copy(), labels)  # the same predictions: keep
    shuffled = reference[:, [1, 2, 3, 0]]  # most cells change their predicted type
    assert not _paired_verdict(reference, shuffled, labels)
    blurred = 0.5 * reference + 0.5 / 4  # same types, but much less sure of the right one: NLL rises
    assert not _paired_verdict(reference, blurred, labels)


def test_distillation_loss_mixes_cross_entropy_with_the_kl_divergence_from_the_unpruned_model():
    import torch.nn.functional as F

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 3)  # (samples, cells, classes)
    labels, rows = torch.tensor([0, 1, 2, 1, 0]), torch.arange(5) + 3  # batch rows 3..7 of a 10-cell dataset

    def loss(alpha: float, teacher: torch.Tensor | None, samples: torch.Tensor = logits) -> torch.Tensor:
        return finetune_sparse.data_loss(samples, labels, None, teacher, rows, alpha)[1]

    ce = torch.stack([F.cross_entropy(sample, labels) for sample in logits]).mean()
    assert torch.allclose(loss(0.7, None), ce)  # no teacher (not pruning): labels only
    one_hot = torch.zeros(10, 3)
    one_hot[rows, labels] = 1.0
    assert torch.allclose(loss(1.0, one_hot), ce)  # a teacher that is the labels: KL = cross-entropy
    agreeing = torch.zeros(10, 3)
    agreeing[rows] = F.softmax(logits[0], -1)
    first = logits[:1]
    # A student that already predicts what the teacher does: no KL term.
    assert torch.allclose(loss(0.25, agreeing, first), 0.75 * F.cross_entropy(first[0], labels))
    assert torch.allclose(loss(1.0, agreeing, first), torch.tensor(0.0), atol=1e-6)


def test_paired_comparison_matches_a_direct_computation():
    from utils import paired_comparison

    reference = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    candidate = np.array([[0.8, 0.2], [0.6, 0.4], [0.6, 0.4]])
    labels = np.array([0, 1, 0])
    result = paired_comparison(reference, candidate, labels)
    expected = np.mean([np.log(0.9 / 0.8), np.log(0.8 / 0.4), 0.0])
    assert result["changed"] == pytest.approx(1 / 3) and result["nll_diff"] == pytest.approx(expected)
    assert result["nll_diff_upper"] >= result["nll_diff"]


def test_geometric_pooling_normalises_the_product_of_members_and_keeps_one_member():
    from utils import pool_members, uncertainty_summary

    rng = np.random.default_rng(0)
    members = rng.dirichlet(np.ones(4), size=(3, 50))  # (members, cells, classes)
    assert np.array_equal(pool_members(members[:1]), members[0])
    pooled = pool_members(members)
    product = np.prod(members, axis=0) ** (1 / 3)
    np.testing.assert_allclose(pooled, product / product.sum(1, keepdims=True))
    # Members that agree pool to what they agree on.
    np.testing.assert_allclose(pool_members(np.stack([members[0]] * 3)), members[0])
    # The summary reports the pooled prediction; mutual information stays the samples' disagreement.
    summary = uncertainty_summary(members, pooled)
    np.testing.assert_allclose(summary["mean_probs"], pooled)
    np.testing.assert_allclose(summary["mutual_info"], uncertainty_summary(members)["mutual_info"])
