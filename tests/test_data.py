"""Tests for the data layer of utils.py: reading, validation, gene alignment, binning, datasets and splits."""

import anndata
import hypothesis.extra.numpy as hnp
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from binning import Binning, bin_expression
from utils import (
    UNLABELLED,
    BinnedDataset,
    ExpressionData,
    UserError,
    align_genes,
    collate_batch,
    dataset_from_anndata,
    encode_labels,
    load_dataset,
    stratified_splits,
)


def make_adata(x, genes=None, labels=None, label_key="cell_type"):
    """A small AnnData with cells c0.., genes g0.. and an optional label column."""
    n_cells, n_genes = x.shape
    obs = pd.DataFrame(index=[f"c{i}" for i in range(n_cells)])
    if labels is not None:
        obs[label_key] = labels
    var = pd.DataFrame(index=genes if genes is not None else [f"g{j}" for j in range(n_genes)])
    return anndata.AnnData(X=x, obs=obs, var=var)


def log_normalized(n_cells=6, n_genes=5, seed=0):
    """Log-normalized-looking values in [0, 7) with about half zeros."""
    rng = np.random.default_rng(seed)
    values = rng.uniform(0, 7, size=(n_cells, n_genes)).astype(np.float32)
    return np.where(rng.random((n_cells, n_genes)) < 0.5, 0, values).astype(np.float32)


def write(tmp_path, adata, name="data.h5ad"):
    path = tmp_path / name
    adata.write_h5ad(path)
    return path


# ---------------------------------------------------------------------------------------------------------
# Bundled default and file reading


def test_bundled_default_is_log_normalized_pbmc68k_raw():
    data = load_dataset(None)
    assert data.matrix.shape == (700, 765)
    assert isinstance(data.matrix, sp.csr_matrix) and data.matrix.dtype == np.float32
    assert data.matrix.min() >= 0 and data.matrix.max() < 30
    assert len(np.unique(data.labels)) == 10
    # an object array pointing to one str per type, not a fixed-width str copy per cell
    assert data.labels.dtype == object and len({id(label) for label in data.labels}) == 10
    assert data.genes == list(data.adata.raw.var_names)
    assert len(data.cell_ids) == 700


def test_file_roundtrip_keeps_matrix_genes_labels(tmp_path):
    x = log_normalized()
    path = write(tmp_path, make_adata(sp.csr_matrix(x), labels=list("AABBCC")))
    data = load_dataset(path)
    np.testing.assert_array_equal(data.matrix.toarray(), x)
    assert data.genes == [f"g{j}" for j in range(5)]
    assert data.cell_ids == [f"c{i}" for i in range(6)]
    assert data.labels.tolist() == list("AABBCC")


def test_missing_file_is_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_dataset(tmp_path / "nope.h5ad")


@pytest.mark.parametrize("name", ["notes.h5ad", "table.csv"])
def test_non_h5ad_file_is_user_error_naming_file(tmp_path, name):
    path = tmp_path / name
    path.write_text("gene,cell\n1,2\n")
    with pytest.raises(UserError, match=name) as info:
        load_dataset(path)
    assert "\n" not in str(info.value)


