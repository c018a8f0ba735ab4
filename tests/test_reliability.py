"""Reliability and safety of the CLIs and scripts: inputs and earlier runs are never lost, untrusted checkpoints run no
code, configuration is JSON, the shell scripts survive odd paths, runs repeat exactly, and a failing DDP rank stops
the whole job."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import finetune_sparse
import options
import predict_updated
from bayesian_sparse_transformer import BayesianSparseTransformer, HeadConfig, ModelConfig
from checkpoints import CHECKPOINT_FORMAT, load_checkpoint, save_checkpoint
from options import PredictConfig, TrainConfig
from performer_pytorch import PerformerConfig

pytestmark = pytest.mark.filterwarnings("ignore:the checkpoint's head is deterministic")

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"
GENES = [f"GENE{i}" for i in range(20)]
CLASSES = ["B cell", "NK", "T cell"]
N_CELLS = 48
BIN_NUM = 5
SEED = 7
NOT_REPRODUCIBLE_COLUMNS = ["seconds", "peak_mem_mb"]  # wall time and GPU memory differ between identical runs


def make_adata() -> anndata.AnnData:
    """48 cells of three classes that each raise a block of genes; log-normalized-looking values below BIN_NUM."""
    rng = np.random.default_rng(0)
    x = np.where(rng.random((N_CELLS, len(GENES))) < 0.5, 0, rng.uniform(0, 3, (N_CELLS, len(GENES))))
    labels = [CLASSES[i % 3] for i in range(N_CELLS)]
    for row in range(N_CELLS):
        x[row, 6 * (row % 3) : 6 * (row % 3) + 6] += 1.5
    obs = pd.DataFrame({"cell_type": labels}, index=[f"cell{i}" for i in range(N_CELLS)])
    return anndata.AnnData(X=sp.csr_matrix(x.astype(np.float32)), obs=obs, var=pd.DataFrame(index=GENES))


def save_stage_a_checkpoint(path: Path) -> None:
    """A tiny deterministic (Stage A) model on GENES/CLASSES, as Stage B and prediction expect it."""
    torch.manual_seed(0)
    seq_len = len(GENES) + 1
    encoder = PerformerConfig(num_tokens=BIN_NUM + 2, max_seq_len=seq_len, dim=16, depth=1, heads=2, dim_head=8,
                              nb_features=16)
    head = HeadConfig(seq_len=seq_len, dim=16, num_classes=len(CLASSES), hidden1=16, hidden2=16)
    model = BayesianSparseTransformer(ModelConfig(encoder, head))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, model, genes=GENES, classes=CLASSES, bin_num=BIN_NUM, stage="A")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): sha256(p) for p in sorted(directory.rglob("*")) if p.is_file()}


def stage_b_argv(data: Path, model: Path, out: Path, *extra: str) -> list[str]:
    """Stage B from a Stage A checkpoint, with Monte Carlo validation and two pruning levels: every random part."""
    return ["--data_path", str(data), "--model_path", str(model), "--bayes_head", "--epoch", "2",
            "--pre_warm_epochs", "1", "--kl_anneal_steps", "2", "--mc_samples", "2", "--mc_samples_eval", "2",
            "--prune_target", "0.2", "--prune_step", "0.1", "--prune_ft_epochs", "1", "--prune_rule", "f1", "--prune_f1_tol", "1.0",
            "--batch_size", "16", "--grad_acc", "1", "--learning_rate", "2e-3", "--seed", str(SEED),
            "--device", "cpu", "--ckpt_dir", str(out), "--model_name", "run", *extra]


def predict_argv(data: Path, model: Path, out: Path, *extra: str) -> list[str]:
    return ["--data_path", str(data), "--model_path", str(model), "--label_key", "cell_type", "--bayes_mc_samples", "4",
            "--seed", "3", "--device", "cpu", "--output_dir", str(out), *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Two identical Stage B trainings and two identical predictions from the first one's best model."""
    root = tmp_path_factory.mktemp("runs")
    data, start = root / "data.h5ad", root / "stageA.pth"
    make_adata().write_h5ad(data)
    save_stage_a_checkpoint(start)
    inputs = {path: sha256(path) for path in (data, start)}
    for name in ("train1", "train2"):
        assert finetune_sparse.main(stage_b_argv(data, start, root / name)) == 0
    best = root / "train1" / "run0_best.pth"
    inputs[best] = sha256(best)
    for name in ("predict1", "predict2"):
        assert predict_updated.main(predict_argv(data, best, root / name)) == 0
    return {"root": root, "data": data, "start": start, "best": best, "input_hashes": inputs}


# ---- reproducible -----------------------------------------------------------------------------------------------


