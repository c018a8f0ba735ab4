"""The README's notebook example runs as written (with the demo preset shrunk to test size) and reaches the Bayesian,
pruned final model with its uncertainty."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import scanpy as sc

import options

ROOT = Path(__file__).resolve().parent.parent


def notebook_example() -> str:
    """The first python block under the README's 'Notebook' heading."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("### Notebook"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def tiny_preset(real):
    """The real preset with a test-sized model and schedule; every other value (the method's) as the preset has it."""
    def load(name):
        stages = real(name)
        for stage in options.STAGES:
            stages[stage] |= {"cv_splits": 2, "batch_size": 32, "device": "cpu"}
        stages["A"] |= {"dim": 8, "depth": 1, "heads": 2, "dim_head": 4, "h_dim": 8, "epoch": 1}
        stages["B1"] |= {"epoch": 1}
        return stages
    return load


def test_the_readme_notebook_example_runs_and_reaches_the_pruned_bayesian_model(tmp_path, monkeypatch):
    monkeypatch.setattr(options, "load_preset", tiny_preset(options.load_preset))
    monkeypatch.chdir(tmp_path)
    sc.datasets.pbmc68k_reduced()[:120].copy().write_h5ad("new.h5ad")
    namespace: dict = {}
    with pytest.warns(UserWarning, match="use_raw"):  # the scaled .X: .raw is read, with a notice
        exec(compile(notebook_example(), "README.md", "exec"), namespace)
    result, new_adata = namespace["result"], namespace["new_adata"]
    manifest = options.json.loads((Path(namespace["runs"]["final_model"]) / "manifest.json").read_text())
    assert manifest["stage"] == "B2" and manifest["options"]["bayes_head"]
    assert result.probability_matrix.shape == (120, len(manifest["classes"]))
    for column in ("pred_label", "pred_entropy", "pred_mutual_info", "pred_majority_label"):
        assert column in new_adata.obs, column
    assert (new_adata.obs["pred_mutual_info"] > 0).any()  # Monte Carlo samples of a Bayesian head disagree somewhere
