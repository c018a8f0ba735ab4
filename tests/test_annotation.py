"""Results where users look for them: `annotate` returns an AnnotationResult whose columns are those of the CLI's
predictions.csv and predictions.h5ad; `.raw` is read when `.X` is scaled; majority voting over the user's clusters or a
Leiden over-clustering; progress as a bar or as log lines."""

from __future__ import annotations

import io
import warnings

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from test_predict import CLASSES, N_CELLS, setup, synthetic_adata  # noqa: F401  (fixture)

import finetune_sparse
import predict_updated
from annotation import AnnotationResult, cell_table
from majority_voting import majority_vote, over_clustering_resolution
from progress import LogProgress, progress
from utils import UserError, dataset_from_anndata

CLUSTERS = 4
pytestmark = pytest.mark.filterwarnings("ignore:the checkpoint has no novelty statistics")  # test_predict's model


def clustered(adata: anndata.AnnData) -> anndata.AnnData:
    adata.obs["cluster"] = pd.Categorical([f"c{i % CLUSTERS}" for i in range(adata.n_obs)])
    return adata


def comparable(frame: pd.DataFrame) -> pd.DataFrame:
    """Labels as text and numbers as float64, whichever file they were read from."""
    return pd.DataFrame({c: frame[c].astype(str if isinstance(frame[c].dtype, pd.CategoricalDtype)
                                            or frame[c].dtype == object else np.float64) for c in frame.columns},
                        index=frame.index.astype(str))


def categorical_columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if isinstance(frame[c].dtype, pd.CategoricalDtype)]


# ---- one table: the result, to_adata/inplace and the CLI's files ------------------------------------------


def test_result_inplace_and_cli_files_share_the_same_columns(setup, tmp_path):  # noqa: F811
    data = clustered(anndata.read_h5ad(setup["data"]))
    data.write_h5ad(tmp_path / "clustered.h5ad")
    adata = data.copy()
    options = dict(label_key="cell_type", majority_voting=True, over_clustering="cluster", seed=3)
    result = predict_updated.annotate(adata, setup["model"], inplace=True, **options)
    argv = ["--data_path", str(tmp_path / "clustered.h5ad"), "--model_path", str(setup["model"]), "--output_dir",
            str(tmp_path / "out"), "--label_key", "cell_type", "--majority_voting", "--over_clustering", "cluster",
            "--seed", "3"]
    assert predict_updated.main(argv) == 0

    assert isinstance(result, AnnotationResult)
    columns = list(result.predicted_labels.columns)
    assert columns[:3] == ["pred_label", "pred_unassigned", "pred_confidence"]
    assert {"pred_top_label", "pred_std", "pred_novelty", "pred_cluster", "pred_majority_label",
            "pred_majority_agreement"} <= set(columns)
    csv = pd.read_csv(tmp_path / "out" / "predictions.csv")
    assert list(csv.columns) == ["cell_id", *columns, "true_label"]
    written = anndata.read_h5ad(tmp_path / "out" / "predictions.h5ad")
    added = [c for c in written.obs.columns if c not in data.obs.columns]
    assert added == columns
    assert [c for c in adata.obs.columns if c not in data.obs.columns] == columns  # inplace=True
    copy = result.to_adata(inplace=False)
    assert [c for c in copy.obs.columns if c not in data.obs.columns] == columns
    for frame in (written.obs[columns], adata.obs[columns], copy.obs[columns],
                  csv.set_index("cell_id")[columns]):
        pd.testing.assert_frame_equal(comparable(frame), comparable(result.predicted_labels), check_names=False)
    # probabilities: a DataFrame with the class names, in obsm and probabilities.csv; metadata in uns
    probabilities = pd.read_csv(tmp_path / "out" / "probabilities.csv").set_index("cell_id")
    for frame in (written.obsm["pred_probabilities"], adata.obsm["pred_probabilities"], probabilities):
        assert list(frame.columns) == CLASSES
        np.testing.assert_allclose(frame.to_numpy(), result.probability_matrix.to_numpy(), atol=1e-6)
    assert written.uns["pred"]["majority_voting"]["over_clustering"] == "obs['cluster']"
    assert adata.uns["pred"]["classes"] == CLASSES == result.classes
    assert result.metrics is not None and 0 <= result.metrics["accuracy"] <= 1


