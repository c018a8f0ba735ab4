"""Structured pruning on held-out cells: how much of the head each scoring rule removes and what it costs.

Accuracy, through the user's pipeline: for each stratified 80/20 split of the bundled PBMC data (seeds no design
choice looked at), the pipeline of `train_sparse.sh demo` (`finetune_sparse.pipeline`, presets/demo.json) trains
Stage A and the unpruned Bayesian model (round 1) on the 80 % training cells. Each variant then runs the pipeline's
round 2 (stage B2, what `stageb_round2.sh` runs) from that same round-1 model — progressive pruning, each level
fine-tuned and kept or refused by the paired rule on each fold's validation cells — and
`predict_updated.py --bayes_mc_samples 8` scores the 20 % test cells. A variant with a group-lasso penalty runs
its own round 1 from the same Stage A (the penalty acts while training) and is compared with it. The test
cells steer nothing. Per split and variant: the level each fold chose, the share of fc1+fc2 weights removed, test
macro-F1/NLL/ECE before (round 1) and after (round 2), checkpoint size and head latency.

Scale: a `full`-preset model (scBERT's encoder and head, 16,907 genes) is pruned to each level without training
(physical and mask mode): checkpoint size and head-only latency on precomputed encodings, posterior-mean and
8-sample Monte Carlo forward.

    python -m benchmarks.pruning_tradeoff            # 5 splits x the variants, then the scale part
    python -m benchmarks.pruning_tradeoff --smoke    # a tiny model, 1 split (CI)
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from sklearn.model_selection import StratifiedShuffleSplit

from bayesian_sparse_transformer import PRUNABLE_LAYERS, BayesianSparseTransformer, HeadConfig, ModelConfig
from benchmarks.common import Report, mean_std, parse_config, time_call
from benchmarks.pipeline import (
    TRAINING_STAGES,
    parse_settings,
    predict_stage,
    preset_options,
    run_pipeline,
    stage_info,
)
from benchmarks.training import load_pbmc, write_h5ad
from checkpoints import checkpoint_paths, load_checkpoint, save_checkpoint
from options import TrainConfig, make
from performer_pytorch import PerformerConfig
from utils import UserError, classification_metrics

NAME = "pruning_tradeoff"
MODES = ("physical", "mask")
METRICS = ("macro_f1", "nll", "ece", "accuracy")
# The options a variant may change, and the stages each acts in (as the shell rounds passed them): the penalty and
# the pruned layers in both Bayesian rounds (round 1 trains toward zero the neurons pruning will remove), the rest in
# round 2. "preset" runs the demo preset's values (presets/demo.json: the method a user gets).
VARIANT_STAGES = {"prune_target": ("B2",), "prune_layers": ("B1", "B2"), "prune_score": ("B2",), "prune_refit": ("B2",),
                  "prune_ft_epochs": ("B2",), "prune_distill": ("B2",), "group_lasso": ("B1", "B2")}
REAL = dict(
    seeds=[101, 102, 103, 104, 105], test_size=0.2, mc_samples=8, genes=0, max_cells=0, min_cells_per_class=0,
    pipeline_options=[""],
    # The preset refits and does not fine-tune, and prunes fc1's neurons only; fc1_fc2 also prunes fc2's (the
    # previous preset). "sgd" variants are the method before the refit (no refit, one fine-tuning epoch per level),
    # alone and with distillation or group lasso on the same budget.
    variants=["preset:", "fc1_fc2:prune_layers=fc1,fc2", "snr:prune_score=snr",
              "sgd_l2:prune_refit=0,prune_ft_epochs=1", "sgd_distill:prune_refit=0,prune_ft_epochs=1,prune_distill=1",
              "sgd_group_lasso:prune_refit=0,prune_ft_epochs=1,group_lasso=1e-3"],
    head_batch=32, seed=2021, levels=[0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6], scale_seq_len=16907, scale_batch=8,
    scale_dim=200, scale_depth=6, scale_heads=10, scale_dim_head=64, scale_hidden1=512, scale_hidden2=128,
    scale_classes=11, latency_samples=8, warmup=3, repeats=10, work_dir="",
)
SMOKE = REAL | dict(
    seeds=[101], mc_samples=2, genes=40, max_cells=160, min_cells_per_class=60,
    pipeline_options=["A.dim=8", "A.depth=1", "A.heads=1", "A.dim_head=8", "A.h_dim=8", "A.epoch=1", "B1.epoch=1",
                      "B1.pre_warm_epochs=0", "cv_splits=2", "B2.prune_target=0.2", "B2.prune_step=0.1",
                      # every level passes, so the smoke run really prunes
                      "B2.prune_nll_tol=100", "B2.prune_max_changed=1"],
    variants=["preset:", "sgd_distill:prune_refit=0,prune_ft_epochs=1,prune_distill=1", "group_lasso:group_lasso=1e-3"],
    head_batch=4, levels=[0.0, 0.5], scale_seq_len=65, scale_batch=4, scale_dim=16, scale_depth=1, scale_heads=1,
    scale_dim_head=8, scale_hidden1=32, scale_hidden2=16, scale_classes=4, latency_samples=4, warmup=1, repeats=3,
)


def parse_variant(spec: str) -> tuple[str, dict[str, str]]:
    """'name:option=value,option=value' -> (name, options); only the options of VARIANT_STAGES may change (names
    are finetune_sparse.py's, in any case: PRUNE_LAYERS=fc1,fc2 still reads), and their values are checked here."""
    name, _, pairs = spec.partition(":")
    items = [item.partition("=") for item in re.split(r",(?=\w+=)", pairs) if item]  # a value may hold commas: fc1,fc2
    values = {option.strip().lower(): value for option, _, value in items}
    if not name or not all(has_value for _, has_value, _ in items) or set(values) - set(VARIANT_STAGES):
        raise SystemExit(f"error: bad variant {spec!r}: write name:option=value,... with options among "
                         f"{', '.join(VARIANT_STAGES)}")
    try:
        make(TrainConfig, values)
    except UserError as err:
        raise SystemExit(f"error: bad variant {spec!r}: {err}") from None
    return name, values


def variant_options(base: dict[str, dict], values: dict[str, str]) -> dict[str, dict]:
    """The pipeline options per stage of a variant: the benchmark's, then each of the variant's in its stages."""
    return {stage: base[stage] | {k: v for k, v in values.items() if stage in VARIANT_STAGES[k]} for stage in TRAINING_STAGES}


# --------------------------------------------------------------------------------------------------------------
# Head size and speed
# --------------------------------------------------------------------------------------------------------------


def head_counts(model: BayesianSparseTransformer) -> dict:
    """Stored and still-active parameter counts of fc1+fc2 (means and sigmas), and of the whole model."""
    stats = model.pruning_stats()
    stored = sum(p.numel() for name in PRUNABLE_LAYERS for p in getattr(model.head, name).parameters())
    copies = 2 if model.is_bayesian else 1  # mean and log-sigma per weight and bias
    active = sum(copies * int(getattr(model.head, n).weight_mask().sum() + getattr(model.head, n).out_mask.sum())
                 for n in PRUNABLE_LAYERS)
    return {"fc12_params_stored": stored, "fc12_params_active": active, "fc12_removed": stats["fc12_sparsity"],
            "total_params": stats["total_params"]}


def time_head(model: BayesianSparseTransformer, encodings: torch.Tensor, config: dict) -> dict:
    """Head-only forward on precomputed encodings (batch, genes+1, dim): posterior means, and S samples."""
    head = model.head
    noise = head.draw_noise(config["latency_samples"], torch.Generator().manual_seed(0)) if model.is_bayesian else None

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


def member_head(stage_dir: Path, config: dict) -> dict:
    """Counts and MC head latency of a stage's first fold model on random encodings of its own shape."""
    model = load_checkpoint(checkpoint_paths(stage_dir)[0]).model.eval()
    shape = (config["head_batch"], model.config.head.seq_len, model.config.head.dim)
    encodings = torch.randn(*shape, generator=torch.Generator().manual_seed(config["seed"]))
    return head_counts(model) | {"head_mc_ms": 1e3 * time_head(model, encodings, config)["mc"]["median_s"]}


# --------------------------------------------------------------------------------------------------------------
# Accuracy: the user's pipeline per split and variant
# --------------------------------------------------------------------------------------------------------------


def test_metrics(config: dict, stage_dir: Path, test_path: Path, labels: np.ndarray, out_dir: Path) -> tuple[dict, np.ndarray]:
    probs, classes, _ = predict_stage(config["mc_samples"], stage_dir, test_path, out_dir)
    metrics = classification_metrics(probs, np.searchsorted(classes, labels), classes)
    return {k: metrics[k] for k in METRICS}, probs.argmax(1)


def run_split(config: dict, data, seed: int, work: Path) -> list[dict]:
    """Every variant on one split: one row each, before (round 1) and after (round 2) pruning."""
    splitter = StratifiedShuffleSplit(n_splits=1, test_size=config["test_size"], random_state=seed)
    train, test = next(splitter.split(np.zeros(len(data.labels)), data.labels))
    work.mkdir(parents=True, exist_ok=True)
    train_path, test_path = write_h5ad(data, train, work / "train.h5ad"), write_h5ad(data, test, work / "test.h5ad")
    labels = data.labels[test]
    base_options = parse_settings(config["pipeline_options"])
    base = work / "base"
    run_pipeline(train_path, base, base_options, stages=("A", "B1"))  # Stage A and the unpruned round 1
    reference = {}  # round-1 directory -> (its test metrics, predicted classes, head)
    rows = []
    for spec in config["variants"]:
        name, values = parse_variant(spec)
        run_dir = work / name.replace("+", "_")
        stage_options = variant_options(base_options, values)
        round1 = base / "stageB1"
        if float(values.get("group_lasso", 0)) > 0:
            run_pipeline(train_path, run_dir, stage_options, stages=("B1",), start=base / "stageA", log_name="round1.log")
            round1 = run_dir / "stageB1"
        seconds = run_pipeline(train_path, run_dir, stage_options, stages=("B2",), start=round1, log_name="round2.log")
        if round1 not in reference:
            metrics, predicted = test_metrics(config, round1, test_path, labels, work / f"pred_{round1.parent.name}_b1")
            reference[round1] = (metrics, predicted, stage_info(round1), member_head(round1, config))
        before, before_pred, before_info, before_head = reference[round1]
        after, after_pred = test_metrics(config, run_dir / "stageB2", test_path, labels, work / f"pred_{run_dir.name}")
        info = stage_info(run_dir / "stageB2")
        rows.append({"seed": seed, "variant": name, "settings": values, "levels": info["prune_amounts"],
                     "removed": info["head_sparsity"], "before": before, "after": after,
                     "changed": float(np.mean(after_pred != before_pred)), "round2_seconds": seconds,
                     "checkpoint_mb_before": before_info["checkpoint_mb"], "checkpoint_mb_after": info["checkpoint_mb"],
                     "head_before": before_head, "head_after": member_head(run_dir / "stageB2", config)})
        print(f"  split {seed} {name}: levels {info['prune_amounts']}, F1 {before['macro_f1']:.3f} -> "
              f"{after['macro_f1']:.3f}, NLL {before['nll']:.3f} -> {after['nll']:.3f}", flush=True)
    return rows


def split_level(levels: list[float]) -> float:
    """The level most fold models of a split chose (the smaller on a tie)."""
    values, counts = np.unique(np.round(levels, 6), return_counts=True)
    return float(values[np.argmax(counts)])


def summarise(rows: list[dict], variant: str) -> dict:
    mine = [r for r in rows if r["variant"] == variant]
    levels = [split_level(r["levels"]) for r in mine]
    common = max(set(levels), key=levels.count)
    diff = {k: [r["after"][k] - r["before"][k] for r in mine] for k in METRICS}
    return {"splits": len(mine), "split_levels": levels, "common_level": common, "same_level": levels.count(common),
            "min_fold_level": min(min(r["levels"]) for r in mine), "removed": mean_std([r["removed"] for r in mine]),
            "min_removed": min(r["removed"] for r in mine),
            "diff": {k: mean_std(v) for k, v in diff.items()},
            "f1_wins": sum(d >= 0 for d in diff["macro_f1"]), "nll_wins": sum(d <= 0 for d in diff["nll"]),
            "changed": mean_std([r["changed"] for r in mine]),
            "checkpoint_ratio": mean_std([r["checkpoint_mb_after"] / r["checkpoint_mb_before"] for r in mine]),
            "head_speedup": mean_std([r["head_before"]["head_mc_ms"] / r["head_after"]["head_mc_ms"] for r in mine])}


# --------------------------------------------------------------------------------------------------------------
# Scale: the full preset's model at 16,907 genes
# --------------------------------------------------------------------------------------------------------------


def scale_model(config: dict) -> BayesianSparseTransformer:
    """The `full` preset's architecture (scBERT's encoder, Bayesian head), untrained: sizes and speed only."""
    torch.manual_seed(config["seed"])
    seq_len, dim = config["scale_seq_len"], config["scale_dim"]
    encoder = PerformerConfig(num_tokens=7, max_seq_len=seq_len, dim=dim, depth=config["scale_depth"],
                              heads=config["scale_heads"], dim_head=config["scale_dim_head"])
    head = HeadConfig(seq_len=seq_len, dim=dim, num_classes=config["scale_classes"], hidden1=config["scale_hidden1"],
                      hidden2=config["scale_hidden2"], bayes=True)
    return BayesianSparseTransformer(ModelConfig(encoder, head)).eval()


def scale_part(config: dict, work: Path) -> list[dict]:
    seq_len = config["scale_seq_len"]
    generator = torch.Generator().manual_seed(config["seed"])
    encodings = torch.randn(config["scale_batch"], seq_len, config["scale_dim"], generator=generator)  # (batch, genes+1, dim)
    genes = [f"g{i}" for i in range(seq_len - 1)]
    classes = [f"c{i}" for i in range(config["scale_classes"])]
    rows = []
    for level in config["levels"]:
        for mode in MODES:
            model = scale_model(config)
            if level > 0:
                model.prune(level, mode=mode)
            path = work / f"scale_{mode}_{level:g}.pth"
            save_checkpoint(path, model, genes=genes, classes=classes, bin_num=5, stage="stageB2")
            timings = time_head(model, encodings, config)
            rows.append({"level": level, "mode": mode, "fc1_shape": list(model.head.fc1.weight_mu.shape),
                         "checkpoint_mb": path.stat().st_size / 2**20, "mean_forward": timings["mean"],
                         "mc_forward": timings["mc"]} | head_counts(model))
            path.unlink()
    return rows


# --------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------


def tradeoff_figure(rows: list[dict], variants: list[str], scale: list[dict], config: dict) -> Figure:
    figure = Figure(figsize=(10, 3.8))
    ax = figure.add_subplot(1, 2, 1)
    for i, variant in enumerate(variants):
        mine = [r for r in rows if r["variant"] == variant]
        removed = [100 * r["removed"] for r in mine]
        ax.scatter(removed, [r["after"]["macro_f1"] - r["before"]["macro_f1"] for r in mine], label=variant,
                   marker="os^vDP"[i % 6], s=22)
    ax.axhline(-0.01, color="grey", linestyle="--", linewidth=0.8)
    ax.axvline(50, color="grey", linestyle=":", linewidth=0.8)
    ax.set_xlabel("fc1+fc2 weights removed (%)")
    ax.set_ylabel("test macro-F1, pruned − unpruned")
    ax.set_title("one point per split", fontsize=9)
    ax.legend(fontsize=7)
    ax = figure.add_subplot(1, 2, 2)
    for mode in MODES:
        mine = [r for r in scale if r["mode"] == mode]
        ax.plot([r["level"] for r in mine], [1e3 * r["mc_forward"]["median_s"] for r in mine], marker="o",
                linestyle="-" if mode == "physical" else "--", label=f"{mode}: MC-{config['latency_samples']} head")
    ax.set_xlabel("pruning level (share of fc1/fc2 neurons removed)")
    ax.set_ylabel(f"head forward at {config['scale_seq_len']:,} tokens (ms)")
    ax.legend(fontsize=7)
    figure.tight_layout()
    return figure


def option_text(value) -> str:
    """An option's value as the command line writes it: lists comma-joined."""
    return ",".join(map(str, value)) if isinstance(value, list | tuple) else str(value)


def write_report(report: Report, config: dict, rows: list[dict], scale: list[dict]) -> None:
    variants = [parse_variant(spec)[0] for spec in config["variants"]]
    summary = {v: summarise(rows, v) for v in variants}
    defaults = preset_options(VARIANT_STAGES, "B2")
    report.results = {"preset": defaults, "summary": summary, "per_split": rows, "scale": scale}
    n = len(config["seeds"])

    def diff(s: dict, k: str) -> str:
        return f"{s['diff'][k]['mean']:+.3f} ± {s['diff'][k]['std']:.3f}"

    report.table(f"Per variant, {n} splits: pruned (round 2) − unpruned (round 1) on the test cells",
                 ["variant", "split levels", "same level", "fc1+fc2 removed", "Δ macro-F1", "F1 ≥", "Δ NLL", "NLL ≤",
                  "Δ ECE", "test calls changed", "checkpoints after/before", "MC head speed-up"],
                 [[v, " ".join(f"{x:g}" for x in s["split_levels"]), f"{s['same_level']}/{n} at {s['common_level']:g}",
                   s["removed"], diff(s, "macro_f1"), f"{s['f1_wins']}/{n}", diff(s, "nll"), f"{s['nll_wins']}/{n}",
                   diff(s, "ece"), s["changed"], s["checkpoint_ratio"], s["head_speedup"]] for v, s in summary.items()])
    report.table("Per split and variant (levels: one per fold model)",
                 ["seed", "variant", "levels", "removed", "macro-F1 before → after", "NLL before → after",
                  "ECE before → after", "fold checkpoints MB (all folds) before → after", "MC head ms before → after"],
                 [[r["seed"], r["variant"], " ".join(f"{x:g}" for x in r["levels"]), r["removed"],
                   f"{r['before']['macro_f1']:.3f} → {r['after']['macro_f1']:.3f}",
                   f"{r['before']['nll']:.3f} → {r['after']['nll']:.3f}", f"{r['before']['ece']:.3f} → {r['after']['ece']:.3f}",
                   f"{r['checkpoint_mb_before']:.2f} → {r['checkpoint_mb_after']:.2f}",
                   f"{r['head_before']['head_mc_ms']:.2f} → {r['head_after']['head_mc_ms']:.2f}"] for r in rows])
    report.table(f"Scale: the full preset's model at {config['scale_seq_len']:,} tokens, pruned without training "
                 f"(head latency: median of {config['repeats']}, batch {config['scale_batch']})",
                 ["level", "mode", "fc1 stored", "fc1+fc2 params stored", "total params", "checkpoint MB",
                  "mean forward ms", f"MC-{config['latency_samples']} forward ms"],
                 [[r["level"], r["mode"], "x".join(map(str, r["fc1_shape"])), r["fc12_params_stored"], r["total_params"],
                   r["checkpoint_mb"], 1e3 * r["mean_forward"]["median_s"], 1e3 * r["mc_forward"]["median_s"]] for r in scale])

    s = summary["preset"]
    report.add_target("preset: ≥ 50 % of fc1+fc2 weights removed on every split", s["min_removed"] >= 0.5,
                      f"{s['min_removed']:.1%} on the split with the least, {s['removed']['mean']:.1%} on average; "
                      f"split levels {s['split_levels']}; lowest fold level {s['min_fold_level']:g}")
    report.add_target("preset: test macro-F1 within 0.01 of the unpruned model (mean paired)",
                      s["diff"]["macro_f1"]["mean"] >= -0.01, f"{diff(s, 'macro_f1')} (≥ on {s['f1_wins']}/{n} splits)")
    report.add_target("preset: test NLL within 0.02 of the unpruned model (mean paired)",
                      s["diff"]["nll"]["mean"] <= 0.02, f"{diff(s, 'nll')} (≤ on {s['nll_wins']}/{n} splits)")
    report.add_target("preset: the same level chosen on ≥ 4 of 5 splits", s["same_level"] >= min(4, n),
                      f"{s['same_level']}/{n} splits at level {s['common_level']:g}")
    top = max(config["levels"])
    pick = {r["mode"]: r for r in scale if r["level"] == top}
    base = next(r for r in scale if r["level"] == 0 and r["mode"] == "physical")
    if top > 0:
        phys, mask = pick["physical"], pick["mask"]
        faster = all(np.percentile(phys[k]["times_s"], 75) < np.percentile(mask[k]["times_s"], 25)
                     for k in ("mean_forward", "mc_forward"))
        report.add_target(f"scale: the physically pruned head (level {top:g}) measurably faster than the masked one",
                          faster, ", ".join(f"{k.split('_')[0]} {1e3 * mask[k]['median_s']:.1f} → {1e3 * phys[k]['median_s']:.1f} ms"
                                            for k in ("mean_forward", "mc_forward")))
        report.add_target(f"scale: the physically pruned checkpoint (level {top:g}) smaller than the unpruned one",
                          phys["checkpoint_mb"] < base["checkpoint_mb"],
                          f"{base['checkpoint_mb']:.1f} → {phys['checkpoint_mb']:.1f} MB (mask mode: {mask['checkpoint_mb']:.1f} MB)")
    report.notes += [
        f"The preset (presets/demo.json, round 2): {', '.join(f'{k}={option_text(v)}' for k, v in defaults.items())}; each variant "
        "changes only the settings its name lists (config `variants`); every variant keeps the preset's levels, its "
        "paired rule and tolerances. The sgd_* variants are the method before the refit (one fine-tuning epoch per "
        "level, no refit), each with one of the levers on that same budget.",
        "Levels are shares of fc1/fc2 output neurons removed (dim 0), so fc2 also loses the inputs fc1 no longer "
        "produces; 'removed' is the share of fc1+fc2 weights gone. A split's level is the one most of its fold models chose.",
        "Before = round 1 (the unpruned Bayesian ensemble the variant started from), after = round 2; both predicted "
        f"with {config['mc_samples']} MC samples per member. Test splits: StratifiedShuffleSplit(test_size="
        f"{config['test_size']}, random_state=seed) for seeds {config['seeds']}.",
        "How the preset was chosen: on inner 80/20 splits of the training cells of outer splits with seeds 11-14 "
        "(never these seeds' test cells): refit vs fine-tuning, l2 vs snr, refit ridge 0.001-1, NLL tolerance "
        "0.02/0.03/0.05, one-shot vs 0.1 steps, target 0.5 vs 0.6 for l2 and snr, then fc1's neurons alone vs fc1's "
        "and fc2's (see benchmarks/README.md and the README). fc1_fc2 is the previous preset.",
        "Head latency of the trained models: one fold model's head on random encodings of its shape "
        f"(batch {config['head_batch']}), {config['latency_samples']}-sample MC forward, median of {config['repeats']}.",
    ]
    report.save_figure(tradeoff_figure(rows, variants, scale, config), "tradeoff")


def main(argv: list[str] | None = None) -> int:
    config, args = parse_config(__doc__.splitlines()[0], REAL, SMOKE, argv)
    names = [parse_variant(spec)[0] for spec in config["variants"]]  # checked before anything trains
    parse_settings(config["pipeline_options"])
    if "preset" not in names:
        raise SystemExit("error: --variants must include 'preset:' (the targets are judged on it)")
    if 0.0 not in config["levels"]:
        config["levels"] = [0.0, *config["levels"]]
    report = Report(NAME, f"Structured pruning on held-out cells ({len(config['seeds'])} splits) and at scale", config, args.out_dir)
    data = load_pbmc(config)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_prune_") as temporary:
        work = Path(config["work_dir"] or temporary)
        for seed in config["seeds"]:
            rows += run_split(config, data, seed, work / f"split_{seed}")
        scale = scale_part(config, work)
    write_report(report, config, rows, scale)
    report.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
