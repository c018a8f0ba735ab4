"""Training memory and time per step of the encoder: plain, gradient checkpointing, scBERT's frozen recipe, reference.

One training step (train mode, forward + backward of the encodings' sum, batch 1 = one cell) of a scBERT-sized
PerformerLM (dim 200, depth 6, heads 10, dim_head 64) at each sequence length, for four variants:

- `plain`: ours, every parameter trainable, activations kept for backward;
- `checkpointing`: ours with `PerformerConfig(gradient_checkpointing=True)` (blocks recomputed in backward);
- `last_block`: ours with scBERT's fine-tuning recipe, only the last block and the final norm trainable
  (`finetune_sparse.freeze_encoder_layers`), so the frozen blocks keep no activations;
- `reference`: performer-pytorch 1.1.4, every parameter trainable.

Each (variant, length) runs in a fresh subprocess. Peak memory is the resident-set high-water mark during
`warmup + repeats` steps above the resident memory after the model and input were built (Linux's peak counter is
reset through /proc/self/clear_refs; torch's CPU allocations are invisible to tracemalloc); it includes the
parameter gradients. Time per step is the median of the `repeats` steps after `warmup`.

glibc's malloc raises its mmap threshold after large blocks are freed, so later activations come from a heap that
it rarely hands back: the resident peak then exceeds what torch held at once. A second, memory-only pass (one step)
runs each point with MALLOC_MMAP_THRESHOLD_ fixed at `mmap_threshold_kb` (0: skip it) to show that part.

    python -m benchmarks.memory            # sequence lengths 767 and 16,907
    python -m benchmarks.memory --smoke
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from pathlib import Path

import torch

try:
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
except ModuleNotFoundError:  # the reference's worker: run by file path without the repository on sys.path
    from common import (
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

NAME = "memory"
VARIANTS = ("plain", "checkpointing", "last_block", "reference")
LABELS = {"plain": "ours, plain", "checkpointing": "ours, gradient checkpointing",
          "last_block": "ours, last block trainable (scBERT recipe)", "reference": "performer-pytorch 1.1.4"}
REAL = dict(seq_lens=[767, 16907], dim=200, depth=6, heads=10, dim_head=64, nb_features=0, num_tokens=7, warmup=1,
            repeats=2, seed=0, mmap_threshold_kb=128, memory_target_gb=1.5, time_ratio_target=1.35, worker_timeout_s=900)
SMOKE = REAL | dict(seq_lens=[65], dim=32, depth=2, heads=2, dim_head=16, repeats=1, worker_timeout_s=120)
WORKER = Path(__file__).resolve()


# --------------------------------------------------------------------------------------------------------------
# Worker (a fresh interpreter per measurement; imports only torch, the standard library and benchmarks/common.py)
# --------------------------------------------------------------------------------------------------------------


def build_model(variant: str, spec: dict) -> torch.nn.Module:
    torch.manual_seed(spec["seed"])
    if variant == "reference":
        from speed_worker import build_reference  # this file's folder is sys.path[0] in a worker

        return build_reference(spec)
    from performer_pytorch import PerformerConfig, PerformerLM

    config = PerformerConfig(
        num_tokens=spec["num_tokens"], max_seq_len=spec["seq_len"], dim=spec["dim"], depth=spec["depth"],
        heads=spec["heads"], dim_head=spec["dim_head"], nb_features=spec["nb_features"],
        gradient_checkpointing=variant == "checkpointing",
    )
    model = PerformerLM(config)
    if variant == "last_block":  # as finetune_sparse.freeze_encoder_layers(model, 1, ...) does
        model.requires_grad_(False)
        model.layers[-1].requires_grad_(True)
        model.norm.requires_grad_(True)
    return model


def measure(variant: str, spec: dict) -> dict:
    """Peak extra resident memory over `warmup + repeats` training steps, and the median time of the last `repeats`.

    A step on a few tokens first pays one-time setup (lazy imports, e.g. checkpoint's) before the baseline.
    """
    import performer_pytorch

    location = str(Path(performer_pytorch.__file__).resolve())
    if ("site-packages" in location) != (variant == "reference"):
        raise SystemExit(f"{variant}: imported the wrong performer_pytorch ({location}); check PYTHONPATH")
    model = build_model(variant, spec).train()
    tokens = torch.randint(0, spec["num_tokens"], (1, spec["seq_len"]))  # (batch=1, genes+1)

    def step(cell: torch.Tensor = tokens) -> None:
        model.zero_grad(set_to_none=True)
        model(cell).sum().backward()

    step(tokens[:, :8])  # one-time setup, not memory per cell
    exact_reset = reset_peak_rss()
    before = rss_mb()
    timing = time_call(step, warmup=spec["warmup"], repeats=spec["repeats"])
    after = rss_mb()
    return {
        "variant": variant, "seq_len": spec["seq_len"], "performer_pytorch": location,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "time_s": timing["median_s"], "timing": timing, "rss_before_mb": before["VmRSS"], "peak_rss_mb": after["VmHWM"],
        "peak_extra_mb": after["VmHWM"] - (before["VmRSS"] if exact_reset else before["VmHWM"]),
        "peak_reset": exact_reset,
    }


def worker(variant: str, spec: dict) -> None:
    set_threads(spec["threads"])
    emit_worker_result(measure(variant, spec))


# --------------------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------------------


def run_variant(variant: str, spec: dict, timeout: float, mmap_threshold_kb: int = 0) -> dict:
    # Run by file path: ours with the repository on PYTHONPATH, the reference without it, so that
    # `import performer_pytorch` finds the installed performer-pytorch 1.1.4 (both use that name).
    env = thread_env(spec["threads"], pythonpath=None if variant == "reference" else str(ROOT))
    if mmap_threshold_kb:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold_kb * 1024)
    command = [sys.executable, str(WORKER), "--worker", variant, json.dumps(spec)]
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as cwd:
        return run_worker(command, env=env, cwd=cwd, timeout=timeout)


def memory_figure(rows: list[dict], seq_lens: list[int]):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 3.8))
    width = 0.8 / len(VARIANTS)
    for index, (key, label) in enumerate((("peak_extra_mb", "peak extra memory per cell (MB)"),
                                          ("time_s", "time per training step (s)"))):
        ax = figure.add_subplot(1, 2, index + 1)
        for offset, variant in enumerate(VARIANTS):
            values = [next(r[key] for r in rows if r["variant"] == variant and r["seq_len"] == n) for n in seq_lens]
            ax.bar([i + (offset - (len(VARIANTS) - 1) / 2) * width for i in range(len(seq_lens))], values, width,
                   label=LABELS[variant])
        ax.set_xticks(range(len(seq_lens)), [str(n) for n in seq_lens])
        ax.set_xlabel("sequence length (genes + 1)")
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.legend(fontsize=6)
    figure.suptitle("scBERT-sized encoder, one training step (forward + backward), batch 1", fontsize=9)
    figure.tight_layout()
    return figure


def add_targets(report: Report, rows: list[dict], config: dict) -> None:
    """The issue's goals at the longest sequence: memory per cell, and checkpointing's time cost."""
    longest = max(config["seq_lens"])
    at = {r["variant"]: r for r in rows if r["seq_len"] == longest}
    budget_mb = config["memory_target_gb"] * 1024
    for variant in ("checkpointing", "last_block"):
        peak = at[variant]["peak_extra_mb"]  # judged with the default allocator: what a user's process reaches
        fixed = at[variant].get("peak_extra_mb_fixed_mmap")
        report.add_target(f"≤ {config['memory_target_gb']} GB peak extra memory per cell at {longest} tokens "
                          f"({LABELS[variant]})", peak <= budget_mb,
                          f"{peak / 1024:.2f} GB (plain {at['plain']['peak_extra_mb'] / 1024:.2f} GB; with a fixed "
                          f"mmap threshold {'–' if fixed is None else f'{fixed / 1024:.2f}'} GB)")
    ratio = at["checkpointing"]["time_s"] / at["plain"]["time_s"]
    report.add_target(f"gradient checkpointing ≤ {config['time_ratio_target']}x the plain time per step at {longest} "
                      "tokens", ratio <= config["time_ratio_target"],
                      f"{ratio:.2f}x ({at['checkpointing']['time_s']:.2f} s vs {at['plain']['time_s']:.2f} s)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        worker(argv[1], json.loads(argv[2]))
        return 0
    config, args = parse_config(__doc__.splitlines()[0], REAL, SMOKE, argv)
    report = Report(NAME, "Training memory and time per step: checkpointing, frozen blocks, reference (CPU)", config,
                    args.out_dir)
    base = {k: config[k] for k in ("dim", "depth", "heads", "dim_head", "num_tokens", "warmup", "repeats", "seed",
                                   "threads")}
    base["nb_features"] = config["nb_features"] or int(config["dim_head"] * math.log(config["dim_head"]))
    rows = []
    for seq_len in config["seq_lens"]:
        for variant in VARIANTS:
            row = run_variant(variant, base | {"seq_len": seq_len}, config["worker_timeout_s"])
            if config["mmap_threshold_kb"]:
                fixed = run_variant(variant, base | {"seq_len": seq_len, "warmup": 0, "repeats": 1},
                                    config["worker_timeout_s"], config["mmap_threshold_kb"])
                row["peak_extra_mb_fixed_mmap"] = fixed["peak_extra_mb"]
            rows.append(row)
            print(f"  {variant:>13} {seq_len:>6} tokens: {row['time_s']:7.2f} s/step, +{row['peak_extra_mb']:.0f} MB "
                  f"(fixed mmap threshold: +{row.get('peak_extra_mb_fixed_mmap', float('nan')):.0f} MB)")
    for row in rows:
        plain = next(r for r in rows if r["variant"] == "plain" and r["seq_len"] == row["seq_len"])
        row["time_vs_plain"] = row["time_s"] / plain["time_s"]
        row["memory_vs_plain"] = row["peak_extra_mb"] / plain["peak_extra_mb"] if plain["peak_extra_mb"] > 0 else None
    report.results = {"points": rows}
    report.table("Peak extra memory (MB) and time per training step (s) per cell, batch 1",
                 ["tokens", "variant", "trainable params", "peak extra MB", "× plain memory",
                  "peak extra MB, fixed mmap threshold", "s / step", "× plain time"],
                 [[r["seq_len"], LABELS[r["variant"]], r["trainable_parameters"], r["peak_extra_mb"],
                   r["memory_vs_plain"], r.get("peak_extra_mb_fixed_mmap"), r["time_s"], r["time_vs_plain"]]
                  for r in rows])
    add_targets(report, rows, config)
    report.notes += [
        "One training step = train mode, forward and backward of the encodings' sum (no head, no optimizer), batch 1; "
        f"time = median of {config['repeats']} steps after {config['warmup']} warm-up step(s).",
        "Peak extra memory = resident-set high-water mark over all steps of a fresh process minus the resident memory "
        "after building the model and input (kernel counter reset via /proc/self/clear_refs); includes the "
        "parameter gradients and allocator slack, not the weights.",
        f"'fixed mmap threshold': a memory-only pass (1 step) with MALLOC_MMAP_THRESHOLD_={config['mmap_threshold_kb']} "
        "KiB, which stops glibc from keeping freed activation memory; the gap to the default is allocator slack.",
        "performer-pytorch 1.1.4 runs in its own process with the installed package on the path (same name as ours).",
    ]
    report.save_figure(memory_figure(rows, config["seq_lens"]), "memory_time")
    report.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
