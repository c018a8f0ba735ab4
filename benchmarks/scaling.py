"""Time and peak memory of one encoder layer against sequence length: FAVOR+ vs exact softmax attention (CPU).

One PerformerBlock (pre-norm attention + feed-forward, dim 200, heads 10, dim_head 64) runs forward (eval,
no_grad) on a batch of one cell. The exact variants replace only the attention kernel inside the same block:
`sdpa` is torch's fused `scaled_dot_product_attention` (on the CPU a flash-style kernel that never stores the
n x n matrix), `naive` is `softmax(q kᵀ/√d) v` as written (performer_pytorch.kernels.exact_softmax_attention),
skipped where its n x n matrices would not fit the memory budget.

Peak memory: each point runs in a fresh subprocess; the kernel's peak-RSS counter is reset (/proc/self/clear_refs)
after the model and input exist, and the first forward's peak RSS above that level is reported (torch's CPU
allocations are invisible to tracemalloc). A first call also pays one-time setup, so small points carry a few MB
of noise; the timing is the median of repeats after a warm-up.

    python -m benchmarks.scaling            # 166 … 16,907 tokens
    python -m benchmarks.scaling --smoke
"""

from __future__ import annotations

import itertools
import json
import math
import sys

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import nn

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

NAME = "scaling"
METHODS = ("favor", "sdpa", "naive")
LABELS = {"favor": "FAVOR+ (ours)", "sdpa": "exact, fused SDPA", "naive": "exact, naive softmax"}
REAL = dict(
    tokens=[166, 767, 2000, 5000, 16907], dim=200, heads=10, dim_head=64, nb_features=0, warmup=1, repeats=3,
    naive_max_gb=6.0, fresh_process_per_point=True, seed=0, worker_timeout_s=900,
)
SMOKE = REAL | dict(tokens=[32, 128], dim=32, heads=2, dim_head=16, repeats=2, fresh_process_per_point=False,
                    worker_timeout_s=120)


class ExactAttention(nn.Module):
    """Drop-in for FastAttention: exact softmax attention over (b, h, n, d) q, k, v."""

    def __init__(self, fused: bool):
        super().__init__()
        self.fused = fused

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        from performer_pytorch import exact_softmax_attention

        return F.scaled_dot_product_attention(q, k, v) if self.fused else exact_softmax_attention(q, k, v)


def naive_bytes(tokens: int, heads: int) -> float:
    """Scores, scaled scores and softmax output: three (heads, n, n) fp32 matrices alive at once."""
    return 3 * 4 * heads * tokens**2


def measure_point(spec: dict, method: str, tokens: int) -> dict:
    """Build the block, measure the first forward's extra peak memory, then time forwards."""
    from performer_pytorch.model import PerformerBlock, PerformerConfig

    torch.manual_seed(spec["seed"])
    config = PerformerConfig(num_tokens=7, max_seq_len=tokens, dim=spec["dim"], depth=1, heads=spec["heads"],
                             dim_head=spec["dim_head"], nb_features=spec["nb_features"] or None)
    block = PerformerBlock(config, local_heads=0).eval()
    if method != "favor":
        block.attn.fast_attention = ExactAttention(fused=method == "sdpa")
    x = torch.randn(1, tokens, spec["dim"])  # (batch=1, tokens, dim)

    def forward() -> None:
        with torch.no_grad():
            block(x)

    exact_reset = reset_peak_rss()
    before = rss_mb()
    forward()
    after = rss_mb()
    timing = time_call(forward, warmup=spec["warmup"], repeats=spec["repeats"])
    return {"method": method, "tokens": tokens, "time_s": timing["median_s"], "timing": timing,
            "rss_before_mb": before["VmRSS"], "peak_rss_mb": after["VmHWM"],
            "peak_extra_mb": after["VmHWM"] - (before["VmRSS"] if exact_reset else before["VmHWM"]),
            "peak_reset": exact_reset}


def worker(spec: dict) -> None:
    set_threads(spec["threads"])
    emit_worker_result({"points": [measure_point(spec, method, tokens) for method, tokens in spec["points"]]})


def run_points(config: dict, points: list[tuple[str, int]]) -> list[dict]:
    spec = {k: config[k] for k in ("dim", "heads", "dim_head", "nb_features", "warmup", "repeats", "seed", "threads")}
    env = thread_env(config["threads"], pythonpath=str(ROOT))
    batches = [[p] for p in points] if config["fresh_process_per_point"] else [points]
    results = []
    for batch in batches:
        command = [sys.executable, "-m", "benchmarks.scaling", "--worker", json.dumps(spec | {"points": batch})]
        results += run_worker(command, env=env, cwd=ROOT, timeout=config["worker_timeout_s"])["points"]
        for point in results[-len(batch):]:
            print(f"  {point['method']:>5} {point['tokens']:>6} tokens: {1e3 * point['time_s']:9.1f} ms, "
                  f"+{point['peak_extra_mb']:.0f} MB")
    return results


