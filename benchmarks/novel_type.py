"""Flagging an unseen cell type: leave one type out of training, then score how uncertain the model is about it.

For each cell type with enough cells: one stratified 80/20 split of all cells; Stage A + Stage B are trained on
the 80 % without that type; the 20 % held-out cells of the other types plus every cell of the left-out type are
predicted with Monte Carlo samples. Each uncertainty score (1 − confidence, entropy, mutual information) is
judged by its AUROC for separating unseen-type cells (label 1) from known ones, and scBERT's rule (flag a cell
when its confidence is below 0.5) by the share of each group it flags.

    python -m benchmarks.novel_type            # every type with ≥ 30 cells, short demo training
    python -m benchmarks.novel_type --smoke
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import f1_score, roc_auc_score
from sklearn.model_selection import StratifiedShuffleSplit

from benchmarks.common import Report, mean_std, parse_config
from benchmarks.training import (
    DEMO,
    SMOKE_TRAINING,
    UNCERTAINTY_SCORES,
    load_pbmc,
    predict,
    train_stage_a,
    train_stage_b,
    write_h5ad,
)

NAME = "novel_type"
SCORE_LABELS = {"one_minus_confidence": "1 − confidence", "entropy": "entropy", "mutual_info": "mutual information"}
SCBERT_THRESHOLD = 0.5  # scBERT calls a cell "unassigned" when its top probability is below this
REAL = DEMO | dict(epochs_a=10, patience=3, epochs_b=3, seed=2021, test_size=0.2, min_type_cells=30, max_types=0,
                   work_dir="")
SMOKE = SMOKE_TRAINING | dict(seed=2021, test_size=0.2, min_type_cells=25, max_types=2, work_dir="")


def held_out_types(labels: np.ndarray, min_cells: int, max_types: int) -> list[str]:
    """Types with at least `min_cells` cells, largest first (all of them when max_types is 0)."""
    names, counts = np.unique(labels, return_counts=True)
    order = np.argsort(-counts, kind="stable")
    chosen = [str(names[i]) for i in order if counts[i] >= min_cells]
    return chosen[:max_types] if max_types else chosen


def run_type(config: dict, data, left_out: str, train: np.ndarray, test: np.ndarray, work: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    is_left_out = data.labels == left_out
    train_rows = train[~is_left_out[train]]
    eval_rows = np.concatenate([test[~is_left_out[test]], np.flatnonzero(is_left_out)])
    unseen = is_left_out[eval_rows]
    train_path = write_h5ad(data, train_rows, work / "train.h5ad")
    seed = config["seed"]
    stage_a = train_stage_a(config, train_path, work, seed)
    stage_b = train_stage_b(config, train_path, work, seed, stage_a["checkpoint"])
    prediction = predict(stage_b["checkpoint"], data, eval_rows, config["mc_samples"], seed)
    scores = prediction.scores()
    confidence = 1.0 - scores["one_minus_confidence"]
    flagged = confidence < SCBERT_THRESHOLD
    known_pred = np.asarray(prediction.classes)[prediction.mean.argmax(axis=1)][~unseen]
    known_true = data.labels[eval_rows][~unseen]
    return {
        "left_out": left_out,
        "train_cells": int(train_rows.size), "known_eval_cells": int((~unseen).sum()), "unseen_cells": int(unseen.sum()),
        "auroc": {name: float(roc_auc_score(unseen, scores[name])) for name in UNCERTAINTY_SCORES},
        "flagged_unseen": float(flagged[unseen].mean()),
        "flagged_known": float(flagged[~unseen].mean()),
        "known_accuracy": float(np.mean(known_pred == known_true)),
        "known_macro_f1": float(f1_score(known_true, known_pred, average="macro", zero_division=0)),
        "mean_score": {name: {"unseen": float(scores[name][unseen].mean()), "known": float(scores[name][~unseen].mean())}
                       for name in UNCERTAINTY_SCORES},
        "train_seconds": stage_a["seconds"] + stage_b["seconds"],
    }


def auroc_figure(rows: list[dict]) -> Figure:
    figure = Figure(figsize=(max(5, 1.1 * len(rows) + 2), 3.8))
    ax = figure.add_subplot(1, 1, 1)
    width = 0.8 / len(UNCERTAINTY_SCORES)
    for index, name in enumerate(UNCERTAINTY_SCORES):
        xs = [i + (index - 1) * width for i in range(len(rows))]
        ax.bar(xs, [r["auroc"][name] for r in rows], width, label=SCORE_LABELS[name])
    ax.axhline(0.5, linestyle="--", color="grey", linewidth=0.8)
    ax.set_xticks(range(len(rows)), [r["left_out"] for r in rows], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("AUROC, unseen type vs known cells")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    figure.tight_layout()
    return figure


def main(argv: list[str] | None = None) -> int:
    config, args = parse_config(__doc__.splitlines()[0], REAL, SMOKE, argv)
    report = Report(NAME, "Unseen cell type detection (leave one type out)", config, args.out_dir)
    data = load_pbmc(config)
    splitter = StratifiedShuffleSplit(n_splits=1, test_size=config["test_size"], random_state=config["seed"])
    train, test = next(splitter.split(np.zeros(len(data.labels)), data.labels))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_novel_") as temporary:
        root = Path(config["work_dir"] or temporary)
        for index, left_out in enumerate(held_out_types(data.labels, config["min_type_cells"], config["max_types"])):
            rows.append(run_type(config, data, left_out, train, test, root / f"type_{index}"))
            r = rows[-1]
            print(f"  {left_out}: AUROC " + ", ".join(f"{n} {r['auroc'][n]:.3f}" for n in UNCERTAINTY_SCORES)
                  + f"; flagged unseen {r['flagged_unseen']:.2f}, known {r['flagged_known']:.2f}")
    summary = {
        "auroc": {name: mean_std([r["auroc"][name] for r in rows]) for name in UNCERTAINTY_SCORES},
        "flagged_unseen": mean_std([r["flagged_unseen"] for r in rows]),
        "flagged_known": mean_std([r["flagged_known"] for r in rows]),
        "known_macro_f1": mean_std([r["known_macro_f1"] for r in rows]),
    }
    report.results = {"summary": summary, "per_type": rows}
    report.table(
        "Per left-out type: AUROC of each score for flagging the unseen type, and scBERT's rule (confidence < 0.5)",
        ["left-out type", "unseen cells", "known cells", "AUROC 1−conf", "AUROC entropy", "AUROC MI",
         "flagged unseen", "flagged known", "known macro-F1"],
        [[r["left_out"], r["unseen_cells"], r["known_eval_cells"], *(r["auroc"][n] for n in UNCERTAINTY_SCORES),
          r["flagged_unseen"], r["flagged_known"], r["known_macro_f1"]] for r in rows],
    )
    report.table("Mean ± std over left-out types", ["score", "AUROC"],
                 [[SCORE_LABELS[n], summary["auroc"][n]] for n in UNCERTAINTY_SCORES])
    baseline = summary["auroc"]["one_minus_confidence"]["mean"]
    best = max(("entropy", "mutual_info"), key=lambda n: summary["auroc"][n]["mean"])
    beats = {n: sum(r["auroc"][n] > r["auroc"]["one_minus_confidence"] for r in rows) for n in ("entropy", "mutual_info")}
    report.add_target(
        "mutual information or entropy beats scBERT's rule (AUROC vs 1 − confidence)",
        summary["auroc"][best]["mean"] > baseline,
        f"mean AUROC entropy {summary['auroc']['entropy']['mean']:.3f} (higher on {beats['entropy']} of {len(rows)} "
        f"types), MI {summary['auroc']['mutual_info']['mean']:.3f} (higher on {beats['mutual_info']}), "
        f"1 − confidence {baseline:.3f}; scBERT's rule flags {summary['flagged_unseen']['mean']:.0%} of unseen-type "
        f"and {summary['flagged_known']['mean']:.0%} of known cells",
    )
    report.notes += [
        f"Types with ≥ {config['min_type_cells']} cells; one StratifiedShuffleSplit(test_size={config['test_size']}, "
        f"random_state={config['seed']}) shared by all types. Known cells scored: the held-out 20 % of the other "
        "types; unseen cells: every cell of the left-out type.",
        f"Stage A {config['epochs_a']} epochs (patience {config['patience']}) + Stage B {config['epochs_b']} epochs "
        f"(pre-warm {config['pre_warm_epochs']}), {config['mc_samples']} Monte Carlo samples; no pruning.",
        "AUROC of 1 − confidence is the ranking behind scBERT's threshold rule, so it is the baseline the other "
        "scores are compared with.",
    ]
    report.save_figure(auroc_figure(rows), "auroc")
    report.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
