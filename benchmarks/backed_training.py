"""Training from a file larger than memory: one epoch from the .h5ad on disk (--backed) versus in memory.

The benchmark writes a `cells`-cell file: cells drawn with replacement from the bundled 700 PBMC cells (765 genes,
log-normalized), each non-zero value multiplied by exp(N(0, noise)) so no two cells are equal. Each measurement
runs in a fresh process, in memory (the default reader) and with --backed:

- the data path of a run on the whole file: reading and checking it, the fingerprint, the quantile cut points and
  one shuffled epoch of token batches (the training split, as the training loop's loader draws them), no model;
- a training run of a tiny model (dim 16, depth 1, --cv_splits 1, --epoch 1, no pruning) on the first
  `train_cells` cells (a file of its own): peak memory over the whole run and the seconds of its training epoch.

A last table compares the two ways of reading one shuffled batch from the file: this project's reader (row pointers
in memory, one read per run of adjacent rows) and anndata's backed csr slicing.

    python -m benchmarks.backed_training          # 100,000 cells
    python -m benchmarks.backed_training --smoke
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import (
    ROOT,
    Report,
    emit_worker_result,
    parse_config,
    reset_peak_rss,
    rss_mb,
    run_worker,
    set_threads,
    thread_env,
    time_call,
)

NAME = "backed_training"
MODES = ("memory", "backed")
REAL = dict(cells=100_000, train_cells=100_000, noise=0.1, dim=16, depth=1, heads=2, dim_head=8, h_dim=16,
            batch_size=64, read_batches=200, seed=0, worker_timeout_s=3600)
SMOKE = REAL | dict(cells=600, train_cells=600, read_batches=5, worker_timeout_s=120)


# --------------------------------------------------------------------------------------------------------------
# The data file
# --------------------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------------------
# Worker: one training run in a fresh interpreter
# --------------------------------------------------------------------------------------------------------------


def run_config(mode: str, spec: dict):
    import finetune_sparse

    return finetune_sparse.default_config(
        data_path=spec["data"], ckpt_dir=spec["run_dir"], label_key="cell_type", dim=spec["dim"], depth=spec["depth"],
        heads=spec["heads"], dim_head=spec["dim_head"], h_dim=spec["h_dim"], batch_size=spec["batch_size"], epoch=1,
        cv_splits=1, prune_target=0.0, device="cpu", seed=spec["seed"], verbose=False, backed=mode == "backed")


def data_epoch(mode: str, spec: dict) -> dict:
    """The data path of a run without the model: read and check, fingerprint, cut points, one epoch of batches."""
    from torch.utils.data import DataLoader, RandomSampler, Subset

    import finetune_sparse
    from backed_dataset import binned_dataset
    from run_manifest import data_fingerprint
    from utils import collate_batch, stratified_splits

    exact_reset = reset_peak_rss()
    before = rss_mb()
    start = time.perf_counter()
    config = run_config(mode, spec)
    sources = finetune_sparse.read_sources(config)
    config = finetune_sparse.adopt_checkpoint_binning(config, sources[0])
    data, labels, classes = finetune_sparse.read_data(config, sources, None)
    data_fingerprint(data.matrix, data.cell_ids, data.genes, labels)
    binning = finetune_sparse.run_binning(config, sources[0], data.matrix)
    prepared = time.perf_counter()
    train_idx, _ = stratified_splits(labels, 1, test_size=0.2, seed=config.seed, class_names=classes)[0]
    dataset = Subset(binned_dataset(data.matrix, binning, np.arange(len(labels))), train_idx)
    loader = DataLoader(dataset, batch_size=config.batch_size, collate_fn=collate_batch,
                        sampler=RandomSampler(dataset, generator=torch.Generator().manual_seed(0)))
    tokens = sum(int(batch.tokens.shape[0]) for batch in loader)
    end = time.perf_counter()
    after = rss_mb()
    return {"mode": mode, "prepare_s": prepared - start, "epoch_s": end - prepared, "cells": tokens,
            "peak_rss_mb": after["VmHWM"], "peak_extra_mb": after["VmHWM"] - before["VmRSS"], "peak_reset": exact_reset}


def train_once(mode: str, spec: dict) -> dict:
    """One run of finetune_sparse on the file: peak resident memory over the run, seconds of its training epoch."""
    import finetune_sparse

    epoch_seconds = []
    train_epoch = finetune_sparse.train_epoch

    def timed_epoch(*args, **kwargs):
        start = time.perf_counter()
        row = train_epoch(*args, **kwargs)
        epoch_seconds.append(time.perf_counter() - start)
        return row

    finetune_sparse.train_epoch = timed_epoch  # this process only: the loop itself is what is measured
    config = run_config(mode, spec)
    exact_reset = reset_peak_rss()
    before = rss_mb()
    start = time.perf_counter()
    summary = finetune_sparse.run(config)
    wall = time.perf_counter() - start
    after = rss_mb()
    return {"mode": mode, "epoch_s": epoch_seconds[0], "run_s": wall, "peak_rss_mb": after["VmHWM"],
            "rss_before_mb": before["VmRSS"], "peak_extra_mb": after["VmHWM"] - before["VmRSS"],
            "peak_reset": exact_reset, "accuracy": summary["accuracy"]["mean"]}


WORKERS = {"data": data_epoch, "train": train_once}


def run_mode(worker: str, mode: str, spec: dict, timeout: float) -> dict:
    command = [sys.executable, "-m", "benchmarks.backed_training", "--worker", worker, mode, json.dumps(spec)]
    return run_worker(command, env=thread_env(spec["threads"], pythonpath=str(ROOT)), cwd=ROOT, timeout=timeout)


# --------------------------------------------------------------------------------------------------------------
# Reading a shuffled batch: ours versus anndata's backed slicing
# --------------------------------------------------------------------------------------------------------------


def batch_reads(path: Path, batches: int, batch_size: int, seed: int) -> list[dict]:
    import h5py
    from anndata.io import sparse_dataset

    from backed_dataset import BackedMatrix

    ours = BackedMatrix.open(path, "X")
    cells = ours.shape[0]
    rng = np.random.default_rng(seed)
    draws = [np.sort(rng.choice(cells, batch_size, replace=False)) for _ in range(batches)]
    with h5py.File(path, "r") as file:
        theirs = sparse_dataset(file["X"])
        readers = {"ours (row pointers, adjacent rows in one read)": lambda rows: ours[rows],
                   "anndata sparse_dataset[rows]": lambda rows: theirs[rows]}
        results = []
        for name, read in readers.items():
            timing = time_call(lambda read=read: [read(rows) for rows in draws], warmup=1, repeats=3)
            results.append({"reader": name, "ms_per_batch": 1000 * timing["median_s"] / batches})
    return results


# --------------------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------------------


def figure_of(rows: list[dict]):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 3.2))
    for index, (key, label) in enumerate((("peak_rss_mb", "peak resident memory (MB)"),
                                          ("epoch_s", "seconds per training epoch"))):
        ax = figure.add_subplot(1, 2, index + 1)
        ax.bar([r["mode"] for r in rows], [r[key] for r in rows], color=["tab:blue", "tab:orange"])
        ax.set_ylabel(label)
    figure.suptitle("One epoch of a tiny model: matrix in memory vs read from the file (--backed)", fontsize=9)
    figure.tight_layout()
    return figure


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        spec = json.loads(argv[3])
        set_threads(spec["threads"])
        emit_worker_result(WORKERS[argv[1]](argv[2], spec))
        return 0
    config, args = parse_config(__doc__.splitlines()[0], REAL, SMOKE, argv)
    report = Report(NAME, "Training from the file on disk (--backed) versus in memory (CPU)", config, args.out_dir)
    with tempfile.TemporaryDirectory(prefix="bench_backed_") as scratch:
        spec = {key: config[key] for key in ("dim", "depth", "heads", "dim_head", "h_dim", "batch_size", "seed",
                                             "threads")}
        files = {}
        for name, cells in (("data", config["cells"]), ("train", config["train_cells"])):
            files[name] = Path(scratch) / f"{name}.h5ad"
            from benchmarks.training import write_resampled  # here: the measured workers never import it
            from utils import load_dataset

            written = write_resampled(files[name], load_dataset(None), cells, config["noise"], config["seed"])
            print(f"  wrote {written['cells']} cells, {written['stored_values']} values ({written['file_mb']:.0f} MB)")
            spec_of = spec | {"data": str(files[name])}
            points = []
            for mode in MODES:
                points.append(run_mode(name, mode, spec_of | {"run_dir": str(Path(scratch) / f"{name}_{mode}")},
                                       config["worker_timeout_s"]))
                print(f"  {name} {mode:>6}: {points[-1]['epoch_s']:.1f} s per epoch, peak {points[-1]['peak_rss_mb']:.0f} MB")
            report.results[name] = {"file": written, "points": points}
        reads = batch_reads(files["data"], config["read_batches"], config["batch_size"], config["seed"])
    data_file = report.results["data"]["file"]
    report.table(f"Data path of a run on {data_file['cells']} cells x {data_file['genes']} genes "
                 f"({data_file['stored_values']} stored values, {data_file['file_mb']:.0f} MB file), no model",
                 ["mode", "peak RSS MB", "peak extra MB", "s to read, check, fingerprint, bin", "s / epoch of batches"],
                 [[r["mode"], r["peak_rss_mb"], r["peak_extra_mb"], r["prepare_s"], r["epoch_s"]]
                  for r in report.results["data"]["points"]])
    rows = report.results["train"]["points"]
    memory, backed = rows
    report.results["batch_reads"] = reads
    written = report.results["train"]["file"]
    report.table(f"One training run on {written['cells']} cells x {written['genes']} genes "
                 f"({written['stored_values']} stored values, {written['file_mb']:.0f} MB file)",
                 ["mode", "peak RSS MB", "peak extra MB", "s / epoch", "s / run", "validation accuracy"],
                 [[r["mode"], r["peak_rss_mb"], r["peak_extra_mb"], r["epoch_s"], r["run_s"], r["accuracy"]]
                  for r in rows])
    report.table(f"Reading one sorted batch of {config['batch_size']} random cells",
                 ["reader", "ms / batch"], [[r["reader"], r["ms_per_batch"]] for r in reads])
    data_memory, data_backed = report.results["data"]["points"]
    report.add_target(f"--backed data path at {data_file['cells']} cells: peak extra memory below the in-memory one's",
                      data_backed["peak_extra_mb"] < data_memory["peak_extra_mb"],
                      f"{data_backed['peak_extra_mb']:.0f} MB vs {data_memory['peak_extra_mb']:.0f} MB")
    report.add_target("--backed training run: peak extra memory below the in-memory run's",
                      backed["peak_extra_mb"] < memory["peak_extra_mb"],
                      f"{backed['peak_extra_mb']:.0f} MB vs {memory['peak_extra_mb']:.0f} MB")
    report.add_target("--backed epoch ≤ 1.5x the in-memory epoch", backed["epoch_s"] <= 1.5 * memory["epoch_s"],
                      f"{backed['epoch_s']:.1f} s vs {memory['epoch_s']:.1f} s")
    report.add_target("same validation accuracy both ways", backed["accuracy"] == memory["accuracy"],
                      f"{backed['accuracy']:.4f} vs {memory['accuracy']:.4f}")
    report.notes += [
        "Peak RSS = the run process's resident-set high-water mark (VmHWM); peak extra = VmHWM minus the resident "
        "memory after imports, just before the run (the kernel counter is reset then via /proc/self/clear_refs).",
        "s / epoch = the training epoch alone (finetune_sparse.train_epoch); s / run adds reading, checks, fingerprint, "
        "binning, validation and the novelty statistics.",
        "Both runs use the same file, seed and splits, so their validation accuracy must be equal.",
    ]
    report.save_figure(figure_of(rows), "memory_time")
    report.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
