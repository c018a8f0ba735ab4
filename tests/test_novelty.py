"""Novelty: class statistics of each fold model's features, fitted at the end of training, stored in the checkpoint,
thresholded on the validation cells, and used by prediction to flag cells of types absent from training.

Tiny models on the 160-cell subset of pbmc68k_reduced that tests/test_training.py builds.
"""

from __future__ import annotations

import anndata
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.covariance import LedoitWolf
from test_training import TINY, data_path, one_torch_thread, train  # noqa: F401  (fixtures)
from torch.utils.data import DataLoader

import predict_updated
from bayesian_sparse_transformer import predict_samples
from checkpoints import load_checkpoint, load_ensemble, save_checkpoint
from novelty import (
    calibrate_novelty,
    cell_fingerprints,
    collect_features,
    ensemble_novelty,
    fit_input_neighbours,
    fit_novelty,
    fit_training_cells,
    input_knn_distance,
    input_likelihood_distance,
    input_mahalanobis_distance,
    input_neighbours,
    input_projection,
    missing_statistics,
    novelty_distance,
    novelty_evidence,
    novelty_parts,
    novelty_score,
    training_cells,
)
from utils import BinnedDataset, UserError, align_genes, collate_batch, load_dataset

FPR = 0.1
NOVELTY_KEYS = {"layer", "classes", "center", "scale", "components", "means", "precision_cholesky",
                "input_center", "input_scale", "input_components", "neighbours", "knn_k", "input_means",
                "input_precision_cholesky", "input_class_precision_cholesky", "input_class_log_det", "parts",
                "calibration", "threshold", "fpr", "trained_fingerprints"}
VIEWS = ["mahalanobis", "input_knn", "input_mahalanobis", "input_likelihood", "entropy"]  # the default


@pytest.fixture(scope="module")
def stage_a(data_path, tmp_path_factory):  # noqa: F811
    return train(data_path, tmp_path_factory.mktemp("novelty_a"), "a", "--epoch", "2", "--prune_target", "0",
                 "--learning_rate", "3e-3", "--novelty_fpr", str(FPR))


@pytest.fixture(scope="module")
def pruned(data_path, stage_a, tmp_path_factory):  # noqa: F811
    """Stage B that physically removes fc1 inputs (gene positions), so the novelty features themselves shrink."""
    return train(data_path, tmp_path_factory.mktemp("novelty_b"), "b", "--model_path", str(stage_a.best),
                 "--bayes_head", "--epoch", "0", "--prune_target", "0.5", "--prune_step", "0.5", "--prune_ft_epochs", "1",
                 "--prune_dim", "1", "--prune_rule", "f1", "--prune_f1_tol", "1.0", "--mc_samples_eval", "2")


def loader_of(checkpoint, data_path, cells: list[str]) -> DataLoader:  # noqa: F811
    """Batches of the given cells of the test data, aligned to the checkpoint's genes."""
    data = align_genes(load_dataset(data_path, label_key="cell_type"), checkpoint.genes)
    position = {cell: i for i, cell in enumerate(data.cell_ids)}
    rows = [position[cell] for cell in cells]
    return DataLoader(BinnedDataset(data.matrix[rows], checkpoint.binning),
                      batch_size=16, collate_fn=collate_batch)


def scores_of(checkpoint, data_path, cells: list[str], samples: int = 1) -> np.ndarray:  # noqa: F811
    """The checkpoint's novelty scores of the given cells (predict_updated.py's per-member score)."""
    _, novelty = predict_samples(checkpoint.model, loader_of(checkpoint, data_path, cells), samples,
                                 novelty=checkpoint.novelty)
    return novelty.score


def predict(model_path, data_path, out, *extra: str) -> pd.DataFrame:  # noqa: F811
    argv = ["--model_path", str(model_path), "--data_path", str(data_path), "--label_key", "cell_type",
            "--bayes_mc_samples", "2", "--device", "cpu", "--output_dir", str(out), *extra]
    assert predict_updated.main(argv) == 0
    return pd.read_csv(out / "predictions.csv")


