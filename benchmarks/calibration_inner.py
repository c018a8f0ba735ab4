"""How the ensemble's temperature was chosen: on inner splits of training cells, never on benchmark test cells.

For each design seed (11-14, seeds the accuracy benchmark does not use): an outer stratified 80/20 split of a
dataset; its 80 % training cells are split again 80/20, the demo pipeline (`finetune_sparse.pipeline`) trains on the
inner 80 %, and each stage predicts the inner 20 % (`predict_updated.py`, the run's ensemble temperature applied).
The predictions are compared on the same cells with the fitted temperature, without it, and with it applied
only where it sharpens (below 1, what the pipeline ships): the temperature only divides the pooled
log-probabilities, so each is recovered exactly from one prediction. Datasets as in accuracy_calibration.

    python -m benchmarks.calibration_inner
    python -m benchmarks.calibration_inner --smoke
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedShuffleSplit

from benchmarks.accuracy_calibration import DATASETS, STAGES
from benchmarks.accuracy_calibration import SMOKE as ACCURACY_SMOKE
from benchmarks.common import Report, mean_std, parse_config
from benchmarks.pipeline import parse_settings, predict_stage, run_pipeline, stage_info
from benchmarks.standin import cpm_standin
from benchmarks.training import load_pbmc, write_h5ad
from finetune_sparse import sharpening_only, stage_state
from utils import classification_metrics, tempered

NAME = "calibration_inner"
REAL = dict(datasets=list(DATASETS), seeds=[11, 12, 13, 14], test_size=0.2, mc_samples=8, genes=0, max_cells=0,
            min_cells_per_class=0, pipeline_options=[""], work_dir="", reuse_runs=False,
            complete_only=False)
SMOKE = REAL | {key: ACCURACY_SMOKE[key] for key in ("datasets", "mc_samples", "genes", "max_cells",
                                                     "min_cells_per_class", "pipeline_options")} | dict(seeds=[11])
VARIANTS = ("fitted_temperature", "no_temperature", "sharpening_only")


def inner_split(labels: np.ndarray, seed: int, test_size: float) -> tuple[np.ndarray, np.ndarray]:
    """(inner training rows, inner validation rows) inside the outer split's training cells."""
    outer = StratifiedShuffleSplit(n_splits=1, test_size=test_size, random_state=seed)
    train, _ = next(outer.split(np.zeros(len(labels)), labels))
    inner = StratifiedShuffleSplit(n_splits=1, test_size=test_size, random_state=seed)
    fit, val = next(inner.split(np.zeros(len(train)), labels[train]))
    return train[fit], train[val]


def run_seed(config: dict, data, seed: int, work: Path) -> dict:
    fit, val = inner_split(data.labels, seed, config["test_size"])
    work.mkdir(parents=True, exist_ok=True)
    train_path, val_path = write_h5ad(data, fit, work / "train.h5ad"), write_h5ad(data, val, work / "val.h5ad")
    run_pipeline(train_path, work / "run", parse_settings(config["pipeline_options"]), reuse=config["reuse_runs"])
    labels = data.labels[val]
    results = {}
    for method, stage in STAGES.items():
        probs, classes, _ = predict_stage(config["mc_samples"], work / "run" / stage, val_path, work / f"pred_{stage}")
        info = stage_info(work / "run" / stage)
        raw = tempered(probs[None], 1 / info["ensemble_temperature"])[0]  # the pooled probabilities, untempered
        temperature = info["ensemble_temperature_fitted"]
        codes = np.searchsorted(classes, labels)
        variants = {"fitted_temperature": tempered(raw[None], temperature)[0], "no_temperature": raw,
                    "sharpening_only": tempered(raw[None], sharpening_only(temperature))[0]}
        results[method] = {variant: {k: classification_metrics(p, codes, classes)[k] for k in ("accuracy", "nll", "ece")}
                           for variant, p in variants.items()} | {"temperature": temperature}
    return results


def main(argv: list[str] | None = None) -> int:
    config, args = parse_config(__doc__.splitlines()[0], REAL, SMOKE, argv)
    report = Report(NAME, "Ensemble temperature on inner validation splits (design seeds)", config, args.out_dir)
    bundled = load_pbmc(config)
    with tempfile.TemporaryDirectory(prefix="bench_cal_") as temporary:
        root = Path(config["work_dir"] or temporary)
        for name in config["datasets"]:
            data = cpm_standin(bundled) if name == "standin" else bundled
            seeds = [seed for seed in config["seeds"] if not config["complete_only"] or all(
                stage_state(root / name / f"seed_{seed}" / "run" / stage) == "complete" for stage in STAGES.values())]
            per_seed = [run_seed(config, data, seed, root / name / f"seed_{seed}") | {"seed": seed} for seed in seeds]
            report.results[name] = per_seed
            rows = []
            for method in STAGES:
                for variant in VARIANTS:
                    values = {k: mean_std([r[method][variant][k] for r in per_seed]) for k in ("accuracy", "nll", "ece")}
                    rows.append([method, variant, values["accuracy"], values["nll"], values["ece"],
                                 mean_std([r[method]["temperature"] for r in per_seed])])
            report.table(f"{DATASETS[name]}: inner validation cells, mean ± std over design seeds {seeds}",
                         ["stage", "variant", "accuracy", "NLL", "ECE", "temperature"], rows)
            print(f"  {name}: " + "; ".join(f"{r[0]} {r[1]} NLL {r[3]['mean']:.3f} ECE {r[4]['mean']:.3f}" for r in rows),
                  flush=True)
    report.notes.append("The temperature is fitted by the pipeline itself to the out-of-fold validation predictions of "
                        "the inner training cells; the inner validation cells only judge the choice.")
    report.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
