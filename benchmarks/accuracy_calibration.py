"""Accuracy and calibration on the bundled PBMC data: logistic regression vs Stage A vs Stage B vs pruned round 2.

Five stratified 80/20 splits (StratifiedShuffleSplit, one split per seed). On each, logistic regression is fit
on the same log-normalized matrix, and the model is trained with `finetune_sparse` on the 80 % (which holds out
its own validation cells for early stopping): Stage A (deterministic), Stage B (Bayesian head, from Stage A)
and round 2 (progressive pruning of Stage B). Every method then predicts the 20 % test cells.

    python -m benchmarks.accuracy_calibration            # demo configuration, 5 splits
    python -m benchmarks.accuracy_calibration --smoke
"""

from __future__ import annotations

import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedShuffleSplit

from benchmarks.common import Report, mean_std, parse_config
from benchmarks.training import (
    DEMO,
    SMOKE_TRAINING,
    entropy_scores,
    evaluate,
    load_pbmc,
    predict,
    prune_round2,
    train_stage_a,
    train_stage_b,
    write_h5ad,
)
from utils import reliability_bins

NAME = "accuracy_calibration"
METHODS = ("logistic_regression", "stage_a", "stage_b", "round2_pruned")
LABELS = {"logistic_regression": "logistic regression", "stage_a": "Stage A (deterministic)",
          "stage_b": "Stage B (Bayesian, MC)", "round2_pruned": "round 2 (pruned, MC)"}
METRICS = ("accuracy", "macro_f1", "ece", "nll", "misclf_auroc_one_minus_confidence", "misclf_auroc_entropy",
           "misclf_auroc_mutual_info")
REAL = DEMO | dict(seeds=[2021, 2022, 2023, 2024, 2025], test_size=0.2, lr_max_iter=2000, lr_c=1.0, work_dir="")
SMOKE = SMOKE_TRAINING | dict(seeds=[2021, 2022], test_size=0.2, lr_max_iter=2000, lr_c=1.0, work_dir="")


def logistic_regression(config: dict, x_train, y_train, x_test) -> tuple[np.ndarray, list[str], dict]:
    model = LogisticRegression(max_iter=config["lr_max_iter"], C=config["lr_c"])
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(x_train, y_train)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    info = {"seconds": time.perf_counter() - started, "converged": converged, "n_iter": int(np.max(model.n_iter_))}
    return model.predict_proba(x_test), [str(c) for c in model.classes_], info


def run_split(config: dict, data, seed: int, work: Path) -> tuple[dict, dict]:
    """All four methods on one split: (metrics per method, test probabilities per method for the plot)."""
    splitter = StratifiedShuffleSplit(n_splits=1, test_size=config["test_size"], random_state=seed)
    train, test = next(splitter.split(np.zeros(len(data.labels)), data.labels))
    work.mkdir(parents=True, exist_ok=True)
    train_path = write_h5ad(data, train, work / "train.h5ad")
    labels = data.labels[test]
    results, probs = {}, {}

    lr_probs, lr_classes, info = logistic_regression(config, data.matrix[train], data.labels[train], data.matrix[test])
    results["logistic_regression"] = evaluate(lr_probs, labels, lr_classes, entropy_scores(lr_probs)) | info
    probs["logistic_regression"] = (lr_probs, labels, lr_classes)

    stage_a = train_stage_a(config, train_path, work, seed)
    stage_b = train_stage_b(config, train_path, work, seed, stage_a["checkpoint"])
    round2 = prune_round2(config, train_path, work, seed, stage_b["checkpoint"])
    for method, run in (("stage_a", stage_a), ("stage_b", stage_b), ("round2_pruned", round2)):
        prediction = predict(run["checkpoint"], data, test, config["mc_samples"], seed)
        scores = prediction.scores()
        if prediction.samples.shape[0] == 1:
            scores.pop("mutual_info")  # zero for a deterministic model: not a score
        results[method] = evaluate(prediction.mean, labels, prediction.classes, scores) | {
            "seconds": run["seconds"], "prune_amount": run["folds"][0]["prune_amount"],
            "head_sparsity": run["folds"][0]["head_sparsity"], "total_params": run["folds"][0]["total_params"],
            "mc_samples": int(prediction.samples.shape[0]),
        }
        probs[method] = (prediction.mean, labels, prediction.classes)
    return results, probs


def reliability_figure(pooled: dict) -> Figure:
    figure = Figure(figsize=(4.5, 4.2))
    ax = figure.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8)
    for method in METHODS:
        probs = np.concatenate([p for p, _, _ in pooled[method]])
        codes = np.concatenate([np.searchsorted(classes, labels) for _, labels, classes in pooled[method]])
        bins = reliability_bins(probs, codes, n_bins=10)
        filled = bins["count"] > 0
        ax.plot(bins["confidence"][filled], bins["accuracy"][filled], marker="o", label=LABELS[method])
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("confidence (max probability)")
    ax.set_ylabel("accuracy")
    ax.set_title("reliability on the test cells, pooled over splits", fontsize=9)
    ax.legend(fontsize=7)
    figure.tight_layout()
    return figure