def test_novelty_statistics_survive_a_checkpoint_round_trip(stage_a, tmp_path):
    checkpoint = load_checkpoint(stage_a.best)
    assert set(checkpoint.novelty) == NOVELTY_KEYS and checkpoint.novelty["fpr"] == FPR
    copy = tmp_path / "copy.pth"
    save_checkpoint(copy, checkpoint.model, genes=checkpoint.genes, classes=checkpoint.classes,
                    bin_num=checkpoint.bin_num, bin_width=checkpoint.bin_width, stage=checkpoint.stage,
                    novelty=checkpoint.novelty)
    reloaded = load_checkpoint(copy).novelty  # torch.load(weights_only=True) reads it: plain data and tensors only
    assert_same_statistics(reloaded, checkpoint.novelty)
    assert checkpoint.novelty["parts"] == VIEWS


def assert_same_statistics(actual, expected) -> None:
    assert type(actual) is type(expected)
    if isinstance(expected, dict):
        assert set(actual) == set(expected)
        for key in expected:
            assert_same_statistics(actual[key], expected[key])
    elif isinstance(expected, torch.Tensor):
        torch.testing.assert_close(actual, expected)
    else:
        assert actual == expected


def test_checkpoints_without_statistics_load_as_none(stage_a, tmp_path):
    checkpoint = load_checkpoint(stage_a.best)
    old = tmp_path / "old.pth"
    save_checkpoint(old, checkpoint.model, genes=checkpoint.genes, classes=checkpoint.classes, bin_num=checkpoint.bin_num,
                    stage=checkpoint.stage)
    assert load_checkpoint(old).novelty is None


def test_threshold_reproduces_its_false_flag_rate_on_its_validation_cells(stage_a, data_path):  # noqa: F811
    checkpoint = load_checkpoint(stage_a.best)
    cells = stage_a.val_cells()
    flagged = (scores_of(checkpoint, data_path, cells) > checkpoint.novelty["threshold"]).mean()
    assert abs(flagged - FPR) <= 1 / len(cells) + 1e-9  # a quantile of n cells is exact up to one cell


def test_statistics_match_the_features_of_a_physically_pruned_model(pruned, data_path):  # noqa: F811
    checkpoint = load_checkpoint(pruned.best)
    head = checkpoint.model.config.head
    assert checkpoint.stage == "B" and head.kept_inputs is not None and head.kept_inputs < head.seq_len  # inputs removed
    assert checkpoint.novelty["center"].shape == (head.fc1_in,)
    cells = pruned.val_cells()
    features = collect_features(checkpoint.model, loader_of(checkpoint, data_path, cells), checkpoint.novelty["layer"])
    assert features.shape[1] == head.fc1_in
    # The Stage B head samples: prediction draws other noise than validation did, so the entropy view moves a
    # little; with the training run's own draws (2 samples, seed 0) the rate is exact up to one cell.
    scores = scores_of(checkpoint, data_path, cells, samples=2)
    assert np.isfinite(scores).all()
    assert abs((scores > checkpoint.novelty["threshold"]).mean() - 0.05) <= 3 / len(scores) + 1e-9  # default fpr


