"""Prediction a chunk of cells at a time (issue 33): chunked outputs equal whole-data ones, a backed AnnData streams
through `annotate`, the CSV files grow a chunk at a time yet appear as a whole, and a bad chunk is one line with
nothing written."""

from __future__ import annotations

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from test_predict import CLASSES, GENES, N_CELLS, setup, synthetic_adata  # noqa: F401  (fixture)
from test_training import data_path, train  # noqa: F401  (fixture)

import predict_updated
import utils
from streaming import DEFAULT_CHUNK_CELLS, chunk_cells

pytestmark = pytest.mark.filterwarnings("ignore:the checkpoint has no novelty statistics")  # test_predict's model

CHUNK = 16  # a multiple of the batch size: chunks then hold the same batches as one chunk of all cells
OPTIONS = dict(label_key="cell_type", bayes_mc_samples=4, seed=5, batch_size=8, device="cpu")


def predict_cli(model, data, out, *extra: str) -> int:
    argv = ["--data_path", str(data), "--model_path", str(model), "--output_dir", str(out), "--label_key", "cell_type",
            "--bayes_mc_samples", "4", "--seed", "5", "--batch_size", "8", "--device", "cpu", *extra]
    return predict_updated.main(argv)


def outputs(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name.endswith(".csv")}


def with_nan_in_chunk(adata: anndata.AnnData, chunk: int) -> anndata.AnnData:
    x = adata.X.toarray()
    x[chunk * CHUNK + 2, 5] = np.nan
    adata.X = sp.csr_matrix(x)
    return adata


# ---- chunked = whole ------------------------------------------------------------------------------------------


def test_chunked_cli_outputs_equal_one_chunk_of_all_cells_and_the_in_memory_api(setup, tmp_path):  # noqa: F811
    assert predict_cli(setup["model"], setup["data"], tmp_path / "chunked", "--chunk_size", str(CHUNK)) == 0
    assert predict_cli(setup["model"], setup["data"], tmp_path / "whole", "--chunk_size", str(N_CELLS)) == 0
    assert outputs(tmp_path / "chunked") == outputs(tmp_path / "whole")  # byte for byte

    api = predict_updated.annotate(anndata.read_h5ad(setup["data"]), setup["model"], **OPTIONS)
    table = pd.read_csv(tmp_path / "chunked" / "predictions.csv", index_col="cell_id")
    probabilities = pd.read_csv(tmp_path / "chunked" / "probabilities.csv", index_col="cell_id")
    # the outputs keep float32: the CSV's shortest float32 text reads back as the API's float32 value
    np.testing.assert_array_equal(probabilities.to_numpy(np.float32), api.probability_matrix.to_numpy(np.float32))
    for column in predict_updated.CELL_COLUMNS.values():
        np.testing.assert_array_equal(table[column].to_numpy(np.float32), api.predicted_labels[column].to_numpy(np.float32))
    assert table["pred_label"].tolist() == api.labels.astype(str).tolist()


def chunk_prediction(rng, cells: int, start: int, views=("knn", "mahalanobis")) -> predict_updated.Prediction:
    probs = rng.dirichlet(np.ones(3), cells)
    summary = {"mean_probs": probs, "pred": probs.argmax(1), "confidence": probs.max(1), "novelty": rng.random(cells),
               "novelty_pvalues": {view: rng.random(cells) for view in views}}
    return predict_updated.Prediction([f"c{start + i}" for i in range(cells)], ["a", "b", "c"],
                                      predict_updated.compact(summary), summary["confidence"] < 0.5,
                                      np.array(["a"] * cells, dtype=object), 0.0)