def test_label_categories_hold_only_the_labels_that_occur(setup):  # noqa: F811
    adata = synthetic_adata(["NK"] * 20)  # a model of three types sees one
    result = predict_updated.annotate(adata, setup["model"], unassign_by="confidence", unassign_thres=0.0,
                                      majority_voting=True, over_clustering="cell_type", inplace=True)
    for frame in (result.predicted_labels, adata.obs):
        for column in categorical_columns(frame):
            if column.startswith("pred_"):
                assert set(frame[column].cat.categories) == set(frame[column].astype(str)), column
    summary = {"pred": np.array([0, 2, 2]), **{k: np.zeros(3) for k in ("confidence", "entropy", "expected_entropy",
                                                                        "mutual_info", "pred_std", "novelty")}}
    table = cell_table(["a", "b", "c"], CLASSES, summary, np.array([False, False, True]))
    assert list(table["pred_label"].cat.categories) == ["B cell", "T cell", "Unassigned"]
    assert list(table["pred_top_label"].cat.categories) == ["B cell", "T cell"]


def test_key_added_names_every_output_and_the_user_anndata_is_untouched_by_default(setup):  # noqa: F811
    adata = anndata.read_h5ad(setup["data"])
    before = list(adata.obs.columns)
    result = predict_updated.annotate(adata, setup["model"], key_added="bst")
    assert list(adata.obs.columns) == before and "bst" not in adata.uns  # inplace=False leaves it as it was
    assert all(c.startswith("bst_") for c in result.predicted_labels.columns)
    result.to_adata(adata)
    assert "bst_probabilities" in adata.obsm and "bst" in adata.uns and "bst_label" in adata.obs
    renamed = result.to_adata(adata, key_added="again")
    assert "again_label" in renamed.obs and "again_probabilities" in renamed.obsm
    np.testing.assert_array_equal(renamed.obs["again_confidence"], adata.obs["bst_confidence"])


def test_to_adata_of_a_larger_anndata_leaves_other_cells_missing(setup):  # noqa: F811
    full = anndata.read_h5ad(setup["data"])
    subset = full[::2].copy()
    result = predict_updated.annotate(subset, setup["model"])
    result.to_adata(full)
    predicted = full.obs_names.isin(subset.obs_names)
    assert full.obs.loc[~predicted, "pred_label"].isna().all() and full.obs.loc[predicted, "pred_label"].notna().all()
    assert full.obs.loc[~predicted, "pred_confidence"].isna().all()
    assert full.obs["pred_unassigned"].isna().sum() == (~predicted).sum()
    assert np.isnan(full.obsm["pred_probabilities"].to_numpy()[~predicted]).all()
    np.testing.assert_allclose(full.obsm["pred_probabilities"].loc[subset.obs_names], result.probability_matrix, atol=1e-6)


def test_class_names_with_a_slash_give_a_probability_matrix_that_h5ad_files_can_hold(tmp_path):
    classes = ["CD4+/CD25 T Reg", "NK"]  # pbmc68k_reduced's bulk_labels have such names
    summary = {"pred": np.array([0, 1]), "mean_probs": np.array([[0.9, 0.1], [0.2, 0.8]]),
               **{k: np.zeros(2) for k in ("confidence", "entropy", "expected_entropy", "mutual_info", "pred_std",
                                           "novelty")}}
    table = cell_table(["a", "b"], classes, summary, np.array([False, False]))
    result = AnnotationResult(table, pd.DataFrame(summary["mean_probs"], index=table.index, columns=classes), None,
                              {"classes": classes}, "pred")
    adata = result.to_adata(anndata.AnnData(obs=pd.DataFrame(index=["a", "b"])))
    assert isinstance(adata.obsm["pred_probabilities"], np.ndarray) and adata.uns["pred"]["classes"] == classes
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # anndata: slashes in names are about to be refused
        adata.write_h5ad(tmp_path / "a.h5ad")
    with pytest.raises(UserError, match="key_added must be a non-empty name without '/'"):
        predict_updated.default_config("m", key_added="a/b")


