"""The CUDA paths in one run: scBERT's size at 767 and 16,907 genes, fp32 and --amp (bf16), a one-process torchrun
over NCCL, the pipeline's training and prediction, and AMP-vs-fp32 agreement of the predictions.

    bash benchmarks/gpu_check.sh                     # on a GPU box, about 5 minutes on one H100
    python -m benchmarks.gpu_check --smoke           # the same steps with a tiny model on the CPU (CI)

Steps, each timed and recorded in benchmarks/results/gpu_check.{md,json}:
1. encoder + head throughput, forward and forward+backward, fp32 and bf16 autocast, at each gene count: cells/s
   and peak GPU memory (the `full` preset's model: dim 200, depth 6, 10 heads);
2. a few training steps of the `full` preset's Stage A and Stage B (one epoch on `train_cells` cells, the bundled
   cells padded with zero-expression genes to each gene count), with and without --amp, under
   `torchrun --nproc_per_node 1` (NCCL on a GPU, gloo on the CPU), so the DistributedDataParallel path runs;
3. prediction of the held-out cells with 8 Monte Carlo samples, fp32 and --amp: share of identical labels and the
   largest probability difference, against the stated tolerance.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from matplotlib.figure import Figure

from bayesian_sparse_transformer import BayesianSparseTransformer, HeadConfig, ModelConfig
from benchmarks.common import ROOT, Report, parse_config
from benchmarks.training import load_pbmc
from performer_pytorch import PerformerConfig
from utils import autocast, resolve_device

NAME = "gpu_check"
REAL = dict(gene_counts=[767, 16907], dim=200, depth=6, heads=10, dim_head=64, h_dim=128, batch_size=8, repeats=5,
            train_cells=120, predict_cells=200, mc_samples=8, device="cuda", label_agreement_tol=0.99, prob_diff_tol=0.05,
            genes=0, max_cells=0, min_cells_per_class=0)
SMOKE = REAL | dict(gene_counts=[67, 300], dim=16, depth=1, heads=2, dim_head=8, h_dim=16, batch_size=4, repeats=2,
                    train_cells=60, predict_cells=40, mc_samples=2, device="cpu")


def padded_cells(data, rows: np.ndarray, genes: int) -> anndata.AnnData:
    """The chosen cells with their genes first and zero-expression genes up to `genes` (scBERT's 16,907 panel size)."""
    matrix = data.matrix[rows][:, : min(genes, data.matrix.shape[1])]
    extra = genes - matrix.shape[1]
    names = list(data.genes[: matrix.shape[1]]) + [f"PAD{i}" for i in range(extra)]
    matrix = sp.hstack([matrix, sp.csr_matrix((matrix.shape[0], extra), dtype=np.float32)]).tocsr()
    obs = pd.DataFrame({"cell_type": data.labels[rows]}, index=[data.cell_ids[i] for i in rows])
    return anndata.AnnData(X=matrix.astype(np.float32), obs=obs, var=pd.DataFrame(index=names))


def throughput(config: dict, genes: int, device: torch.device, amp: bool) -> dict:
    """Cells/s of encoder + head, forward and forward+backward, and the peak GPU memory of each."""
    encoder = PerformerConfig(num_tokens=7, max_seq_len=genes + 1, dim=config["dim"], depth=config["depth"],
                              heads=config["heads"], dim_head=config["dim_head"])
    model = BayesianSparseTransformer(ModelConfig(encoder, HeadConfig(seq_len=genes + 1, dim=config["dim"],
                                                                      num_classes=10, hidden2=config["h_dim"]))).to(device)
    tokens = torch.randint(0, 7, (config["batch_size"], genes + 1), device=device)
    result = {}
    for mode in ("forward", "forward_backward"):
        model.train(mode == "forward_backward")
        times = []
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for repeat in range(config["repeats"] + 1):  # the first is warm-up
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            with torch.set_grad_enabled(mode == "forward_backward"), autocast(device, amp):
                logits = model(tokens)
            if mode == "forward_backward":
                logits.float().sum().backward()
                model.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if repeat:
                times.append(time.perf_counter() - started)
        result[mode] = {"cells_per_s": config["batch_size"] / float(np.median(times)),
                        "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}
    return result


def torchrun(args: list[str], log: Path) -> float:
    """`torchrun --standalone --nproc_per_node 1 finetune_sparse.py ARGS`; its wall time; fails loudly."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
               str(ROOT / "finetune_sparse.py"), *args]
    started = time.perf_counter()
    with open(log, "w", encoding="utf-8") as handle:
        completed = subprocess.run(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, env=os.environ | {"PYTHONPATH": str(ROOT)})
    if completed.returncode != 0:
        raise SystemExit(f"training failed (exit {completed.returncode}); see {log}:\n{log.read_text()[-3000:]}")
    return time.perf_counter() - started


def train_and_predict(config: dict, data, genes: int, work: Path) -> dict:
    """Stage A and Stage B of the full preset for one epoch each, fp32 and --amp, then prediction fp32 and --amp."""
    import predict_updated

    rng = np.random.default_rng(0)
    order = rng.permutation(len(data.labels))
    train_rows, test_rows = order[: config["train_cells"]], order[config["train_cells"]:][: config["predict_cells"]]
    train_path, test_path = work / f"train_{genes}.h5ad", work / f"test_{genes}.h5ad"
    padded_cells(data, train_rows, genes).write_h5ad(train_path)
    padded_cells(data, test_rows, genes).write_h5ad(test_path)
    size = ["--dim", str(config["dim"]), "--depth", str(config["depth"]), "--heads", str(config["heads"]),
            "--dim_head", str(config["dim_head"]), "--h_dim", str(config["h_dim"])]
    common = ["--data_path", str(train_path), "--label_key", "cell_type", "--preset", "full", "--epoch", "1",
              "--batch_size", str(config["batch_size"]), "--grad_acc", "1", "--device", config["device"],
              "--min_cells_per_class", "2", "--overwrite"]
    result: dict = {}
    for amp in (False, True):
        tag = "amp" if amp else "fp32"
        stage_a, stage_b = work / f"{genes}_{tag}_A", work / f"{genes}_{tag}_B"
        flags = ["--amp"] if amp else []
        seconds_a = torchrun([*common, *size, *flags, "--stage", "A", "--ckpt_dir", str(stage_a)], work / f"{genes}_{tag}_A.log")
        seconds_b = torchrun([*common, *flags, "--stage", "B2", "--model_path", str(stage_a), "--prune_ft_epochs", "0",
                              "--ckpt_dir", str(stage_b)], work / f"{genes}_{tag}_B.log")
        result[f"train_{tag}_seconds"] = {"stage_a": seconds_a, "stage_b": seconds_b}
    predictions = {}
    for amp in (False, True):
        prediction = predict_updated.default_config(work / f"{genes}_fp32_B", data_path=str(test_path), label_key="cell_type",
                                                    bayes_mc_samples=config["mc_samples"], device=config["device"],
                                                    amp=amp, verbose=False)
        annotation = predict_updated.annotate_with(prediction)
        predictions[amp] = annotation
        result[f"predict_{'amp' if amp else 'fp32'}_cells_per_s"] = len(test_rows) / annotation.prediction.seconds
    fp32, amp = predictions[False].result, predictions[True].result
    result["label_agreement"] = float((fp32.predicted_labels["pred_top_label"] == amp.predicted_labels["pred_top_label"]).mean())
    result["max_prob_diff"] = float(np.abs(fp32.probability_matrix.to_numpy() - amp.probability_matrix.to_numpy()).max())
    result["accuracy_fp32"] = predictions[False].metrics["accuracy"]
    return result


def main(argv: list[str] | None = None) -> int:
    config, args = parse_config(__doc__.splitlines()[0], REAL, SMOKE, argv)
    device = resolve_device(config["device"])
    report = Report(NAME, "CUDA paths: throughput, AMP, one-process torchrun, AMP-vs-fp32 predictions", config, args.out_dir)
    environment = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                   "torch": torch.__version__, "cuda": torch.version.cuda,
                   "bf16": bool(device.type == "cuda" and torch.cuda.is_bf16_supported())}
    data = load_pbmc(config)
    results: dict = {"environment": environment, "genes": {}}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as temporary:
        for genes in config["gene_counts"]:
            speed = {"fp32": throughput(config, genes, device, amp=False), "amp": throughput(config, genes, device, amp=True)}
            results["genes"][genes] = {"throughput": speed, **train_and_predict(config, data, genes, Path(temporary))}
            print(f"  {genes} genes: {json.dumps(results['genes'][genes])}", flush=True)
    report.results = results
    rows = []
    for genes, entry in results["genes"].items():
        for precision in ("fp32", "amp"):
            speed = entry["throughput"][precision]
            rows.append([genes, precision, speed["forward"]["cells_per_s"], speed["forward_backward"]["cells_per_s"],
                         speed["forward"]["peak_memory_gb"], speed["forward_backward"]["peak_memory_gb"],
                         entry[f"predict_{precision}_cells_per_s"]])
    report.table(f"Throughput on {environment['device']} (encoder + head, batch {config['batch_size']})",
                 ["genes", "precision", "forward cells/s", "forward+backward cells/s", "forward peak GB",
                  "forward+backward peak GB", f"prediction cells/s ({config['mc_samples']} MC samples)"], rows)
    for genes, entry in results["genes"].items():
        report.add_target(f"{genes} genes: AMP and fp32 predictions agree",
                          entry["label_agreement"] >= config["label_agreement_tol"] and entry["max_prob_diff"] <= config["prob_diff_tol"],
                          f"{entry['label_agreement']:.1%} identical labels (≥ {config['label_agreement_tol']:.0%}), largest "
                          f"probability difference {entry['max_prob_diff']:.4f} (≤ {config['prob_diff_tol']})")
    report.notes += [f"Environment: {json.dumps(environment)}.",
                     "Training ran under `torchrun --standalone --nproc_per_node 1` (a process group even for one "
                     f"process: {'NCCL' if device.type == 'cuda' else 'gloo'}), Stage A then Stage B (Bayesian head, "
                     "pruning) of the `full` preset for one epoch each on the bundled cells padded with zero genes."]
    report.save_figure(throughput_figure(results["genes"]), "throughput")
    report.write()
    return 0


def throughput_figure(per_genes: dict) -> Figure:
    """Cells/s against the number of genes, fp32 and AMP, forward and forward+backward."""
    figure = Figure(figsize=(5, 3.6))
    ax = figure.add_subplot(1, 1, 1)
    genes = list(per_genes)
    for precision, style in (("fp32", "-"), ("amp", "--")):
        for mode in ("forward", "forward_backward"):
            ax.plot(genes, [per_genes[g]["throughput"][precision][mode]["cells_per_s"] for g in genes], style, marker="o",
                    label=f"{mode.replace('_', '+')}, {precision}")
    ax.set(xscale="log", yscale="log", xlabel="genes (tokens - 1)", ylabel="cells/s")
    ax.legend(fontsize=7)
    figure.tight_layout()
    return figure


if __name__ == "__main__":
    sys.exit(main())