def test_same_seed_gives_identical_training_metrics_predictions_and_weights(runs):
    first, second = runs["root"] / "train1", runs["root"] / "train2"
    metrics = [pd.read_csv(d / "run0_metrics.csv").drop(columns=NOT_REPRODUCIBLE_COLUMNS) for d in (first, second)]
    assert set(metrics[0]["phase"]) >= {"prewarm", "train", "prune_ft", "prune"}, "the run should exercise every phase"
    pd.testing.assert_frame_equal(*metrics, check_exact=True)
    for name in ("run0_val_predictions.csv", "run0_val_cells.txt"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    weights = [torch.load(d / "run0_best.pth", weights_only=True)["state_dict"] for d in (first, second)]
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key


def test_same_seed_gives_identical_prediction_files(runs):
    first, second = runs["root"] / "predict1", runs["root"] / "predict2"
    for name in ("predictions.csv", "probabilities.csv", "metrics.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    probabilities = pd.read_csv(first / "probabilities.csv")
    assert probabilities.shape == (N_CELLS, 1 + len(CLASSES))


def test_training_run_records_seed_versions_and_every_argument_as_json(runs):
    directory = runs["root"] / "train1"
    with open(directory / "run_config.json", encoding="utf-8") as handle:
        config = json.load(handle)  # JSON, read without running anything
    expected = options.cli_config(TrainConfig, stage_b_argv(runs["data"], runs["start"], directory), "").as_dict()
    # Recorded as used: the checkpoint's binning (scBERT's width bins here), which --binning/--bin_num/--bin_width left open.
    expected["binning"], expected["bin_num"], expected["bin_width"] = "width", 5, 1.0
    assert config["args"].keys() == expected.keys()
    assert config["args"] == json.loads(json.dumps(expected))
    assert config["args"]["seed"] == SEED
    for package in ("python", "torch", "numpy", "anndata", "scikit-learn"):
        assert config["versions"][package], package
    assert config["versions"]["torch"] == str(torch.__version__)
    for kind in ("best", "last"):
        checkpoint = load_checkpoint(directory / f"run0_{kind}.pth")
        assert checkpoint.args["seed"] == SEED
        assert checkpoint.versions["torch"] == str(torch.__version__)


def test_prediction_records_seed_versions_and_arguments(runs):
    directory = runs["root"] / "predict1"
    with open(directory / "run.json", encoding="utf-8") as handle:
        record = json.load(handle)
    assert record["args"].keys() == {spec.name for spec in fields(PredictConfig)}
    assert record["args"]["seed"] == 3 and record["args"]["bayes_mc_samples"] == 4
    assert record["versions"]["torch"] == str(torch.__version__)
    assert record["checkpoint_versions"]["torch"] == str(torch.__version__)
    metadata = anndata.read_h5ad(directory / "predictions.h5ad").uns["pred"]
    assert int(metadata["seed"]) == 3
    assert metadata["versions"]["torch"] == str(torch.__version__)


# ---- nothing lost -------------------------------------------------------------------------------------------------


def test_training_and_prediction_never_modify_their_inputs(runs):
    for path, digest in runs["input_hashes"].items():
        assert sha256(path) == digest, f"{path.name} changed"


def test_second_training_run_refuses_to_overwrite_without_flag(runs, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(runs["root"] / "train1", out)
    before = snapshot(out)
    capsys.readouterr()
    assert finetune_sparse.main(stage_b_argv(runs["data"], runs["start"], out)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert "earlier run" in err and "--overwrite" in err and "--resume" in err
    assert snapshot(out) == before

    assert finetune_sparse.main(stage_b_argv(runs["data"], runs["start"], out, "--overwrite")) == 0
    assert json.loads((out / "run_config.json").read_text(encoding="utf-8"))["args"]["overwrite"] is True
    rerun, original = (pd.read_csv(d / "run0_metrics.csv").drop(columns=NOT_REPRODUCIBLE_COLUMNS)
                       for d in (out, runs["root"] / "train1"))
    pd.testing.assert_frame_equal(rerun, original)  # replaced by a complete run, not appended to
    assert not [p.name for p in out.iterdir() if p.name.startswith(".tmp")]


def test_prediction_refuses_a_non_empty_output_dir_without_overwrite(runs, tmp_path, capsys):
    out = tmp_path / "predictions"
    shutil.copytree(runs["root"] / "predict1", out)
    (out / "my_notes.txt").write_text("keep me\n", encoding="utf-8")
    before = snapshot(out)
    capsys.readouterr()
    assert predict_updated.main(predict_argv(runs["data"], runs["best"], out)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "not empty" in err and "--overwrite" in err
    assert snapshot(out) == before

    # --overwrite swaps the whole directory: one holding the user's own files is refused, and they stay
    assert predict_updated.main(predict_argv(runs["data"], runs["best"], out, "--overwrite")) == 2
    assert "my_notes.txt" in capsys.readouterr().err and snapshot(out) == before
    (out / "my_notes.txt").unlink()
    assert predict_updated.main(predict_argv(runs["data"], runs["best"], out, "--overwrite")) == 0
    assert (out / "predictions.csv").read_bytes() == (runs["root"] / "predict1" / "predictions.csv").read_bytes()


# ---- untrusted checkpoints ------------------------------------------------------------------------------------------


class RunsShellCommand:
    """Unpickling this object runs `touch MARKER`: a stand-in for any code hidden in someone else's checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def malicious_checkpoint(directory: Path, kind: str) -> tuple[Path, Path]:
    marker = directory / "PWNED"
    payload = RunsShellCommand(marker)
    if kind == "ours":
        content = {"format": CHECKPOINT_FORMAT, "model_config": payload, "state_dict": {}, "genes": GENES}
    else:  # dressed up as scBERT's pretrained encoder
        content = {"model_state_dict": {"performer.net.layers.0.0.norm.weight": payload}}
    path = directory / "shared_model.pth"
    torch.save(content, path)
    return path, marker


def test_malicious_checkpoint_would_run_code_with_an_unsafe_loader(tmp_path):
    """Control: the crafted file really is dangerous, so the refusals below mean something."""
    path, marker = malicious_checkpoint(tmp_path, "ours")
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("kind", ["ours", "scbert"])
@pytest.mark.parametrize("cli", ["finetune", "predict"])
def test_checkpoint_that_would_run_code_is_refused(cli, kind, runs, tmp_path, capsys):
    path, marker = malicious_checkpoint(tmp_path, kind)
    out = tmp_path / "out"
    if cli == "finetune":
        code = finetune_sparse.main(stage_b_argv(runs["data"], path, out))
    else:
        code = predict_updated.main(predict_argv(runs["data"], path, out))
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: refusing to load") and "\n" not in err and "trust" in err
    assert not marker.exists()
    assert not out.exists()


def test_checkpoint_that_would_run_code_is_refused_by_the_prediction_process(runs, tmp_path):
    path, marker = malicious_checkpoint(tmp_path, "ours")
    argv = predict_argv(runs["data"], path, tmp_path / "out")
    result = subprocess.run([sys.executable, "predict_updated.py", *argv], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("error: refusing to load") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr + result.stdout
    assert not marker.exists()


def project_files(*suffixes: str) -> list[Path]:
    """Tracked and new (not ignored) files of the project, tests excluded."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    return [ROOT / name for name in listed
            if name.endswith(suffixes) and not name.startswith("tests/") and (ROOT / name).is_file()]


def unsafe_calls(source: str) -> list[str]:
    """eval/exec, pickle-based loading and torch/numpy loads that allow pickled objects, found in Python code."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
        if name in ("eval", "exec", "__import__") or name.split(".")[-1] in ("read_pickle", "unsafe_load"):
            found.append(name)
        elif name.split(".")[0] in ("pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve") and "load" in name:
            found.append(name)
        elif name == "torch.load" and keywords.get("weights_only") != "True":
            found.append("torch.load without weights_only=True")
        elif keywords.get("allow_pickle") not in (None, "False") or keywords.get("weights_only") == "False":
            found.append(f"{name} allowing pickles")
    return found


def test_project_code_never_evaluates_or_unpickles():
    python_files = project_files(".py")
    assert ROOT / "finetune_sparse.py" in python_files and ROOT / "predict_updated.py" in python_files
    problems = []
    for path in python_files:
        source = path.read_text(encoding="utf-8")
        problems += [f"{path.name}: {call}" for call in unsafe_calls(source)]
        problems += [f"{path.name}: {text!r}" for text in ("weights_only=False", "pickle.load", "allow_pickle=True")
                     if text in source]
    for path in project_files(".sh"):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(r"(^|[\s;&|(`])(eval|exec)\b", code):
                problems.append(f"{path.name}:{number}: {line.strip()}")
    assert not problems


# ---- shell scripts --------------------------------------------------------------------------------------------------


SHELL_SCRIPTS = ["train_sparse.sh", "stageb_round1.sh", "stageb_round2.sh", "pipeline_common.sh"]


def test_shell_scripts_pass_shellcheck():
    shellcheck = shutil.which("shellcheck", path=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed")
    result = subprocess.run([shellcheck, "-x", *SHELL_SCRIPTS], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def script_env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("START_CKPT", "RUN_DIR", "DATA_PATH", "PRESET")}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    return {**env, **settings}


@pytest.mark.parametrize("start", [None, "", "missing.pth", "a directory"])
@pytest.mark.parametrize("script", ["stageb_round1.sh", "stageb_round2.sh"])
def test_stage_b_scripts_need_an_existing_start_checkpoint(script, start, tmp_path):
    (tmp_path / "a directory").mkdir()
    settings = {"RUN_DIR": str(tmp_path / "run"), "PRESET": "demo"}
    if start is not None:
        settings["START_CKPT"] = start
    result = subprocess.run(["bash", str(ROOT / script)], cwd=tmp_path, env=script_env(**settings),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert not (tmp_path / "run").exists()


def test_stage_b_round1_works_with_spaces_in_every_path(tmp_path):
    data = tmp_path / "my data" / "pbmc tiny.h5ad"
    data.parent.mkdir()
    make_adata().write_h5ad(data)
    start = tmp_path / "stage A ckpts" / "stageA0 best.pth"
    save_stage_a_checkpoint(start)
    run_dir = tmp_path / "run dir"
    settings = {"PRESET": "demo", "START_CKPT": str(start), "RUN_DIR": str(run_dir), "DATA_PATH": str(data),
                "LABEL_KEY": "cell_type", "EPOCHS_B": "1", "PRE_WARM_EPOCHS": "0", "MC_SAMPLES": "2",
                "BATCH_SIZE": "16", "DEVICE": "cpu", "NPROC": "1", "SEED": str(SEED)}
    result = subprocess.run(["bash", str(ROOT / "stageb_round1.sh")], cwd=tmp_path, env=script_env(**settings),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my data", "run dir", "stage A ckpts"]  # nothing split
    checkpoint = load_checkpoint(run_dir / "stageB1" / "stageB10_best.pth")
    assert checkpoint.stage == "B" and checkpoint.model.is_bayesian
    assert checkpoint.model.config.encoder.dim == 16  # the architecture came from the Stage A file, not DIM=32
    config = json.loads((run_dir / "stageB1" / "stageB1_config.json").read_text(encoding="utf-8"))["args"]
    assert config["data_path"] == str(data) and config["model_path"] == str(start)
    assert config["epoch"] == 1 and config["seed"] == SEED


# ---- distributed faults ---------------------------------------------------------------------------------------------


FAILING_RANK = """
import os, sys
sys.path.insert(0, {root!r})
import finetune_sparse

if os.environ["RANK"] == "1":
    def fail(*args, **kwargs):
        raise RuntimeError("injected failure on rank 1")

    finetune_sparse.train_epoch = fail  # rank 0 goes on into its first all-reduce and waits there
sys.exit(finetune_sparse.main(sys.argv[1:]))
"""


def test_ddp_run_where_one_rank_fails_stops_every_rank_with_the_error(runs, tmp_path):
    script = tmp_path / "failing_rank.py"
    script.write_text(FAILING_RANK.format(root=str(ROOT)), encoding="utf-8")
    argv = ["--data_path", str(runs["data"]), "--dim", "16", "--depth", "1", "--heads", "2", "--dim_head", "8",
            "--h_dim", "16", "--epoch", "1", "--batch_size", "16", "--grad_acc", "1", "--device", "cpu",
            "--ckpt_dir", str(tmp_path / "run")]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
               *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"the job hung after rank 1 failed:\n{output[-3000:]}")
    assert process.returncode != 0
    assert "injected failure on rank 1" in output
    assert time.monotonic() - started < 90


def test_resume_removes_this_runs_leftover_temporary_files(tmp_path):
    """A kill during an atomic write leaves .tmp-<target>-*; --resume clears this run's and keeps others'."""
    import finetune_sparse

    files = finetune_sparse.RunFiles(tmp_path, "run")
    ours = tmp_path / ".tmp-run0_last.pth-abc123"
    theirs = tmp_path / ".tmp-other0_last.pth-def456"
    for path in (ours, theirs):
        path.write_bytes(b"partial")
    config = finetune_sparse.default_config(ckpt_dir=str(tmp_path), model_name="run", resume=True)
    finetune_sparse.create_outputs(config, files, finetune_sparse.Dist(), existing=[], fingerprint={})
    assert not ours.exists() and theirs.exists()


def test_resume_names_a_setting_the_interrupted_run_did_not_record(tmp_path):
    """A run saved by another version lacks a setting: --resume refuses, naming it with both values."""
    from utils import UserError

    files = finetune_sparse.RunFiles(tmp_path, "run")
    old_settings = finetune_sparse.default_config(ckpt_dir=str(tmp_path), model_name="run").as_dict()
    del old_settings["novelty_input_pcs"]
    files.config.write_text(json.dumps({"args": old_settings}))
    with pytest.raises(UserError, match=r"novelty_input_pcs \(interrupted run: None, now: 100\)"):
        finetune_sparse.check_outputs(finetune_sparse.default_config(ckpt_dir=str(tmp_path), model_name="run",
                                                                     resume=True), files)