# ---- use_raw: automatic by default -------------------------------------------------------------------------


def scaled_with_raw(n_cells: int = 12, n_genes: int = 8) -> anndata.AnnData:
    """pbmc68k_reduced's shape of data: log-normalized .raw, scaled (negative) .X."""
    rng = np.random.default_rng(0)
    log = np.where(rng.random((n_cells, n_genes)) < 0.5, 0, rng.uniform(0, 4, (n_cells, n_genes))).astype(np.float32)
    adata = anndata.AnnData(X=sp.csr_matrix(log), var=pd.DataFrame(index=[f"G{i}" for i in range(n_genes)]))
    adata.raw = adata.copy()
    adata.X = ((log - log.mean(0)) / (log.std(0) + 1e-6)).astype(np.float32)
    return adata


def test_scaled_x_reads_raw_with_a_warning_naming_use_raw():
    adata = scaled_with_raw()
    with pytest.warns(UserWarning, match=r"negative values.*adata\.raw.*use_raw=True \(--use_raw\)"):
        data = dataset_from_anndata(adata, require_labels=False)
    np.testing.assert_array_equal(data.matrix.toarray(), adata.raw.X.toarray())
    assert dataset_from_anndata(adata, use_raw=True, require_labels=False).matrix.nnz == data.matrix.nnz


def test_scaled_x_without_usable_raw_names_the_argument():
    adata = scaled_with_raw()
    with pytest.raises(UserError, match="scaled") as refused:  # explicit use_raw=False: .X only
        dataset_from_anndata(adata, use_raw=False, require_labels=False)
    assert "use_raw" in str(refused.value) and "--use_raw" in refused.value.cli_message
    no_raw = anndata.AnnData(X=adata.X.copy(), var=adata.var.copy())
    with pytest.raises(UserError) as missing:
        dataset_from_anndata(no_raw, require_labels=False)
    assert "--use_raw" in missing.value.cli_message and "--layer" in missing.value.cli_message


def test_usable_x_is_read_even_when_raw_exists():
    adata = scaled_with_raw()
    adata.X = adata.raw.X * 0.5  # log-normalized .X: used as it is, .raw left alone
    data = dataset_from_anndata(adata, require_labels=False)
    np.testing.assert_allclose(data.matrix.toarray(), adata.X.toarray())


def test_fit_reads_raw_of_pbmc68k_reduced_without_arguments(tmp_path):
    import scanpy as sc

    adata = sc.datasets.pbmc68k_reduced()
    adata = adata[adata.obs["bulk_labels"].isin(["CD14+ Monocyte", "CD56+ NK"]).to_numpy()].copy()
    tiny = dict(dim=16, depth=1, heads=2, dim_head=8, h_dim=16, batch_size=32, device="cpu", prune_target=0.0)
    with pytest.warns(UserWarning, match="adata.raw"):
        summary = finetune_sparse.fit(adata, tmp_path / "run", epoch=1, cv_splits=1, label_key="bulk_labels", **tiny)
    assert len(summary["folds"]) == 1


# ---- majority voting ---------------------------------------------------------------------------------------


def test_majority_vote_gives_a_cluster_its_most_frequent_label_and_the_agreement():
    voted = majority_vote(["A"] * 8 + ["B"] * 2 + ["B", "Unassigned", "Unassigned"], ["1"] * 10 + ["2"] * 3)
    assert voted["majority_label"].tolist() == ["A"] * 10 + ["Unassigned"] * 3
    np.testing.assert_allclose(voted["majority_agreement"], [0.8] * 10 + [2 / 3] * 3)
    assert voted["cluster"].tolist() == ["1"] * 10 + ["2"] * 3
    tie = majority_vote(["B", "A", "Unassigned", "Unassigned", "A", "B"], ["x"] * 6)
    assert set(tie["majority_label"]) == {"A"}  # ties: an assigned label before Unassigned, then alphabetical