@pytest.mark.filterwarnings("ignore::anndata.OldFormatWarning")
def test_hdf5_without_anndata_is_user_error(tmp_path):
    import h5py

    path = tmp_path / "plain.h5ad"
    with h5py.File(path, "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(UserError, match="cannot read"):
        load_dataset(path)


# ---------------------------------------------------------------------------------------------------------
# Validation errors


def test_missing_label_column_lists_available_columns(tmp_path):
    adata = make_adata(log_normalized(), labels=list("AABBCC"), label_key="celltype")
    adata.obs["batch"] = "b1"
    with pytest.raises(UserError, match="'cell_type' not found.*'celltype', 'batch'"):
        load_dataset(write(tmp_path, adata))


def test_missing_label_column_is_fine_when_labels_optional():
    data = dataset_from_anndata(make_adata(log_normalized()), require_labels=False)
    assert data.labels is None


def test_missing_label_values_are_counted():
    adata = make_adata(log_normalized(), labels=["A", None, "B", "", "  ", "C"])
    with pytest.raises(UserError, match="3 of 6 cells have no label.*remove those cells"):
        dataset_from_anndata(adata)


def test_missing_label_values_only_warn_when_labels_optional():
    adata = make_adata(log_normalized(), labels=["A", None, "B", "B", "C", "C"])
    with pytest.warns(UserWarning, match="1 of 6 cells have no label"):
        data = dataset_from_anndata(adata, require_labels=False)
    assert data.labels is None


def test_negative_values_point_at_raw_or_layer():
    x = log_normalized()
    x[2, 3] = -0.5
    with pytest.raises(UserError, match="scaled.*adata.raw.*layer") as error:
        dataset_from_anndata(make_adata(x), require_labels=False)
    assert error.value.options == {"use_raw": None, "layer": None}  # the CLIs add them as --use_raw, --layer


def test_raw_counts_point_at_normalize():
    counts = np.random.default_rng(0).poisson(50, size=(6, 5)).astype(np.float32)
    with pytest.raises(UserError, match="raw counts.*normalize it") as error:
        dataset_from_anndata(make_adata(counts), require_labels=False)
    assert error.value.options == {"normalize": True}


def test_large_non_integer_values_are_not_log_normalized():
    x = log_normalized() * 100 + 0.5
    with pytest.raises(UserError, match="too large to be log-normalized.*normalize it") as error:
        dataset_from_anndata(make_adata(x), require_labels=False)
    assert error.value.options == {"normalize": True}


def test_normalize_fixes_raw_counts_without_touching_input():
    counts = sp.csr_matrix(np.random.default_rng(0).poisson(50, size=(6, 5)).astype(np.float32))
    adata = make_adata(counts)
    before = adata.X.copy()
    data = dataset_from_anndata(adata, require_labels=False, normalize=True)

    expected = anndata.AnnData(X=before.copy())
    sc.pp.normalize_total(expected, target_sum=1e4)
    sc.pp.log1p(expected)
    np.testing.assert_allclose(data.matrix.toarray(), expected.X.toarray(), rtol=1e-6)
    assert (adata.X != before).nnz == 0  # the user's AnnData is unchanged
    assert data.adata is adata


def test_normalize_on_log_normalized_data_warns_and_keeps_values():
    x = log_normalized()
    with pytest.warns(UserWarning, match="already looks log-normalized"):
        data = dataset_from_anndata(make_adata(x), require_labels=False, normalize=True)
    np.testing.assert_array_equal(data.matrix.toarray(), x)


def test_nan_and_inf_count_affected_cells():
    x = log_normalized()
    x[1, 0] = np.nan
    x[1, 2] = np.nan
    x[4, 4] = np.inf
    with pytest.raises(UserError, match="2 of 6 cells .* NaN or infinite"):
        dataset_from_anndata(make_adata(sp.csr_matrix(x)), require_labels=False)


def test_duplicated_gene_names_are_named():
    with pytest.warns(UserWarning):  # anndata itself warns about non-unique names
        adata = make_adata(log_normalized(), genes=["CD3E", "MS4A1", "CD3E", "NKG7", "NKG7"])
    with pytest.raises(UserError, match="2 gene names occur more than once.*'CD3E', 'NKG7'"):
        dataset_from_anndata(adata, require_labels=False)


@pytest.mark.parametrize(("shape", "message"), [((0, 5), "no cells"), ((4, 0), "no genes")])
def test_empty_matrix_is_user_error(shape, message):
    with pytest.raises(UserError, match=message):
        dataset_from_anndata(make_adata(np.zeros(shape, dtype=np.float32)), require_labels=False)


def test_layer_selects_matrix_and_missing_layer_lists_layers():
    counts = np.random.default_rng(0).poisson(50, size=(6, 5)).astype(np.float32)
    adata = make_adata(counts)
    adata.layers["lognorm"] = log_normalized()
    data = dataset_from_anndata(adata, layer="lognorm", require_labels=False)
    np.testing.assert_array_equal(data.matrix.toarray(), adata.layers["lognorm"])
    with pytest.raises(UserError, match="'logcounts' not found.*available layers: 'lognorm'"):
        dataset_from_anndata(adata, layer="logcounts", require_labels=False)


def test_use_raw_selects_raw_matrix_and_genes():
    full = make_adata(log_normalized(6, 8))
    adata = full[:, :5].copy()
    adata.X = -np.ones((6, 5), dtype=np.float32)  # scaled values that must not be used
    adata.raw = full
    data = dataset_from_anndata(adata, use_raw=True, require_labels=False)
    assert data.genes == [f"g{j}" for j in range(8)]
    np.testing.assert_array_equal(data.matrix.toarray(), full.X)
    with pytest.raises(UserError, match="scaled"):
        dataset_from_anndata(adata, use_raw=False, require_labels=False)  # by default .raw would be read instead


def test_use_raw_without_raw_is_user_error():
    with pytest.raises(UserError, match="no .raw"):
        dataset_from_anndata(make_adata(log_normalized()), use_raw=True, require_labels=False)


def test_min_cells_per_class_drops_small_classes():
    x = log_normalized()
    adata = make_adata(sp.csr_matrix(x), labels=["A", "A", "B", "A", "C", "C"])
    with pytest.warns(UserWarning, match="dropped 1 classes.*'B'.*1 cells removed"):
        data = dataset_from_anndata(adata, min_cells_per_class=2)
    assert data.labels.tolist() == ["A", "A", "A", "C", "C"]
    assert data.cell_ids == ["c0", "c1", "c3", "c4", "c5"]
    np.testing.assert_array_equal(data.matrix.toarray(), x[[0, 1, 3, 4, 5]])
    assert adata.n_obs == 6


# ---------------------------------------------------------------------------------------------------------
# Gene alignment


def expression_data(x, genes):
    return ExpressionData(sp.csr_matrix(x), genes, [f"c{i}" for i in range(len(x))], None, make_adata(x))


def test_align_genes_reorders_fills_missing_and_drops_extra():
    x = log_normalized(4, 6)
    data = expression_data(x, [f"g{j}" for j in range(6)])
    reference = ["g3", "g1", "new1", "g0", "new2", "g5"]  # g2, g4 are extra; new1, new2 missing
    with pytest.warns(UserWarning, match="2 of 6 model genes are missing"):
        aligned = align_genes(data, reference)
    assert isinstance(aligned.matrix, sp.csr_matrix)
    assert aligned.genes == reference
    expected = np.stack([x[:, 3], x[:, 1], np.zeros(4), x[:, 0], np.zeros(4), x[:, 5]], axis=1)
    np.testing.assert_array_equal(aligned.matrix.toarray(), expected)
    assert aligned.cell_ids == data.cell_ids
    assert data.matrix.shape == (4, 6)  # input untouched


def test_align_genes_low_overlap_needs_allow_missing():
    data = expression_data(log_normalized(3, 4), ["a", "b", "c", "d"])
    reference = ["a", "x", "y", "z"]
    with pytest.raises(UserError, match=r"only 1 of 4 model genes \(25%\).*allow missing genes") as error:
        align_genes(data, reference)
    assert error.value.options == {"allow_missing_genes": True}
    with pytest.warns(UserWarning, match="3 of 4"):
        aligned = align_genes(data, reference, allow_missing=True)
    assert aligned.matrix.shape == (3, 4)


def test_align_genes_zero_overlap_always_fails():
    data = expression_data(log_normalized(3, 4), ["a", "b", "c", "d"])
    with pytest.raises(UserError, match="none of the 2 model genes"):
        align_genes(data, ["ENSG1", "ENSG2"], allow_missing=True)


# ---------------------------------------------------------------------------------------------------------
# Binning and datasets


def test_bin_expression_floors_clips_and_appends_zero():
    rows = np.array([[0.0, 0.4, 1.0, 2.7, 4.99, 5.0, 7.3], [3.2, 0.0, 0.0, 1.5, 6.0, 0.99, 2.0]])
    tokens = bin_expression(rows, bin_num=5)
    expected = [[0, 0, 1, 2, 4, 5, 5, 0], [3, 0, 0, 1, 5, 0, 2, 0]]
    assert tokens.dtype == torch.int64
    assert tokens.tolist() == expected


def test_loader_densifies_per_batch_and_matches_dense_binning(monkeypatch):
    x = log_normalized(7, 5)
    labels = np.array([0, 1, 2, 0, 1, 2, 0])
    dataset = BinnedDataset(sp.csr_matrix(x), Binning(5), labels=labels)

    def per_item_access(self, index):
        raise AssertionError("DataLoader should fetch whole batches through __getitems__")

    monkeypatch.setattr(BinnedDataset, "__getitem__", per_item_access)
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, collate_fn=collate_batch)
    batches = list(loader)
    assert [b.tokens.shape for b in batches] == [(3, 6), (3, 6), (1, 6)]
    tokens = torch.cat([b.tokens for b in batches])
    assert torch.equal(tokens, bin_expression(x, 5))
    assert torch.cat([b.labels for b in batches]).tolist() == labels.tolist()


