"""Memory and time of fitting a fold's novelty statistics at scBERT's gene count: every training cell at once, or
a subset for the principal axes and the rest in blocks (what finetune_sparse.fold_novelty does).

The Mahalanobis view's statistics are fitted on the head's gene features, one value per gene and cell (16,906
genes for scBERT's gene list). Holding every training cell's features at once costs cells x genes x 4 bytes
(3.7 GB for Zheng68K's 55,000 training cells of a 5-fold split) before the float64 work on them; the fold's way
fits the axes on NOVELTY_NEIGHBOURS random cells and projects the others BLOCK_CELLS at a time, so its peak
should not grow with the training set. Each point runs `novelty.fit_novelty` in a fresh
process on random float32 features (the cost does not depend on their values) and 10 classes; the encoder that
produces the features in training is not part of it (benchmarks/memory.py measures the encoder).

    python -m benchmarks.novelty_fit            # 5,000, 20,000 and 40,000 training cells, 16,906 genes
    python -m benchmarks.novelty_fit --smoke
"""

from __future__ import annotations

import json
import sys
import tempfile
import time

import numpy as np

from benchmarks.common import (
    ROOT,
    Report,
    emit_worker_result,
    parse_config,
    reset_peak_rss,
    rss_mb,
    run_worker,
    thread_env,
)
from finetune_sparse import BLOCK_CELLS, NOVELTY_NEIGHBOURS

NAME = "novelty_fit"
WAYS = ("at_once", "blocked")
LABELS = {"at_once": "every training cell at once", "blocked": "axes on a subset, the rest in blocks"}
REAL = dict(cells=[5000, 20000, 40000], genes=16906, classes=10, axis_cells=NOVELTY_NEIGHBOURS, block_cells=BLOCK_CELLS,
            seed=0, growth_target=1.25, worker_timeout_s=1200)
SMOKE = REAL | dict(cells=[300, 600], genes=200, axis_cells=100, block_cells=64, worker_timeout_s=120)


def measure(way: str, spec: dict) -> dict:
    """Peak extra resident memory and wall time of one fit, features included (they are made as training makes
    them: all before the fit, or block by block during it)."""
    from novelty import fit_novelty

    rng = np.random.default_rng(spec["seed"])
    cells, genes = spec["cells"], spec["genes"]
    labels = rng.integers(0, spec["classes"], cells)

    def features(rows: slice) -> np.ndarray:
        return rng.standard_normal((len(labels[rows]), genes), dtype=np.float32)

    exact_reset = reset_peak_rss()
    before = rss_mb()
    start = time.perf_counter()
    if way == "at_once":
        fit_novelty(features(slice(None)), labels)
    else:
        axes = slice(0, min(spec["axis_cells"], cells))
        rest = range(axes.stop, cells, spec["block_cells"])
        fit_novelty(features(axes), labels[axes],
                    more=((features(slice(s, s + spec["block_cells"])), labels[s : s + spec["block_cells"]]) for s in rest))
    seconds = time.perf_counter() - start
    after = rss_mb()
    return {"way": way, "cells": cells, "genes": genes, "seconds": seconds, "peak_reset": exact_reset,
            "peak_extra_mb": after["VmHWM"] - (before["VmRSS"] if exact_reset else before["VmHWM"]),
            "features_mb": cells * genes * 4 / 2**20}


def run_point(way: str, spec: dict, timeout: float) -> dict:
    command = [sys.executable, "-m", "benchmarks.novelty_fit", "--worker", way, json.dumps(spec)]
    with tempfile.TemporaryDirectory(prefix="bench_novelty_fit_") as cwd:
        return run_worker(command, env=thread_env(spec["threads"], pythonpath=str(ROOT)), cwd=cwd, timeout=timeout)


def figure_of(rows: list[dict]):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 3.6))
    for index, (key, label) in enumerate((("peak_extra_mb", "peak extra memory (MiB)"), ("seconds", "time (s)"))):
        ax = figure.add_subplot(1, 2, index + 1)
        for way in WAYS:
            points = [r for r in rows if r["way"] == way]
            ax.plot([r["cells"] for r in points], [r[key] for r in points], marker="o", label=LABELS[way])
        ax.set_xlabel("training cells")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    figure.suptitle(f"fit_novelty on {rows[0]['genes']:,} gene features per cell", fontsize=9)
    figure.tight_layout()
    return figure


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        emit_worker_result(measure(argv[1], json.loads(argv[2])))
        return 0
    config, args = parse_config(__doc__.splitlines()[0], REAL, SMOKE, argv)
    report = Report(NAME, "Novelty statistics: fitting memory and time at scBERT's gene count (CPU)", config,
                    args.out_dir)
    base = {k: config[k] for k in ("genes", "classes", "axis_cells", "block_cells", "seed", "threads")}
    rows = []
    for cells in config["cells"]:
        for way in WAYS:
            rows.append(run_point(way, base | {"cells": cells}, config["worker_timeout_s"]))
            print(f"  {way:>8} {cells:>6} cells: +{rows[-1]['peak_extra_mb']:.0f} MiB, {rows[-1]['seconds']:.1f} s", flush=True)
    report.results = {"points": rows}
    report.table("Peak extra memory (MiB) and time (s) of one fit, the features included",
                 ["training cells", "way", "features (MiB, float32)", "peak extra MiB", "s"],
                 [[r["cells"], LABELS[r["way"]], r["features_mb"], r["peak_extra_mb"], r["seconds"]] for r in rows])
    blocked = [r for r in rows if r["way"] == "blocked"]
    growth = blocked[-1]["peak_extra_mb"] / blocked[0]["peak_extra_mb"]
    at_once = next(r for r in rows if r["way"] == "at_once" and r["cells"] == blocked[-1]["cells"])
    report.add_target(f"the blocked fit's peak memory ≤ {config['growth_target']}x from {blocked[0]['cells']:,} to "
                      f"{blocked[-1]['cells']:,} training cells", growth <= config["growth_target"],
                      f"{growth:.2f}x ({blocked[0]['peak_extra_mb']:.0f} → {blocked[-1]['peak_extra_mb']:.0f} MiB; every "
                      f"cell at once: {at_once['peak_extra_mb']:.0f} MiB)")
    report.notes += [
        f"Axes on {config['axis_cells']:,} cells (finetune_sparse.NOVELTY_NEIGHBOURS), the rest {config['block_cells']:,} "
        "at a time (finetune_sparse.BLOCK_CELLS); up to that many cells both ways give the same statistics.",
        "Not included: the input view's neighbour index, fitted on the same cells' expression bins (int16, then one "
        "float64 copy: 889 MiB peak measured at 5,000 cells and 16,906 genes, whatever the training set's size).",
        "Peak extra memory = resident-set high-water mark of a fresh process during the fit minus its resident memory "
        "before it (kernel counter reset via /proc/self/clear_refs).",
    ]
    report.save_figure(figure_of(rows), "memory_time")
    report.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