def test_majority_voting_over_a_given_column_end_to_end(setup):  # noqa: F811
    adata = clustered(anndata.read_h5ad(setup["data"]))
    result = predict_updated.annotate(adata, setup["model"], majority_voting=True, over_clustering="cluster",
                                      label_key="cell_type")
    table = result.predicted_labels
    assert table["pred_cluster"].astype(str).tolist() == adata.obs["cluster"].astype(str).tolist()
    for _, cells in table.groupby("pred_cluster", observed=True):
        counts = cells["pred_label"].astype(str).value_counts()
        majority = cells["pred_majority_label"].astype(str).unique()
        assert len(majority) == 1 and counts[majority[0]] == counts.max()
        np.testing.assert_allclose(cells["pred_majority_agreement"], counts[majority[0]] / len(cells))
    assert result.uns["majority_voting"] == {"over_clustering": "obs['cluster']", "n_clusters": CLUSTERS}
    right = table["pred_majority_label"].astype(str).to_numpy() == adata.obs["cell_type"].to_numpy()
    assert result.metrics["majority_voting"]["accuracy"] == pytest.approx(right.mean())


def test_majority_voting_without_clusters_over_clusters_with_leiden(setup):  # noqa: F811
    adata = anndata.read_h5ad(setup["data"])
    first = predict_updated.annotate(adata, setup["model"], majority_voting=True, seed=1)
    again = predict_updated.annotate(adata, setup["model"], majority_voting=True, seed=1)
    voting = first.uns["majority_voting"]
    assert voting["over_clustering"] == "leiden" and voting["resolution"] == over_clustering_resolution(N_CELLS) == 5.0
    assert 1 < voting["n_clusters"] < N_CELLS
    pd.testing.assert_frame_equal(first.predicted_labels, again.predicted_labels)  # deterministic for a seed
    assert over_clustering_resolution(50_000) == 20.0 and over_clustering_resolution(10**6) == 30.0


def test_majority_voting_options_are_checked_before_predicting(setup):  # noqa: F811
    adata = anndata.read_h5ad(setup["data"])
    with pytest.raises(UserError, match="majority_voting"):
        predict_updated.annotate(adata, setup["model"], over_clustering="cluster")
    with pytest.raises(UserError, match="over_clustering='nope' is not an obs column") as error:
        predict_updated.annotate(adata, setup["model"], majority_voting=True, over_clustering="nope")
    assert "cell_type" in str(error.value)


# ---- progress ---------------------------------------------------------------------------------------------


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_log_progress_prints_a_timed_line_with_rate_and_time_left():
    clock, out = Clock(), io.StringIO()
    with LogProgress(1000, desc="predicting", every=10, file=out, clock=clock) as bar:
        clock.now = 5
        bar.update(100)  # before 10 s: nothing
        assert out.getvalue() == ""
        clock.now = 10
        bar.update(100)
        assert out.getvalue() == "predicting: 200/1,000 cells (20%), 20 cells/s, 0:40 left\n"
        clock.now = 50
        bar.update(800)
    assert out.getvalue().splitlines()[-1] == "predicting: 1,000 cells in 0:50 (20 cells/s)"


def test_progress_is_a_bar_on_a_terminal_lines_in_a_log_and_silent_when_not_verbose():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert isinstance(progress(10, desc="x", file=io.StringIO()), LogProgress)
    bar = progress(10, desc="x", file=Terminal())
    assert not isinstance(bar, LogProgress) and not bar.disable
    bar.close()
    silent = progress(10, desc="x", enabled=False, file=Terminal())
    assert silent.disable
    silent.update(5)
    silent.close()