def test_training_cells_score_lower_than_cells_of_an_unseen_type(stage_a, data_path, tmp_path):  # noqa: F811
    """Copies of training cells against cells of an unseen profile: every gene expressed, at random levels within
    the data's range (no gene is silent, unlike in any blood cell)."""
    adata = anndata.read_h5ad(data_path)
    training = adata[sorted(set(adata.obs_names) - set(stage_a.val_cells()))[:30]].copy()
    x = training.X.toarray()
    flat = np.random.default_rng(0).uniform(1, x.max(), x.shape)  # (cells, genes)
    unseen = anndata.AnnData(X=flat.astype(np.float32), var=training.var.copy(),
                             obs=pd.DataFrame({"cell_type": "unseen type"}, index=[f"u{i}" for i in range(len(x))]))
    path = tmp_path / "mixed.h5ad"
    anndata.concat([training, unseen]).write_h5ad(path)
    table = predict(stage_a.directory, path, tmp_path / "out")
    is_unseen = (table["true_label"] == "unseen type").to_numpy()
    novelty = table["pred_novelty"].to_numpy()
    # Every unseen cell lies beyond the threshold and beyond most training cells. (Not beyond all: on 128 training
    # cells the 50 principal axes fit some of their noise, so training cells look farther than new cells of their
    # types, and up to half of them exceed a threshold set on validation cells.)
    assert (novelty[is_unseen] > 1).all() and novelty[is_unseen].min() > np.median(novelty[~is_unseen])
    metrics = pd.read_json(tmp_path / "out" / "metrics.json", typ="series")
    assert metrics["unseen_type_auroc"]["novelty"] > 0.7 and metrics["unseen_unassigned_share"] == 1.0
    assert metrics["known_unassigned_share"] < 1
    # novelty is the default rule: Unassigned = above the stored threshold (1.0 after normalisation)
    np.testing.assert_array_equal(table["pred_unassigned"].to_numpy(), novelty > 1)


def test_predictions_csv_and_h5ad_obs_have_pred_novelty_and_novelty_is_the_default(stage_a, data_path, tmp_path):  # noqa: F811
    assert predict_updated.default_config("m").unassign_by == "novelty"
    table = predict(stage_a.directory, data_path, tmp_path / "out")
    adata = anndata.read_h5ad(tmp_path / "out" / "predictions.h5ad")
    assert predict_updated.CELL_COLUMNS["novelty"] == "pred_novelty"
    np.testing.assert_allclose(adata.obs["pred_novelty"].to_numpy(), table["pred_novelty"].to_numpy())
    assert adata.uns["pred"]["unassign_by"] == "novelty" and adata.uns["pred"]["unassign_thres"] == 1.0
    # each view's p-value, in obs and the CSV: in (0, 1], and the novelty's ranking follows their product
    pvalues = adata.obs[[f"pred_novelty_p_{v}" for v in VIEWS]]
    np.testing.assert_allclose(pvalues.to_numpy(), table[[f"pred_novelty_p_{v}" for v in VIEWS]].to_numpy())
    assert ((pvalues > 0) & (pvalues <= 1)).all().all()
    checkpoint = load_checkpoint(stage_a.best)  # one member: novelty = -sum(log p) / its threshold
    np.testing.assert_allclose(-np.log(pvalues.to_numpy()).sum(1) / checkpoint.novelty["threshold"],
                               table["pred_novelty"].to_numpy(), rtol=1e-5)
    # --unassign_thres replaces the stored threshold
    strict = predict(stage_a.directory, data_path, tmp_path / "strict", "--unassign_thres", "0")
    assert strict["pred_unassigned"].all()


def test_checkpoints_without_statistics_fall_back_to_confidence(stage_a, data_path, tmp_path):  # noqa: F811
    checkpoint = load_checkpoint(stage_a.best)
    old = tmp_path / "old.pth"
    save_checkpoint(old, checkpoint.model, genes=checkpoint.genes, classes=checkpoint.classes, bin_num=checkpoint.bin_num,
                    bin_width=checkpoint.bin_width, stage=checkpoint.stage)
    with pytest.warns(UserWarning, match="no novelty statistics"):
        table = predict(old, data_path, tmp_path / "out", "--bayes_mc_samples", "1")
    assert table["pred_novelty"].isna().all() and not any(c.startswith("pred_novelty_p_") for c in table.columns)
    pd.testing.assert_series_equal(table["pred_unassigned"], table["pred_confidence"] < 0.5, check_names=False)
    assert anndata.read_h5ad(tmp_path / "out" / "predictions.h5ad").uns["pred"]["unassign_by"] == "confidence"


def test_ensemble_novelty_averages_distances_relative_to_each_threshold():
    distances = [np.array([1.0, 4.0]), np.array([30.0, 10.0])]
    np.testing.assert_allclose(ensemble_novelty(distances, [2.0, 10.0]), [(0.5 + 3.0) / 2, (2.0 + 1.0) / 2])


