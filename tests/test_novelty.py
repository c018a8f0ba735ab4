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
from test_training import TINY, data_path, one_torch_thread, train  # noqa: F401  (fixtures)
from torch.utils.data import DataLoader

import predict_updated
from bayesian_sparse_transformer import (
    collect_features,
    ensemble_novelty,
    fit_novelty,
    load_checkpoint,
    load_ensemble,
    novelty_distance,
    save_checkpoint,
)
from utils import BinnedDataset, align_genes, collate_batch, load_dataset

FPR = 0.1
NOVELTY_KEYS = {"layer", "classes", "center", "scale", "components", "means", "precision_cholesky",
                "threshold", "fpr"}


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


def features_of(checkpoint, data_path, cells: list[str]) -> np.ndarray:  # noqa: F811
    """The checkpoint's novelty features of the given cells of the test data."""
    data = align_genes(load_dataset(data_path, label_key="cell_type"), checkpoint.genes)
    position = {cell: i for i, cell in enumerate(data.cell_ids)}
    rows = [position[cell] for cell in cells]
    loader = DataLoader(BinnedDataset(data.matrix[rows], checkpoint.bin_num, bin_width=checkpoint.bin_width),
                        batch_size=16, collate_fn=collate_batch)
    return collect_features(checkpoint.model, loader, checkpoint.novelty["layer"])


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
    for key, value in checkpoint.novelty.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(reloaded[key], value)
        else:
            assert reloaded[key] == value


def test_checkpoints_without_statistics_load_as_none(stage_a, tmp_path):
    checkpoint = load_checkpoint(stage_a.best)
    old = tmp_path / "old.pth"
    save_checkpoint(old, checkpoint.model, genes=checkpoint.genes, classes=checkpoint.classes, bin_num=checkpoint.bin_num,
                    stage=checkpoint.stage)
    assert load_checkpoint(old).novelty is None


def test_threshold_reproduces_its_false_flag_rate_on_its_validation_cells(stage_a, data_path):  # noqa: F811
    checkpoint = load_checkpoint(stage_a.best)
    cells = stage_a.val_cells()
    distances = novelty_distance(features_of(checkpoint, data_path, cells), checkpoint.novelty)
    flagged = (distances > checkpoint.novelty["threshold"]).mean()
    assert abs(flagged - FPR) <= 1 / len(cells) + 1e-9  # a quantile of n cells is exact up to one cell


def test_statistics_match_the_features_of_a_physically_pruned_model(pruned, data_path):  # noqa: F811
    checkpoint = load_checkpoint(pruned.best)
    head = checkpoint.model.config.head
    assert checkpoint.stage == "B" and head.kept_inputs is not None and head.kept_inputs < head.seq_len  # inputs removed
    assert checkpoint.novelty["center"].shape == (head.fc1_in,)
    features = features_of(checkpoint, data_path, pruned.val_cells())
    assert features.shape[1] == head.fc1_in
    distances = novelty_distance(features, checkpoint.novelty)
    assert np.isfinite(distances).all()
    assert abs((distances > checkpoint.novelty["threshold"]).mean() - 0.05) <= 1 / len(distances) + 1e-9  # default fpr


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
    assert predict_updated.build_parser().parse_args(["--model_path", "m"]).unassign_by == "novelty"
    table = predict(stage_a.directory, data_path, tmp_path / "out")
    adata = anndata.read_h5ad(tmp_path / "out" / "predictions.h5ad")
    assert predict_updated.CELL_COLUMNS["novelty"] == "pred_novelty"
    np.testing.assert_allclose(adata.obs["pred_novelty"].to_numpy(), table["pred_novelty"].to_numpy())
    assert adata.uns["prediction"]["unassign_by"] == "novelty" and adata.uns["prediction"]["unassign_thres"] == 1.0
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
    assert table["pred_novelty"].isna().all()
    pd.testing.assert_series_equal(table["pred_unassigned"], table["pred_confidence"] < 0.5, check_names=False)
    assert anndata.read_h5ad(tmp_path / "out" / "predictions.h5ad").uns["prediction"]["unassign_by"] == "confidence"


def test_ensemble_novelty_averages_distances_relative_to_each_threshold():
    distances = [np.array([1.0, 4.0]), np.array([30.0, 10.0])]
    np.testing.assert_allclose(ensemble_novelty(distances, [2.0, 10.0]), [(0.5 + 3.0) / 2, (2.0 + 1.0) / 2])


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


def test_ensemble_members_each_carry_their_own_statistics(data_path, tmp_path):  # noqa: F811
    run = train(data_path, tmp_path / "folds", "f", "--epoch", "1", "--prune_target", "0", "--cv_splits", "2")
    members = load_ensemble(run.directory)
    assert len(members) == 2 and all(m.novelty is not None for m in members)
    assert members[0].novelty["threshold"] != members[1].novelty["threshold"]
