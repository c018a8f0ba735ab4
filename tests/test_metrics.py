"""Tests for the metrics and shared helpers of utils.py."""

import json
import math
import os

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_recall_fscore_support,
    roc_auc_score,
)

from utils import (
    UserError,
    accuracy_at_coverage,
    atomic_write,
    call_weights,
    classification_metrics,
    expected_calibration_error,
    misclassification_auroc,
    read_json,
    reliability_bins,
    uncertainty_summary,
    write_json,
)


def random_probs(n_cells=60, n_classes=4, seed=0):
    """Softmax of random logits plus labels that agree with the argmax about half the time."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=2.0, size=(n_cells, n_classes))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = np.where(rng.random(n_cells) < 0.5, probs.argmax(axis=1), rng.integers(0, n_classes, n_cells))
    return probs, labels


# ---------------------------------------------------------------------------------------------------------
# Calibration


def test_ece_matches_worked_example():
    probs = np.array([[0.55, 0.45], [0.42, 0.58], [0.90, 0.10], [0.0, 1.0]])
    labels = np.array([0, 0, 0, 1])
    # Confidences 0.55 (right), 0.58 (wrong), 0.90 (right), 1.0 (right); 15 bins of width 1/15.
    # Bin (8/15, 9/15] = (0.533, 0.6]: 2 cells, accuracy 1/2, confidence (0.55 + 0.58) / 2 = 0.565 -> gap 0.065
    # Bin (13/15, 14/15] = (0.867, 0.933]: 1 cell, accuracy 1, confidence 0.9 -> gap 0.1
    # Bin (14/15, 1]: 1 cell, accuracy 1, confidence 1.0 -> gap 0
    # ECE = 2/4 * 0.065 + 1/4 * 0.1 + 1/4 * 0 = 0.0325 + 0.025 = 0.0575
    assert expected_calibration_error(probs, labels) == pytest.approx(0.0575)


def test_reliability_bins_are_right_inclusive_and_zero_goes_first():
    # 4 bins: (0, .25], (.25, .5], (.5, .75], (.75, 1]; a 0 confidence belongs to the first bin.
    probs = np.array([[0.5, 0.5, 0.0], [0.75, 0.25, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    bins = reliability_bins(probs, np.array([0, 1, 0, 0]), n_bins=4)
    assert bins["count"].tolist() == [1, 1, 1, 1]
    np.testing.assert_allclose(bins["confidence"], [0.0, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(bins["accuracy"], [1.0, 1.0, 0.0, 1.0])
    np.testing.assert_allclose(bins["edges"], [0, 0.25, 0.5, 0.75, 1.0])


def test_reliability_bins_mark_empty_bins_nan():
    bins = reliability_bins(np.array([[0.9, 0.1]]), np.array([0]), n_bins=5)
    assert bins["count"].tolist() == [0, 0, 0, 0, 1]
    assert np.isnan(bins["accuracy"][:4]).all() and bins["accuracy"][4] == 1.0


# ---------------------------------------------------------------------------------------------------------
# classification_metrics


def test_classification_metrics_agree_with_sklearn():
    probs, labels = random_probs()
    names = ["B", "T", "NK", "Mono"]
    metrics = classification_metrics(probs, labels, names)
    pred = probs.argmax(axis=1)
    assert metrics["n_cells"] == 60
    assert metrics["accuracy"] == pytest.approx(accuracy_score(labels, pred))
    assert metrics["macro_f1"] == pytest.approx(f1_score(labels, pred, average="macro"))
    assert metrics["weighted_f1"] == pytest.approx(f1_score(labels, pred, average="weighted"))
    precision, recall, f1, support = precision_recall_fscore_support(labels, pred, labels=[0, 1, 2, 3])
    for i, name in enumerate(names):
        assert metrics["per_class"][name] == pytest.approx(
            {"precision": precision[i], "recall": recall[i], "f1": f1[i], "support": support[i]}
        )
    assert metrics["confusion_matrix"] == confusion_matrix(labels, pred).tolist()
    assert metrics["nll"] == pytest.approx(log_loss(labels, probs, labels=[0, 1, 2, 3]))
    assert metrics["ece"] == pytest.approx(expected_calibration_error(probs, labels))


def test_classification_metrics_are_plain_json():
    probs, labels = random_probs(n_cells=10, n_classes=3)
    metrics = classification_metrics(probs, labels, ["a", "b", "c"])
    assert json.loads(json.dumps(metrics)) == metrics
    assert type(metrics["accuracy"]) is float and type(metrics["per_class"]["a"]["support"]) is int
    assert type(metrics["confusion_matrix"][0][0]) is int


def test_brier_and_nll_by_hand():
    probs = np.array([[0.7, 0.3], [0.2, 0.8]])
    labels = np.array([0, 0])
    metrics = classification_metrics(probs, labels, ["x", "y"])
    # Brier: cell 0 (0.7-1)^2 + 0.3^2 = 0.18; cell 1 (0.2-1)^2 + 0.8^2 = 1.28; mean 0.73
    assert metrics["brier"] == pytest.approx(0.73)
    assert metrics["nll"] == pytest.approx(-(math.log(0.7) + math.log(0.2)) / 2)


def test_nll_clips_zero_probability():
    metrics = classification_metrics(np.array([[1.0, 0.0]]), np.array([1]), ["x", "y"])
    assert metrics["nll"] == pytest.approx(-math.log(1e-12))


# ---------------------------------------------------------------------------------------------------------
# Uncertainty


def test_identical_samples_have_no_mutual_information():
    probs, _ = random_probs(n_cells=5, n_classes=3)
    summary = uncertainty_summary(np.stack([probs] * 4))  # (S=4, N=5, C=3)
    np.testing.assert_allclose(summary["mutual_info"], 0.0, atol=1e-12)
    np.testing.assert_allclose(summary["entropy"], summary["expected_entropy"])
    np.testing.assert_allclose(summary["mean_probs"], probs)
    np.testing.assert_allclose(summary["pred_std"], 0.0, atol=1e-12)
    assert summary["pred"].tolist() == probs.argmax(axis=1).tolist()
    np.testing.assert_allclose(summary["confidence"], probs.max(axis=1))


def test_disagreeing_one_hot_samples_are_purely_epistemic():
    samples = np.array([[[1.0, 0.0]], [[0.0, 1.0]], [[1.0, 0.0]], [[0.0, 1.0]]])  # (S=4, N=1, C=2)
    summary = uncertainty_summary(samples)
    assert summary["entropy"][0] == pytest.approx(math.log(2))
    assert summary["expected_entropy"][0] == pytest.approx(0.0)
    assert summary["mutual_info"][0] == pytest.approx(math.log(2))
    assert summary["pred_std"][0] == pytest.approx(0.5)


def test_uncertainty_summary_rejects_2d_input():
    with pytest.raises(ValueError, match="samples, cells, classes"):
        uncertainty_summary(np.ones((3, 2)) / 2)


def test_misclassification_auroc_matches_sklearn():
    rng = np.random.default_rng(1)
    score = rng.random(40)
    correct = rng.random(40) < 0.6
    assert misclassification_auroc(score, correct) == pytest.approx(roc_auc_score(~correct, score))


def test_misclassification_auroc_is_nan_with_one_class():
    assert math.isnan(misclassification_auroc(np.array([0.1, 0.2]), np.array([True, True])))
    assert math.isnan(misclassification_auroc(np.array([0.1, 0.2]), np.array([False, False])))


def test_accuracy_at_coverage_by_hand():
    score = np.array([0.1, 0.9, 0.2, 0.8, 0.3, 0.4, 0.5, 0.6, 0.7, 0.05])
    correct = np.array([1, 0, 1, 0, 1, 1, 1, 0, 1, 1], dtype=bool)
    # Most certain first: cells 9, 0, 2, 4, 5, 6, 7, 8, 3, 1 -> correct T T T T T T F T F F
    # 100%: 7/10; 90% keeps 9 cells: 7/9; 80%: 7/8; 70% keeps 7 (not 8, despite 0.7 * 10 = 7.000000000000001): 6/7;
    # 50%: 5/5; 5% keeps ceil(0.5) = 1 cell: 1/1
    result = accuracy_at_coverage(score, correct, coverages=(1.0, 0.9, 0.8, 0.7, 0.5, 0.05))
    assert result == pytest.approx(
        {"1.0": 0.7, "0.9": 7 / 9, "0.8": 7 / 8, "0.7": 6 / 7, "0.5": 1.0, "0.05": 1.0}
    )
    assert list(accuracy_at_coverage(score, correct)) == ["1.0", "0.9", "0.8", "0.7", "0.5"]


# ---------------------------------------------------------------------------------------------------------
# Shared helpers


def test_atomic_write_keeps_old_file_on_error_and_leaves_no_temp(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="disk on fire"), atomic_write(path) as f:
        f.write("new, half written")
        raise RuntimeError("disk on fire")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["metrics.json"]


def test_atomic_write_replaces_text_and_binary(tmp_path):
    path = tmp_path / "out.bin"
    path.write_text("old")
    with atomic_write(path, "wb") as f:
        f.write(b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    with atomic_write(path) as f:
        f.write("héllo")
    assert path.read_text(encoding="utf-8") == "héllo"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_write_json_roundtrip_sorted_with_numpy_values(tmp_path):
    path = tmp_path / "m.json"
    write_json(path, {"b": np.float32(0.5), "a": np.arange(2), "c": np.int64(3)})
    assert read_json(path) == {"a": [0, 1], "b": 0.5, "c": 3}
    assert path.read_text().index('"a"') < path.read_text().index('"b"')


def test_read_json_errors_are_user_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="bad.json is not valid JSON"):
        read_json(bad)
    with pytest.raises(UserError, match="not found"):
        read_json(tmp_path / "missing.json")




def test_call_weights_favour_rare_types_and_vanish_without_counts_or_balance():
    assert call_weights(None, 0.75) is None and call_weights([5, 5], 0.0) is None
    np.testing.assert_allclose(call_weights([90, 10], 1.0), [1 / 0.9, 1 / 0.1])
    np.testing.assert_allclose(call_weights([90, 10], 0.5), [0.9**-0.5, 0.1**-0.5])
    assert np.isfinite(call_weights([10, 0], 1.0)).all()  # a type without training cells
    probs = np.array([[[0.55, 0.45], [0.95, 0.05]]])  # (S=1, N=2, C=2)
    summary = uncertainty_summary(probs, weights=call_weights([90, 10], 0.75))
    assert summary["pred"].tolist() == [1, 0]  # 0.45 · 0.1^-0.75 > 0.55 · 0.9^-0.75; 0.05 · 5.6 < 0.95 · 1.08
    np.testing.assert_allclose(summary["confidence"], [0.45, 0.95])  # the probability of the call
    assert uncertainty_summary(probs)["pred"].tolist() == [0, 0]


def test_classification_metrics_score_given_calls_and_keep_probability_scores():
    probs = np.array([[0.6, 0.4], [0.3, 0.7], [0.55, 0.45]])
    labels = np.array([1, 1, 0])
    plain = classification_metrics(probs, labels, ["a", "b"])
    called = classification_metrics(probs, labels, ["a", "b"], pred=np.array([1, 1, 0]))
    assert plain["accuracy"] == pytest.approx(2 / 3) and called["accuracy"] == 1.0
    for key in ("nll", "ece", "brier"):
        assert called[key] == plain[key]