def test_ensemble_novelty_leaves_out_the_members_that_trained_on_a_cell_unless_all_did():
    scores = [np.array([1.0, 4.0, 6.0]), np.array([30.0, 10.0, 20.0])]
    trained = np.array([[True, False, True], [False, False, True]])  # (members, cells)
    # cell 0: only member 1 never saw it; cell 1: neither saw it; cell 2: both did, so both count
    np.testing.assert_allclose(ensemble_novelty(scores, [2.0, 10.0], trained), [3.0, (2.0 + 1.0) / 2, (3.0 + 2.0) / 2])


def test_view_pvalues_are_the_geometric_mean_over_the_members_that_did_not_train_on_the_cell():
    evidence = [{"input_knn": -np.log([0.1, 0.5]), "entropy": -np.log([0.2, 0.2])},
                {"input_knn": -np.log([0.4, 0.5]), "entropy": -np.log([0.8, 0.05])}]
    trained = np.array([[False, True], [False, False]])  # member 0 trained on cell 1
    pvalues = predict_updated.view_pvalues(evidence, trained)
    np.testing.assert_allclose(pvalues["input_knn"], [0.2, 0.5])  # sqrt(0.1 * 0.4); cell 1: member 1 alone
    np.testing.assert_allclose(pvalues["entropy"], [0.4, 0.05])
    assert predict_updated.view_pvalues([evidence[0], {"entropy": evidence[1]["entropy"]}], None) == {}
    assert predict_updated.view_pvalues([evidence[0], None], None) == {}


def test_prediction_finds_a_models_training_cells_and_not_its_validation_cells(stage_a, data_path):  # noqa: F811
    checkpoint = load_checkpoint(stage_a.best)
    validation = stage_a.val_cells()
    everyone = load_dataset(data_path, label_key="cell_type").cell_ids
    training = [cell for cell in everyone if cell not in set(validation)]
    cells = training[:20] + validation
    loader = loader_of(checkpoint, data_path, cells)
    trained = predict_samples(checkpoint.model, loader, 1, novelty=checkpoint.novelty)[1].trained
    assert trained.shape == (len(cells),)
    assert trained[:20].all() and not trained[20:].any()
    # statistics without the input view have no neighbour index; the fingerprints find the training cells alone
    without = {key: value for key, value in checkpoint.novelty.items() if key not in ("neighbours", "knn_k")
               and not key.startswith("input_")} | {"parts": ["mahalanobis", "entropy"]}
    np.testing.assert_array_equal(predict_samples(checkpoint.model, loader, 1, novelty=without)[1].trained, trained)


def test_training_cells_are_found_by_fingerprint_beyond_the_neighbour_index():
    bins = np.random.default_rng(0).integers(0, 7, (60, 30)).astype(np.float64)  # 40 training cells, 20 new ones
    stats = fit_training_cells([bins[:25], bins[25:40]]) | fit_input_neighbours(bins[:5], pcs=3, k=2)  # index: 5 of 40
    np.testing.assert_array_equal(training_cells(bins, stats), np.arange(60) < 40)


def test_a_cell_fingerprint_changes_with_any_bin_and_not_with_the_dtype():
    bins = np.random.default_rng(1).integers(0, 7, (3, 50))
    changed = bins.copy()
    changed[1, 49] += 1
    assert (cell_fingerprints(bins) == cell_fingerprints(bins.astype(np.float64))).all()
    assert (cell_fingerprints(changed) != cell_fingerprints(bins)).tolist() == [False, True, False]
    assert len(set(cell_fingerprints(bins).tolist())) == 3