def crossover(tokens: list[int], favor: list[float], exact: list[float | None]) -> float | None:
    """Smallest sequence length where FAVOR+ becomes cheaper, interpolated log-log between measured points."""
    pairs = [(n, f, e) for n, f, e in zip(tokens, favor, exact) if e is not None and f > 0 and e > 0]
    for (n0, f0, e0), (n1, f1, e1) in itertools.pairwise(pairs):
        if f0 < e0:
            return float(n0)
        if f1 < e1:
            r0, r1 = math.log(f0 / e0), math.log(f1 / e1)  # > 0, then < 0
            return float(math.exp(math.log(n0) + (math.log(n1) - math.log(n0)) * r0 / (r0 - r1)))
    if pairs and pairs[0][1] < pairs[0][2]:
        return float(pairs[0][0])
    return None


def scaling_figure(table: dict, tokens: list[int], crossovers: dict) -> Figure:
    figure = Figure(figsize=(9, 3.8))
    for index, (key, label) in enumerate((("time_s", "forward time per cell (s)"), ("peak_extra_mb", "peak extra memory (MB)"))):
        ax = figure.add_subplot(1, 2, index + 1)
        for method in METHODS:
            points = [(n, table[method][n][key]) for n in tokens if table[method].get(n) and table[method][n][key] > 0]
            if points:
                ax.plot(*zip(*points), marker="o", label=LABELS[method])
        for method, where in crossovers.get(key, {}).items():
            if where is not None:
                ax.axvline(where, linestyle="--", linewidth=0.8, color="grey")
                ax.text(where, 0.03, f"vs {method}: {where:,.0f}", transform=ax.get_xaxis_transform(), rotation=90,
                        fontsize=7, va="bottom", ha="right")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (genes + 1)")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    figure.suptitle("one encoder layer, forward, batch 1", fontsize=9)
    figure.tight_layout()
    return figure


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        worker(json.loads(argv[1]))
        return 0
    config, args = parse_config(__doc__.splitlines()[0], REAL, SMOKE, argv)
    report = Report(NAME, "Scaling with sequence length: FAVOR+ vs exact attention (one layer, CPU)", config, args.out_dir)
    tokens = sorted(config["tokens"])
    points, skipped = [], []
    for method in METHODS:
        for n in tokens:
            if method == "naive" and naive_bytes(n, config["heads"]) > config["naive_max_gb"] * 1e9:
                skipped.append({"method": method, "tokens": n, "estimated_gb": naive_bytes(n, config["heads"]) / 1e9})
            else:
                points.append((method, n))
    measured = run_points(config, points)
    table = {method: {p["tokens"]: p for p in measured if p["method"] == method} for method in METHODS}
    crossovers: dict = {}
    for key in ("time_s", "peak_extra_mb"):
        favor = [table["favor"][n][key] for n in tokens]
        crossovers[key] = {
            method: crossover(tokens, favor, [table[method][n][key] if n in table[method] else None for n in tokens])
            for method in ("sdpa", "naive")
        }
    report.results = {"points": measured, "skipped": skipped, "crossover_tokens": crossovers}
    rows = []
    for n in tokens:
        row = [n]
        for method in METHODS:
            point = table[method].get(n)
            row += [1e3 * point["time_s"] if point else None, point["peak_extra_mb"] if point else None]
        rows.append(row)
    report.table("Forward time (ms) and peak extra memory (MB) per cell, one layer",
                 ["tokens"] + [f"{LABELS[m]} {unit}" for m in METHODS for unit in ("ms", "MB")], rows)
    describe = lambda where: "none in the measured range" if where is None else f"≈ {where:,.0f} tokens"
    report.table("Crossover: sequence length above which FAVOR+ is cheaper",
                 ["quantity", "vs fused SDPA", "vs naive softmax"],
                 [[q, describe(crossovers[k]["sdpa"]), describe(crossovers[k]["naive"])]
                  for q, k in (("time", "time_s"), ("peak memory", "peak_extra_mb"))])
    report.notes += [
        "One layer (attention + feed-forward) at the configured width, forward only, eval mode, batch 1; the "
        "feed-forward part is identical in all variants, so differences come from attention.",
        "Peak memory: peak RSS above the level reached after building the layer and its input, during the first "
        "forward of a fresh process (kernel counter reset via /proc/self/clear_refs); a few MB of one-time setup "
        "are included, so small points are noisy.",
        f"Naive exact attention skipped where three (heads, n, n) fp32 matrices exceed {config['naive_max_gb']} GB: "
        + (", ".join(f"{s['tokens']} tokens ({s['estimated_gb']:.0f} GB)" for s in skipped) or "none"),
    ]
    report.save_figure(scaling_figure(table, tokens, crossovers), "time_memory")
    report.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
