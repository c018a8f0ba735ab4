"""Structured pruning trade-off: test macro-F1, parameters, checkpoint size and head latency per pruning level.

Accuracy: for each of three stratified PBMC splits, one Stage B checkpoint (trained on the 80 %) is pruned to each
level T with finetune_sparse's round 2 (`--epoch 0 --prune_target T --prune_step T`, one fine-tuning pass,
`--prune_f1_tol 1` so every level is kept), in physical and in mask mode, and evaluated on the 20 % test cells.
Level 0 gets the same fine-tuning pass without pruning, so drops compare equally trained models.

Latency: independent of training, a realistic head (dim 200, fc1 512 x genes, fc2 128 x 512, 10 classes, Bayesian)
is pruned the same way and its forward is timed on precomputed encodings (batch, genes+1, 200): the posterior-
mean forward and the 8-sample Monte Carlo forward that prediction uses, for 767 and 16,907 tokens.

    python -m benchmarks.pruning_tradeoff            # levels 0, 0.1 … 0.5
    python -m benchmarks.pruning_tradeoff --smoke
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from sklearn.model_selection import StratifiedShuffleSplit

from bayesian_sparse_transformer import (
    PRUNABLE_LAYERS,
    BayesianSparseTransformer,
    HeadConfig,
    ModelConfig,
    load_checkpoint,
)
from benchmarks.common import Report, paired, parse_config, time_call
from benchmarks.training import (
    DEMO,
    SMOKE_TRAINING,
    evaluate,
    load_pbmc,
    predict,
    prune_round2,
    train_stage_a,
    train_stage_b,
    write_h5ad,
)
from performer_pytorch import PerformerConfig

NAME = "pruning_tradeoff"
MODES = ("physical", "mask")
REAL = DEMO | dict(
    seed=2021, seeds=[2021, 2022, 2023], test_size=0.2, levels=[0.0, 0.1, 0.2, 0.3, 0.4, 0.5], latency_seq_lens=[767, 16907],
    latency_batches=[32, 8], latency_dim=200, latency_hidden1=512, latency_hidden2=128, latency_classes=10,
    latency_samples=8, warmup=5, repeats=15, work_dir="",
)
SMOKE = SMOKE_TRAINING | dict(
    seed=2021, seeds=[2021], test_size=0.2, levels=[0.0, 0.2], latency_seq_lens=[65], latency_batches=[4], latency_dim=16,
    latency_hidden1=32, latency_hidden2=16, latency_classes=4, latency_samples=4, warmup=1, repeats=3, work_dir="",
)


def head_counts(model: BayesianSparseTransformer) -> dict:
    """Stored and still-active parameter counts of fc1+fc2 (means and sigmas), and of the whole model."""
    stats = model.pruning_stats()
    stored = sum(p.numel() for name in PRUNABLE_LAYERS for p in getattr(model.head, name).parameters())
    active = 0
    for name in PRUNABLE_LAYERS:
        layer = getattr(model.head, name)
        copies = 2 if model.is_bayesian else 1  # mean and log-sigma per weight and bias
        active += copies * int(layer.weight_mask().sum() + layer.out_mask.sum())
    return {"fc12_params_stored": stored, "fc12_params_active": active, "fc12_removed": stats["fc12_sparsity"],
            "total_params": stats["total_params"], "nonzero_params": stats["nonzero_params"]}


def accuracy_part(config: dict, work: Path) -> list[dict]:
    """Macro-F1 and size per (level, mode), mean over the configured splits (one split's F1 moves by ±0.03)."""
    data = load_pbmc(config)
    per_split = []
    for seed in config["seeds"]:
        split_dir = work / f"split{seed}"
        split_dir.mkdir(parents=True, exist_ok=True)
        splitter = StratifiedShuffleSplit(n_splits=1, test_size=config["test_size"], random_state=seed)
        train, test = next(splitter.split(np.zeros(len(data.labels)), data.labels))
        train_path = write_h5ad(data, train, split_dir / "train.h5ad")
        stage_a = train_stage_a(config, train_path, split_dir, seed)
        stage_b = train_stage_b(config, train_path, split_dir, seed, stage_a["checkpoint"])
        for level in config["levels"]:
            for mode in MODES:
                # Level 0 gets the same fine-tuning epochs, so every drop is measured against equal training.
                run = prune_round2(config, train_path, split_dir, seed, stage_b["checkpoint"],
                                   name=f"{mode}_{level:g}", target=level, step=level, f1_tol=1.0, mode=mode)
                checkpoint, seconds = run["checkpoint"], run["seconds"]
                prediction = predict(checkpoint, data, test, config["mc_samples"], seed)
                metrics = evaluate(prediction.mean, data.labels[test], prediction.classes, {})
                model = load_checkpoint(checkpoint).model
                per_split.append({"seed": seed, "level": level, "mode": mode, "macro_f1": metrics["macro_f1"],
                                  "accuracy": metrics["accuracy"], "ece": metrics["ece"],
                                  "checkpoint_mb": Path(checkpoint).stat().st_size / 2**20,
                                  "finetune_seconds": seconds} | head_counts(model))
    base = {r["seed"]: r["macro_f1"] for r in per_split if r["level"] == 0}
    rows = []
    for level in config["levels"]:
        for mode in MODES:
            group = [r for r in per_split if r["level"] == level and r["mode"] == mode]
            drops = [base[r["seed"]] - r["macro_f1"] for r in group]
            rows.append(group[-1] | {
                "macro_f1": float(np.mean([r["macro_f1"] for r in group])),
                "macro_f1_std": float(np.std([r["macro_f1"] for r in group])),
                "accuracy": float(np.mean([r["accuracy"] for r in group])),
                "ece": float(np.mean([r["ece"] for r in group])),
                "macro_f1_drop": float(np.mean(drops)), "per_split_drop": drops,
                "finetune_seconds": float(np.sum([r["finetune_seconds"] for r in group])),
            })
    return rows


def latency_model(config: dict, seq_len: int) -> BayesianSparseTransformer:
    """A scBERT-sized Bayesian head on a throw-away one-layer encoder (only the head is timed)."""
    torch.manual_seed(config["seed"])
    dim = config["latency_dim"]
    encoder = PerformerConfig(num_tokens=7, max_seq_len=seq_len, dim=dim, depth=1, heads=1, dim_head=8)
    head = HeadConfig(seq_len=seq_len, dim=dim, num_classes=config["latency_classes"], hidden1=config["latency_hidden1"],
                      hidden2=config["latency_hidden2"], bayes=True)
    return BayesianSparseTransformer(ModelConfig(encoder, head)).eval()


def time_head(model: BayesianSparseTransformer, encodings: torch.Tensor, config: dict) -> dict:
    """Head-only forward on precomputed encodings: posterior means, and S samples with noise drawn once."""
    head = model.head
    noise = head.draw_noise(config["latency_samples"], torch.Generator().manual_seed(0))

    def mean_forward() -> None:
        model.set_deterministic(True)
        with torch.no_grad():
            head(encodings)  # (batch, classes)

    def mc_forward() -> None:
        model.set_deterministic(False)
        with torch.no_grad():
            head(encodings, noise)  # (samples, batch, classes)

    return {name: time_call(fn, warmup=config["warmup"], repeats=config["repeats"])
            for name, fn in (("mean", mean_forward), ("mc", mc_forward))}


def latency_part(config: dict) -> list[dict]:
    rows = []
    for seq_len, batch in paired(config, "latency_seq_lens", "latency_batches"):
        generator = torch.Generator().manual_seed(config["seed"])
        encodings = torch.randn(batch, seq_len, config["latency_dim"], generator=generator)  # (batch, genes+1, dim)
        for level in config["levels"]:
            for mode in MODES:
                model = latency_model(config, seq_len)
                if level > 0:
                    model.prune(level, mode=mode)
                timings = time_head(model, encodings, config)
                rows.append({"seq_len": seq_len, "batch": batch, "level": level, "mode": mode,
                             "fc1_shape": list(model.head.fc1.weight_mu.shape), "mean_forward": timings["mean"],
                             "mc_forward": timings["mc"]} | head_counts(model))
        print(f"  latency at {seq_len} tokens done")
    return rows


def tradeoff_figure(accuracy: list[dict], latency: list[dict], config: dict) -> Figure:
    figure = Figure(figsize=(9, 3.6))
    ax = figure.add_subplot(1, 2, 1)
    for mode in MODES:
        rows = [r for r in accuracy if r["mode"] == mode]
        ax.plot([100 * r["fc12_removed"] for r in rows], [r["macro_f1"] for r in rows], marker="o", label=mode)
    ax.set_xlabel("fc1+fc2 weights removed (%)")
    ax.set_ylabel("test macro-F1")
    ax.legend(fontsize=7)
    ax = figure.add_subplot(1, 2, 2)
    for seq_len in config["latency_seq_lens"]:
        for mode in MODES:
            rows = [r for r in latency if r["mode"] == mode and r["seq_len"] == seq_len]
            ax.plot([r["level"] for r in rows], [1e3 * r["mc_forward"]["median_s"] for r in rows], marker="o",
                    linestyle="-" if mode == "physical" else "--", label=f"{mode}, {seq_len} tokens")
    ax.set_xlabel("pruning level (share of fc1/fc2 neurons removed)")
    ax.set_ylabel(f"{config['latency_samples']}-sample MC head forward (ms)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    figure.tight_layout()
    return figure


def main(argv: list[str] | None = None) -> int:
    config, args = parse_config(__doc__.splitlines()[0], REAL, SMOKE, argv)
    paired(config, "latency_seq_lens", "latency_batches")  # checked before the training part runs
    if 0.0 not in config["levels"]:
        config["levels"] = [0.0, *config["levels"]]
    report = Report(NAME, "Pruning trade-off: macro-F1, size and head latency", config, args.out_dir)
    with tempfile.TemporaryDirectory(prefix="bench_prune_") as temporary:
        work = Path(config["work_dir"] or temporary)
        work.mkdir(parents=True, exist_ok=True)
        accuracy = accuracy_part(config, work)
    latency = latency_part(config)
    report.results = {"accuracy": accuracy, "latency": latency}
    report.table(
        f"Trained on PBMC: test macro-F1 after pruning + 1 fine-tuning pass, mean over {len(config['seeds'])} splits "
        "(level = share of fc1/fc2 neurons removed)",
        ["level", "mode", "macro-F1", "± std", "drop", "fc1+fc2 removed", "fc1+fc2 params stored", "fc1+fc2 params active",
         "total params", "checkpoint MB"],
        [[r["level"], r["mode"], r["macro_f1"], r["macro_f1_std"], r["macro_f1_drop"], r["fc12_removed"], r["fc12_params_stored"],
          r["fc12_params_active"], r["total_params"], r["checkpoint_mb"]] for r in accuracy],
    )
    latency_rows = []
    for r in latency:
        latency_rows.append([r["seq_len"], r["batch"], r["level"], r["mode"], "x".join(map(str, r["fc1_shape"])),
                             r["fc12_params_stored"], 1e3 * r["mean_forward"]["median_s"], 1e3 * r["mc_forward"]["median_s"]])
    report.table(
        f"Head latency on precomputed encodings (median of {config['repeats']} after {config['warmup']} warm-up)",
        ["tokens", "batch", "level", "mode", "fc1 stored", "fc1+fc2 params stored", "mean forward ms",
         f"MC-{config['latency_samples']} forward ms"],
        latency_rows,
    )
    physical = [r for r in accuracy if r["mode"] == "physical"]
    good = [r for r in physical if r["fc12_removed"] >= 0.3 and r["macro_f1_drop"] <= 0.01]
    best = max(good, key=lambda r: r["fc12_removed"]) if good else None
    at_30 = [r for r in physical if r["fc12_removed"] >= 0.3]
    if best:
        detail = f"level {best['level']}: {best['fc12_removed']:.0%} removed, macro-F1 drop {best['macro_f1_drop']:+.3f}"
    elif at_30:
        detail = "no level within 0.01: " + ", ".join(
            f"level {r['level']}: {r['fc12_removed']:.0%} removed, drop {r['macro_f1_drop']:+.3f}" for r in at_30)
    else:
        detail = f"no level removed 30 % (highest level {max(config['levels'])})"
    report.add_target("≥ 30 % of fc1+fc2 parameters removed with macro-F1 drop ≤ 0.01", best is not None, detail)
    top = max(config["levels"])
    speedups, faster = [], True
    for seq_len in config["latency_seq_lens"]:
        pick = {r["mode"]: r for r in latency if r["seq_len"] == seq_len and r["level"] == top}
        for kind in ("mean_forward", "mc_forward"):
            phys, mask = pick["physical"][kind], pick["mask"][kind]
            speedups.append(f"{mask['median_s'] / phys['median_s']:.2f}x ({kind.split('_')[0]}, {seq_len} tokens)")
            # Measurably: the physical head's upper quartile is below the masked head's lower quartile.
            faster &= bool(np.percentile(phys["times_s"], 75) < np.percentile(mask["times_s"], 25))
    report.add_target(f"physically pruned head measurably faster than the masked one (level {top})", faster,
                      "masked / physical time: " + ", ".join(speedups))
    report.notes += [
        "Pruning removes the smallest-L2-norm rows of fc1 and fc2 (dim 0: output neurons), so fc2 also loses the "
        "matching inputs; 'fc1+fc2 removed' is the share of their weights gone, 'params' count means and sigmas.",
        "Mask mode keeps full-size tensors (zeros), so its stored parameters and checkpoint do not shrink.",
        "'Measurably faster' means the physical head's upper-quartile time is below the masked head's lower-quartile "
        "time, at the highest level, for every sequence length and both forward kinds.",
        f"Test sets: {config['test_size']:.0%} of the cells (StratifiedShuffleSplit, random_state in {config['seeds']}); "
        "macro-F1 and its drop are means over those splits; predictions average "
        f"{config['mc_samples']} Monte Carlo samples.",
    ]
    report.save_figure(tradeoff_figure(accuracy, latency, config), "tradeoff")
    report.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