def test_novelty_distance_is_the_mahalanobis_distance_to_the_nearest_class_mean():
    rng = np.random.default_rng(0)
    features = np.concatenate([rng.normal(0, 1, (40, 5)), rng.normal(3, 1, (40, 5))]) * [1, 2, 3, 4, 5]
    labels = np.repeat([0, 1], 40)
    stats = fit_novelty(features, labels, pcs=5)  # all axes: the projection is a rotation of standardized features
    standardized = (features - features.mean(0)) / features.std(0)
    components = np.asarray(stats["components"], dtype=np.float64)
    projected = standardized @ components.T
    means = np.stack([projected[labels == c].mean(0) for c in (0, 1)])
    precision = np.asarray(stats["precision_cholesky"], np.float64) @ np.asarray(stats["precision_cholesky"], np.float64).T
    cells = rng.normal(1, 2, (7, 5))
    z = ((cells - features.mean(0)) / features.std(0)) @ components.T
    expected = np.min([np.sqrt(np.einsum("ij,jk,ik->i", z - m, precision, z - m)) for m in means], axis=0)
    np.testing.assert_allclose(novelty_distance(cells, stats), expected, rtol=1e-4)
    assert np.asarray(stats["means"]).shape == (2, 5)


def test_cells_passed_in_blocks_count_in_the_class_statistics_on_the_first_cells_axes():
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1, 2], 20)
    features = rng.normal(labels[:, None] * [1.0, -2.0, 0.5, 0.0, 3.0], 1.0)
    first = np.isin(np.arange(60), np.r_[0:12, 20:32])  # class 2 only arrives in the blocks
    blocks = [(features[rows], labels[rows]) for rows in (slice(32, 40), slice(40, 60), slice(12, 20))]  # the rest once
    stats = fit_novelty(features[first], labels[first], more=blocks, pcs=4)
    alone = fit_novelty(features[first], labels[first], pcs=4)
    for key in ("center", "scale", "components"):  # the axes come from the first cells alone
        torch.testing.assert_close(stats[key], alone[key])
    center, scale, components = (np.asarray(stats[key], np.float64) for key in ("center", "scale", "components"))
    projected = ((features - center) / scale) @ components.T
    assert stats["classes"] == [0, 1, 2]
    expected = np.stack([projected[labels == c].mean(0) for c in (0, 1, 2)])  # every cell once, whichever block
    np.testing.assert_allclose(np.asarray(stats["means"]), expected, rtol=1e-4, atol=1e-5)
    covariance = LedoitWolf(assume_centered=True).fit(projected - expected[labels]).covariance_  # all 60 cells too
    covariance += 1e-6 * np.trace(covariance) / len(covariance) * np.eye(len(covariance))
    upper = np.asarray(stats["precision_cholesky"], np.float64)
    np.testing.assert_allclose(upper @ upper.T, np.linalg.inv(covariance), rtol=1e-4, atol=1e-5)


def test_a_large_training_set_fits_axes_on_a_subset_and_the_class_statistics_on_every_cell(
        data_path, tmp_path, monkeypatch):  # noqa: F811
    import finetune_sparse

    monkeypatch.setattr(finetune_sparse, "NOVELTY_NEIGHBOURS", 40)  # of 128 training cells: axes and index cells
    monkeypatch.setattr(finetune_sparse, "BLOCK_CELLS", 16)  # several blocks of training and validation cells
    run = train(data_path, tmp_path, "blocks", "--epoch", "1", "--prune_target", "0", "--novelty_fpr", str(FPR),
                "--novelty_input_pcs", "7")
    checkpoint = load_checkpoint(run.best)
    stats = checkpoint.novelty
    assert np.asarray(stats["input_components"]).shape[0] == 7 and np.asarray(stats["neighbours"]).shape[1] == 7
    validation = run.val_cells()
    training = [cell for cell in load_dataset(data_path, label_key="cell_type").cell_ids if cell not in set(validation)]
    assert np.asarray(stats["neighbours"]).shape[0] == 40 and len(stats["trained_fingerprints"]) == len(training)
    features = collect_features(checkpoint.model, loader_of(checkpoint, data_path, training), stats["layer"])
    center, scale, components = (np.asarray(stats[key], np.float64) for key in ("center", "scale", "components"))
    projected = ((features - center) / scale) @ components.T
    truth = load_dataset(data_path, label_key="cell_type")
    label_of = dict(zip(truth.cell_ids, truth.labels))
    labels = np.array([checkpoint.classes.index(label_of[cell]) for cell in training])
    expected = np.stack([projected[labels == c].mean(0) for c in stats["classes"]])  # all 128 cells, not the 40
    np.testing.assert_allclose(np.asarray(stats["means"]), expected, atol=1e-3)
    flagged = (scores_of(checkpoint, data_path, validation) > stats["threshold"]).mean()
    assert abs(flagged - FPR) <= 1 / len(validation) + 1e-9  # the validation cells, scored in blocks, calibrate it