@pytest.mark.parametrize("views", [("knn", "mahalanobis"), ()])
def test_chunk_results_fill_arrays_for_all_cells_in_float32(views):
    rng = np.random.default_rng(0)
    parts = [chunk_prediction(rng, cells, start, views) for cells, start in ((5, 0), (3, 5), (4, 8))]
    results = predict_updated.CellResults(12)
    for part in parts:
        results.add(part)
    joined = results.prediction(seconds=1.5)
    assert joined.cell_ids == [f"c{i}" for i in range(12)] and joined.seconds == 1.5
    for key in ("mean_probs", "pred", "confidence", "novelty"):
        np.testing.assert_array_equal(joined.summary[key], np.concatenate([p.summary[key] for p in parts]))
    assert joined.summary["mean_probs"].dtype == np.float32 and joined.summary["pred"].dtype == np.int32
    assert set(joined.summary["novelty_pvalues"]) == set(views)  # an empty dict stays an empty dict
    for view in views:
        np.testing.assert_array_equal(joined.summary["novelty_pvalues"][view],
                                      np.concatenate([p.summary["novelty_pvalues"][view] for p in parts]))
    np.testing.assert_array_equal(joined.unassigned, np.concatenate([p.unassigned for p in parts]))
    assert joined.true_labels.tolist() == ["a"] * 12


def test_chunk_results_announced_for_fewer_cells_refuse_more():
    results = predict_updated.CellResults(4)
    results.add(chunk_prediction(np.random.default_rng(1), 3, 0))
    with pytest.raises(RuntimeError, match="more than the 4 cells"):
        results.add(chunk_prediction(np.random.default_rng(2), 3, 3))


def test_chunks_of_any_size_agree_to_float_round_off(setup, tmp_path):  # noqa: F811
    assert predict_cli(setup["model"], setup["data"], tmp_path / "odd", "--chunk_size", "7") == 0
    assert predict_cli(setup["model"], setup["data"], tmp_path / "whole") == 0
    odd, whole = (pd.read_csv(tmp_path / name / "probabilities.csv") for name in ("odd", "whole"))
    np.testing.assert_allclose(odd[CLASSES], whole[CLASSES], atol=1e-6)  # other batches: float32 round-off only


def test_chunked_novelty_scores_and_view_pvalues_equal_whole_data_ones(data_path, tmp_path):  # noqa: F811
    run = train(data_path, tmp_path / "run", "a", "--epoch", "1", "--prune_target", "0")
    options = dict(bayes_mc_samples=1, seed=5, batch_size=8, device="cpu", verbose=False)
    whole = predict_updated.annotate(anndata.read_h5ad(data_path), run.best, **options)
    backed = anndata.read_h5ad(data_path, backed="r")
    try:
        chunked = predict_updated.annotate(backed, run.best, chunk_size=CHUNK, **options)
    finally:
        backed.file.close()
    assert chunked.uns["unassign_by"] == "novelty" and "pred_novelty_p_mahalanobis" in chunked.predicted_labels
    pd.testing.assert_frame_equal(chunked.predicted_labels, whole.predicted_labels, check_exact=False, rtol=0,
                                  atol=1e-12)


# ---- a backed AnnData ----------------------------------------------------------------------------------------


def test_backed_anndata_streams_through_annotate_reading_one_chunk_at_a_time(setup, monkeypatch):  # noqa: F811
    expected = predict_updated.annotate(anndata.read_h5ad(setup["data"]), setup["model"], **OPTIONS)
    reads = []
    read_rows = utils._read_rows
    monkeypatch.setattr(utils, "_read_rows", lambda x, rows: reads.append(read_rows(x, rows).shape[0]) or
                        read_rows(x, rows))
    backed = anndata.read_h5ad(setup["data"], backed="r")
    try:
        result = predict_updated.annotate(backed, setup["model"], chunk_size=CHUNK, **OPTIONS)
        copy = result.to_adata(inplace=False)
    finally:
        backed.file.close()
    assert reads == [CHUNK, CHUNK, CHUNK, N_CELLS - 3 * CHUNK]  # each chunk read once, never the whole matrix
    pd.testing.assert_frame_equal(result.predicted_labels, expected.predicted_labels, check_exact=False, rtol=0,
                                  atol=1e-12)
    assert copy.X is None and copy.obs_names.tolist() == backed.obs_names.tolist()  # no expression matrix
    assert "cell_type" in copy.obs and "X_umap" in copy.obsm
    np.testing.assert_allclose(copy.obsm["pred_probabilities"], expected.probability_matrix, atol=1e-6)


