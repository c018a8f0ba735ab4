"""The notebook API: `finetune_sparse.fit(adata, ...)` and `predict_updated.annotate(adata, model, ...)` do what the
command lines do, on an in-memory AnnData."""

from __future__ import annotations

import anndata
import numpy as np
import pandas as pd
import pytest
from test_training import CELLS_PER_CLASS, CLASSES_KEPT, data_path, one_torch_thread  # noqa: F401  (fixtures)

import finetune_sparse
import predict_updated
from checkpoints import load_checkpoint

TINY_OPTIONS = dict(dim=16, depth=1, heads=2, dim_head=8, h_dim=16, batch_size=16, grad_acc=1, learning_rate=1e-3,
                    device="cpu", seed=7, label_key="cell_type", prune_target=0.0)


@pytest.fixture(scope="module")
def fitted(data_path, tmp_path_factory):  # noqa: F811
    directory = tmp_path_factory.mktemp("fit")
    summary = finetune_sparse.fit(anndata.read_h5ad(data_path), directory, epoch=2, cv_splits=2, **TINY_OPTIONS)
    return directory, summary


def test_fit_trains_from_an_in_memory_anndata_like_the_command_line(fitted, data_path, tmp_path):  # noqa: F811
    directory, summary = fitted
    assert len(summary["folds"]) == 2 and sorted(p.name for p in directory.glob("*_best.pth")) == ["finetune0_best.pth", "finetune1_best.pth"]
    argv = ["--data_path", str(data_path), "--ckpt_dir", str(tmp_path), "--epoch", "2", "--cv_splits", "2"]
    argv += [f"--{k}={v}" for k, v in TINY_OPTIONS.items()]
    assert finetune_sparse.main(argv) == 0
    for fold in range(2):
        ours = load_checkpoint(directory / f"finetune{fold}_best.pth").metrics
        cli = load_checkpoint(tmp_path / f"finetune{fold}_best.pth").metrics
        assert ours == cli  # same data, options and seed: the same model


def test_annotate_returns_what_the_cli_writes(fitted, data_path, tmp_path):  # noqa: F811
    directory, _ = fitted
    adata = anndata.read_h5ad(data_path)
    before = adata.copy()
    result = predict_updated.annotate(adata, directory, bayes_mc_samples=3, seed=5, label_key="cell_type")
    assert predict_updated.main(["--model_path", str(directory), "--data_path", str(data_path), "--bayes_mc_samples", "3",
                                 "--seed", "5", "--label_key", "cell_type", "--output_dir", str(tmp_path / "cli")]) == 0
    written = anndata.read_h5ad(tmp_path / "cli" / "predictions.h5ad")
    new_columns = [c for c in written.obs.columns if c not in before.obs.columns]
    assert new_columns == list(result.predicted_labels.columns)
    pd.testing.assert_frame_equal(result.predicted_labels, written.obs[new_columns], check_dtype=False,
                                  check_categorical=False, check_names=False)
    np.testing.assert_allclose(result.probability_matrix, written.obsm["pred_probabilities"], rtol=1e-6)
    assert result.uns["ensemble_size"] == 2 and written.uns["pred"]["ensemble_size"] == 2
    assert 0 <= result.metrics["accuracy"] <= 1 and result.uns["metrics"]["accuracy"] == result.metrics["accuracy"]
    assert len(result.predicted_labels) == CLASSES_KEPT * CELLS_PER_CLASS
    # The user's AnnData is left as it was.
    assert list(adata.obs.columns) == list(before.obs.columns) and "pred_probabilities" not in adata.obsm


def test_the_api_refuses_unknown_and_file_only_options(fitted, data_path):  # noqa: F811
    directory, _ = fitted
    adata = anndata.read_h5ad(data_path)
    with pytest.raises(TypeError, match="mc_samples"):
        predict_updated.annotate(adata, directory, mc_samples=8)
    with pytest.raises(TypeError, match="output_dir"):
        predict_updated.annotate(adata, directory, output_dir="x")
    with pytest.raises(TypeError, match="data_path"):
        finetune_sparse.fit(adata, directory, data_path="x.h5ad")