def test_dataset_without_labels_returns_unlabelled_and_single_items():
    x = log_normalized(4, 3)
    dataset = BinnedDataset(sp.csr_matrix(x), Binning(5))
    tokens, label = dataset[2]
    assert tokens.shape == (4,) and label.item() == UNLABELLED
    assert torch.equal(tokens, bin_expression(x[2:3], 5)[0])
    subset = torch.utils.data.Subset(dataset, [3, 0])  # Subset forwards __getitems__ too
    batch = next(iter(torch.utils.data.DataLoader(subset, batch_size=2, collate_fn=collate_batch)))
    assert torch.equal(batch.tokens, bin_expression(x[[3, 0]], 5))
    assert batch.labels.tolist() == [UNLABELLED, UNLABELLED]


def test_collate_batch_stacks_single_items():
    dataset = BinnedDataset(sp.csr_matrix(log_normalized(3, 2)), Binning(5), labels=np.array([2, 0, 1]))
    batch = collate_batch([dataset[0], dataset[2]])
    assert batch.tokens.shape == (2, 3) and batch.labels.tolist() == [2, 1]


# ---------------------------------------------------------------------------------------------------------
# Labels and splits


def test_encode_labels_sorted_classes_and_given_classes():
    codes, classes = encode_labels(np.array(["T", "B", "NK", "B"]))
    assert classes == ["B", "NK", "T"] and codes.tolist() == [2, 0, 1, 0]
    codes, classes = encode_labels(np.array(["B", "T"]), classes=["T", "NK", "B"])
    assert codes.tolist() == [2, 0] and classes == ["T", "NK", "B"]
    with pytest.raises(UserError, match="1 cells have labels outside.*'Mono'"):
        encode_labels(np.array(["B", "Mono"]), classes=["B", "T"])