def test_scaled_x_switches_to_raw_by_the_first_chunk_for_every_chunk(setup, tmp_path):  # noqa: F811
    adata = anndata.read_h5ad(setup["data"])
    adata.raw = adata.copy()
    adata.X = adata.X.toarray() - 1.0  # scaled: negative values
    adata.write_h5ad(tmp_path / "scaled.h5ad")
    with pytest.warns(UserWarning, match="reading adata.raw instead"):
        assert predict_cli(setup["model"], tmp_path / "scaled.h5ad", tmp_path / "out", "--chunk_size", str(CHUNK)) == 0
    assert predict_cli(setup["model"], setup["data"], tmp_path / "plain", "--chunk_size", str(CHUNK)) == 0
    assert outputs(tmp_path / "out") == outputs(tmp_path / "plain")


def test_predictions_h5ad_of_a_file_holds_results_without_the_expression_matrix(setup, tmp_path):  # noqa: F811
    assert predict_cli(setup["model"], setup["data"], tmp_path / "out", "--chunk_size", str(CHUNK)) == 0
    written = anndata.read_h5ad(tmp_path / "out" / "predictions.h5ad")
    assert written.X is None and written.shape == (N_CELLS, len(GENES))
    assert {"cell_type", "pred_label", "pred_confidence"} <= set(written.obs.columns)
    assert written.obsm["pred_probabilities"].shape == (N_CELLS, len(CLASSES))
    assert "no expression matrix" in predict_updated.build_parser().format_help().replace("\n", " ")


# ---- written a chunk at a time, replaced as a whole -------------------------------------------------------------


def test_csv_rows_are_written_as_chunks_finish_inside_the_staging_directory(setup, tmp_path, monkeypatch):  # noqa: F811
    out = tmp_path / "out"
    seen = []
    summarise = predict_updated.summarise

    def watching(members, data, config, temperature, has_novelty, device, bar, number):
        pending = list(tmp_path.glob(".staging-out-*/.tmp-predictions.csv-*"))
        seen.append(sum(1 for _ in open(pending[0], encoding="utf-8")) if pending else None)
        return summarise(members, data, config, temperature, has_novelty, device, bar, number)

    monkeypatch.setattr(predict_updated, "summarise", watching)
    assert predict_cli(setup["model"], setup["data"], out, "--chunk_size", str(CHUNK)) == 0
    assert seen == [0, 1 + CHUNK, 1 + 2 * CHUNK, 1 + 3 * CHUNK]  # the header and the rows of the chunks before
    assert len(pd.read_csv(out / "predictions.csv")) == N_CELLS


def test_failure_mid_stream_keeps_the_earlier_outputs_and_leaves_no_staging(setup, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out"
    assert predict_cli(setup["model"], setup["data"], out) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with_nan_in_chunk(anndata.read_h5ad(setup["data"]), 2).write_h5ad(tmp_path / "bad.h5ad")
    capsys.readouterr()
    assert predict_cli(setup["model"], tmp_path / "bad.h5ad", out, "--chunk_size", str(CHUNK), "--overwrite") == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_nan_in_the_third_chunk_is_one_line_naming_its_cells_and_writes_nothing(setup, tmp_path, capsys):  # noqa: F811
    with_nan_in_chunk(anndata.read_h5ad(setup["data"]), 2).write_h5ad(tmp_path / "bad.h5ad")
    out = tmp_path / "out"
    capsys.readouterr()
    assert predict_cli(setup["model"], tmp_path / "bad.h5ad", out, "--chunk_size", str(CHUNK)) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: 1 of 16 cells in ") and "(cells 33 to 48) contain NaN or infinite values" in error
    assert "\n" not in error
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["bad.h5ad"]


def test_default_chunk_keeps_a_dense_chunk_near_256_mb():
    assert chunk_cells(765) == DEFAULT_CHUNK_CELLS
    assert chunk_cells(33_000) * 33_000 * 4 <= 256 * 2**20 < (chunk_cells(33_000) + 1) * 33_000 * 4
    assert chunk_cells(765, 123) == 123