def main(argv: list[str] | None = None) -> int:
    config, args = parse_config(__doc__.splitlines()[0], REAL, SMOKE, argv)
    report = Report(NAME, "Accuracy and calibration on PBMC (5 stratified 80/20 splits)", config, args.out_dir)
    data = load_pbmc(config)
    per_split: dict[str, list[dict]] = {method: [] for method in METHODS}
    pooled: dict[str, list] = {method: [] for method in METHODS}
    with tempfile.TemporaryDirectory(prefix="bench_acc_") as temporary:
        root = Path(config["work_dir"] or temporary)
        for seed in config["seeds"]:
            results, probs = run_split(config, data, seed, root / f"split_{seed}")
            for method in METHODS:
                per_split[method].append(results[method] | {"seed": seed})
                pooled[method].append(probs[method])
            print(f"  split {seed}: " + ", ".join(f"{m} F1 {results[m]['macro_f1']:.3f} ECE {results[m]['ece']:.3f}"
                                                for m in METHODS))
    summary = {method: {metric: mean_std([r.get(metric, float("nan")) for r in rows]) for metric in METRICS}
               for method, rows in per_split.items()}
    for method in ("stage_a", "stage_b", "round2_pruned"):
        summary[method]["train_seconds"] = mean_std([r["seconds"] for r in per_split[method]])
    summary["round2_pruned"]["prune_amount"] = mean_std([r["prune_amount"] for r in per_split["round2_pruned"]])
    summary["round2_pruned"]["head_sparsity"] = mean_std([r["head_sparsity"] for r in per_split["round2_pruned"]])
    report.results = {"data": {"cells": len(data.labels), "genes": len(data.genes),
                               "classes": sorted(set(data.labels.tolist()))},
                      "summary": summary, "per_split": per_split}
    report.table(
        f"Test-set metrics, mean ± std over {len(config['seeds'])} splits (misclassification AUROC: higher = the "
        "score ranks errors first)",
        ["method", "accuracy", "macro-F1", "ECE", "NLL", "AUROC 1−conf", "AUROC entropy", "AUROC MI"],
        [[LABELS[m]] + [summary[m][k] for k in METRICS] for m in METHODS],
    )
    lr_f1, b_f1 = summary["logistic_regression"]["macro_f1"]["mean"], summary["stage_b"]["macro_f1"]["mean"]
    a_ece, b_ece = summary["stage_a"]["ece"]["mean"], summary["stage_b"]["ece"]["mean"]
    wins = sum(b["macro_f1"] >= lr["macro_f1"] for b, lr in zip(per_split["stage_b"], per_split["logistic_regression"]))
    report.add_target("Stage B macro-F1 ≥ logistic regression's", b_f1 >= lr_f1,
                      f"{b_f1:.3f} vs {lr_f1:.3f} (mean; Stage B ≥ LR on {wins} of {len(config['seeds'])} splits)")
    lower = sum(b["ece"] <= a["ece"] for b, a in zip(per_split["stage_b"], per_split["stage_a"]))
    report.add_target("Stage B ECE ≤ Stage A ECE", b_ece <= a_ece,
                      f"{b_ece:.3f} vs {a_ece:.3f} (mean; lower or equal on {lower} of {len(config['seeds'])} splits)")
    converged = all(r["converged"] for r in per_split["logistic_regression"])
    report.notes += [
        f"{len(data.labels)} cells, {len(data.genes)} genes, {len(set(data.labels.tolist()))} cell types; splits: "
        f"StratifiedShuffleSplit(test_size={config['test_size']}, random_state=seed) for seeds {config['seeds']}.",
        f"Logistic regression: LogisticRegression(max_iter={config['lr_max_iter']}, C={config['lr_c']}) on the "
        f"log-normalized matrix; converged on every split: {converged}.",
        f"Stage B and round 2 average {config['mc_samples']} head samples (predict_proba_samples); Stage A is one "
        "deterministic forward, so it has no mutual information.",
        "Round 2 prunes fc1/fc2 rows progressively up to prune_target in prune_step steps, stopping when validation "
        f"macro-F1 drops > 0.01; mean level reached {summary['round2_pruned']['prune_amount']['mean']:.2f}, "
        f"fc1+fc2 sparsity {summary['round2_pruned']['head_sparsity']['mean']:.2f}.",
    ]
    report.save_figure(reliability_figure(pooled), "reliability")
    report.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