def test_ensemble_members_each_carry_their_own_statistics(data_path, tmp_path):  # noqa: F811
    run = train(data_path, tmp_path / "folds", "f", "--epoch", "1", "--prune_target", "0", "--cv_splits", "2")
    members = load_ensemble(run.directory)
    assert len(members) == 2 and all(m.novelty is not None for m in members)
    assert members[0].novelty["threshold"] != members[1].novelty["threshold"]


def test_input_knn_distance_is_the_mean_distance_to_the_nearest_training_cells_in_pc_space():
    from sklearn.neighbors import NearestNeighbors

    rng = np.random.default_rng(1)
    training = rng.poisson(2.0, (60, 12)).astype(float)
    stats = fit_input_neighbours(training, pcs=12, k=4)  # all axes: distances of standardized expression
    mean, std = training.mean(0), training.std(0)
    cells = rng.poisson(2.5, (9, 12)).astype(float)
    distances, _ = NearestNeighbors(n_neighbors=4).fit((training - mean) / std).kneighbors((cells - mean) / std)
    np.testing.assert_allclose(input_knn_distance(input_neighbours(input_projection(cells, stats), stats)),
                               distances.mean(1), rtol=1e-4)


def test_input_class_views_are_the_mahalanobis_distance_and_the_gaussian_log_density_of_the_nearest_type():
    from scipy.stats import multivariate_normal

    rng = np.random.default_rng(4)
    training = rng.poisson(2.0, (90, 6)).astype(float)
    labels = np.repeat([0, 1, 2], 30)
    training[labels == 1] += 3  # three types, the second and third farther out and broader
    training[labels == 2] *= 2.0
    # 30 cells fit the axes and are the neighbour index; 60 more come in two blocks and count in the class statistics
    index = np.r_[0:90:3]
    rest = np.setdiff1d(np.arange(90), index)
    stats = fit_input_neighbours(training[index], pcs=6, k=3, labels=labels[index],
                                 more=[(training[rest[:30]], labels[rest[:30]]), (training[rest[30:]], labels[rest[30:]])])
    cells = rng.poisson(3.0, (12, 6)).astype(float)
    projected, train_projected = input_projection(cells, stats), input_projection(training, stats)  # all axes
    groups = [train_projected[labels == c] for c in range(3)]
    shared = LedoitWolf(assume_centered=True).fit(np.concatenate([g - g.mean(0) for g in groups])).covariance_
    distances = [np.einsum("ij,jk,ik->i", projected - g.mean(0), np.linalg.inv(shared), projected - g.mean(0)) for g in groups]
    np.testing.assert_allclose(input_mahalanobis_distance(projected, stats), np.sqrt(np.min(distances, 0)), rtol=1e-3)
    ridge = 1e-3 * np.trace(shared) / 6 * np.eye(6)
    log_density = [multivariate_normal(g.mean(0), LedoitWolf().fit(g).covariance_ + ridge).logpdf(projected) for g in groups]
    constant = 6 * np.log(2 * np.pi)  # -2 log N(x; m, S) = d^2 + log det S + k log 2 pi
    np.testing.assert_allclose(input_likelihood_distance(projected, stats), -2 * np.max(log_density, 0) - constant,
                               rtol=1e-3)