def test_stratified_split_sizes_and_class_proportions():
    labels = np.repeat([0, 1, 2], [30, 15, 5])
    (train, val), = stratified_splits(labels, n_splits=1, test_size=0.2, seed=0)
    assert len(train) == 40 and len(val) == 10
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(range(50))
    assert np.bincount(labels[val]).tolist() == [6, 3, 1]
    (_, again), = stratified_splits(labels, n_splits=1, test_size=0.2, seed=0)
    assert np.array_equal(val, again)
    (_, other), = stratified_splits(labels, n_splits=1, test_size=0.2, seed=1)
    assert not np.array_equal(val, other)


def test_stratified_splits_names_tiny_classes():
    labels = np.array([0, 0, 0, 1, 2, 2, 2])
    with pytest.raises(UserError, match="1 classes have fewer than 2 cells.*'Platelet'") as error:
        stratified_splits(labels, 1, 0.3, 0, class_names=["T", "Platelet", "B"])
    assert error.value.options == {"min_cells_per_class": 2}


def test_stratified_splits_too_few_validation_cells_is_user_error():
    labels = np.repeat([0, 1, 2, 3], 2)
    with pytest.raises(UserError, match="cannot split 8 cells of 4 classes"):
        stratified_splits(labels, 1, 0.1, 0)


# ---------------------------------------------------------------------------------------------------------
# Property: any small AnnData either loads cleanly or raises UserError


@st.composite
def small_anndata(draw):
    """Mostly clean data, sometimes with one bad value, duplicated genes or empty labels."""
    n_cells, n_genes = draw(st.integers(0, 6)), draw(st.integers(0, 6))
    dtype = draw(st.sampled_from([np.float32, np.float64, np.int32, np.int64]))
    integer = np.dtype(dtype).kind == "i"
    elements = st.integers(0, draw(st.sampled_from([8, 100]))) if integer else st.floats(0, 8, width=32)
    x = draw(hnp.arrays(dtype, (n_cells, n_genes), elements=elements))
    bad_value = draw(st.sampled_from([None, np.nan, np.inf, -1.5, 45.0, 45.5]))
    if bad_value is not None and x.size and not (integer and not np.isfinite(bad_value)):
        x.flat[draw(st.integers(0, x.size - 1))] = bad_value
    if draw(st.booleans()):
        x = sp.csr_matrix(x)
    unique_genes = draw(st.integers(0, 3)) > 0
    genes = draw(st.lists(st.sampled_from("abcdefgh"), min_size=n_genes, max_size=n_genes, unique=unique_genes))
    labels = draw(st.lists(st.sampled_from(["T", "T", "B", "", " ", None]), min_size=n_cells, max_size=n_cells))
    adata = make_adata(x, genes=genes, labels=labels)
    if draw(st.booleans()):
        adata.raw = adata.copy()
    return adata


@pytest.mark.filterwarnings("ignore")
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    adata=small_anndata(),
    label_key=st.sampled_from(["cell_type", "other", None]),
    use_raw=st.booleans(),
    normalize=st.booleans(),
    require_labels=st.booleans(),
    min_cells=st.integers(0, 3),
)
def test_any_small_anndata_loads_or_raises_user_error(
    adata, label_key, use_raw, normalize, require_labels, min_cells
):
    before = adata.X.copy()
    try:
        data = dataset_from_anndata(
            adata,
            label_key=label_key,
            use_raw=use_raw,
            normalize=normalize,
            require_labels=require_labels,
            min_cells_per_class=min_cells,
        )
    except UserError as e:
        assert "\n" not in str(e)
    else:
        assert isinstance(data.matrix, sp.csr_matrix) and data.matrix.dtype == np.float32
        assert data.matrix.shape == (len(data.cell_ids), len(data.genes))
        values = data.matrix.data
        assert np.isfinite(values).all() and (values >= 0).all() and (values <= 30).all()
        if data.labels is not None:
            assert len(data.labels) == data.matrix.shape[0]
            assert all(label.strip() for label in data.labels)
    after = adata.X
    if sp.issparse(before):
        before, after = before.toarray(), after.toarray()
    np.testing.assert_array_equal(after, before)  # never modified (NaNs compare equal here)