def test_a_type_with_too_few_cells_for_its_own_covariance_takes_the_shared_one():
    rng = np.random.default_rng(5)
    training = rng.normal(0, 1, (42, 4))
    labels = np.r_[np.zeros(40, int), [1, 1]]  # the second type: 2 cells
    stats = fit_input_neighbours(training, pcs=4, k=3, labels=labels)
    whitens = np.asarray(stats["input_class_precision_cholesky"], np.float64)
    shared = np.linalg.inv(np.asarray(stats["input_precision_cholesky"], np.float64) @ np.asarray(stats["input_precision_cholesky"], np.float64).T)
    ridge = 1e-3 * np.trace(shared) / 4 * np.eye(4)
    np.testing.assert_allclose(np.linalg.inv(whitens[1] @ whitens[1].T), shared + ridge, rtol=1e-3, atol=1e-5)
    assert np.isfinite(input_likelihood_distance(input_projection(training, stats), stats)).all()


def test_novelty_score_is_fishers_combination_of_the_views_tail_shares():
    rng = np.random.default_rng(2)
    features = rng.normal(0, 1, (50, 6))
    labels = np.repeat([0, 1], 25)
    tokens = np.concatenate([rng.integers(0, 5, (50, 8)), np.zeros((50, 1), int)], axis=1)  # (cells, genes+1)
    probs = rng.dirichlet(np.ones(3), 50)
    stats = fit_novelty(features[:30], labels[:30], pcs=4) | fit_input_neighbours(tokens[:30, :-1], pcs=4, k=3)
    views = ("mahalanobis", "input_knn", "entropy")  # statistics without labels: no input class views
    validation = novelty_parts(features[30:], tokens[30:], probs[30:], stats | {"parts": views})
    stats = calibrate_novelty(stats, validation, fpr=0.1)
    parts = novelty_parts(features, tokens, probs, stats)
    assert list(parts) == list(views)
    np.testing.assert_allclose(parts["entropy"], -(probs * np.log(probs)).sum(1))
    expected = sum(-np.log(((validation[v][None, :] >= parts[v][:, None]).sum(1) + 1) / 21) for v in views)
    np.testing.assert_allclose(novelty_score(parts, stats), expected, rtol=1e-5)
    evidence = novelty_evidence(parts, stats)  # each view's -log p, which the score sums
    assert list(evidence) == list(views)
    np.testing.assert_allclose(evidence["input_knn"], -np.log(((validation["input_knn"][None, :]
                                                                >= parts["input_knn"][:, None]).sum(1) + 1) / 21))
    np.testing.assert_allclose(sum(evidence.values()), novelty_score(parts, stats))
    # fitted on the 20 validation cells: 10 % of them lie above the threshold
    assert (novelty_score(validation, stats) > stats["threshold"]).sum() == 2


@pytest.mark.parametrize("dropped", [("parts", "calibration"), ("trained_fingerprints",), ("input_class_log_det",)])
def test_a_checkpoint_with_an_earlier_versions_statistics_is_refused_with_a_call_to_retrain(stage_a, tmp_path, dropped):
    """Statistics from before the views were combined, the cells fingerprinted or the input types' own covariances."""
    checkpoint = load_checkpoint(stage_a.best)
    older = {key: value for key, value in checkpoint.novelty.items() if key not in dropped}
    assert missing_statistics(checkpoint.novelty) == [] and missing_statistics(older)
    path = tmp_path / "older.pth"
    save_checkpoint(path, checkpoint.model, genes=checkpoint.genes, classes=checkpoint.classes,
                    bin_num=checkpoint.bin_num, bin_width=checkpoint.bin_width, stage=checkpoint.stage, novelty=older)
    with pytest.raises(UserError, match=f"earlier version of this project .*{dropped[0]}.*retrain"):
        load_checkpoint(path)


def test_statistics_without_an_input_view_need_no_expression_statistics():
    """--novelty_parts without an input view stores none of the expression's statistics: still the current format."""
    expression_keys = {"neighbours", "knn_k"} | {key for key in NOVELTY_KEYS if key.startswith("input_")}
    stats = {key: None for key in NOVELTY_KEYS - expression_keys}
    stats |= {"parts": ["mahalanobis", "entropy"], "calibration": {"mahalanobis": None, "entropy": None}}
    assert missing_statistics(stats) == []
    with_view = stats | {"parts": ["mahalanobis", "input_knn"]}
    assert missing_statistics(with_view) == [*sorted(expression_keys), "calibration[input_knn]"]
