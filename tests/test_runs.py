"""A run knows what it is, and nothing is mixed or lost: the manifest, one writer per directory, --resume on the same
data only, and prediction outputs replaced as a whole even when the process is killed at random moments."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import anndata
import pytest
from test_training import data_path, one_torch_thread  # noqa: F401  (fixtures)

import predict_updated
from checkpoints import load_checkpoint
from directory_lock import locked, staged_replacement
from run_manifest import MANIFEST, read_run
from utils import UserError

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--dim", "16", "--depth", "1", "--heads", "2", "--dim_head", "8", "--h_dim", "16", "--batch_size", "16",
        "--grad_acc", "1", "--learning_rate", "1e-3", "--device", "cpu", "--label_key", "cell_type", "--prune_target", "0"]


def train_argv(data, directory, *extra):
    return [sys.executable, "finetune_sparse.py", "--data_path", str(data), *TINY, "--ckpt_dir", str(directory), *extra]


def predict_argv(data, model, out, *extra):
    return [sys.executable, "predict_updated.py", "--data_path", str(data), "--model_path", str(model), "--label_key",
            "cell_type", "--device", "cpu", "--bayes_mc_samples", "1", "--output_dir", str(out), *extra]


def run(argv, **kwargs):
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, **kwargs)


@pytest.fixture(scope="module")
def two_fold_run(data_path, tmp_path_factory):  # noqa: F811
    directory = tmp_path_factory.mktemp("runs") / "a"
    result = run(train_argv(data_path, directory, "--epoch", "1", "--cv_splits", "2", "--model_name", "a"))
    assert result.returncode == 0, result.stderr
    return directory


def test_a_finished_run_has_a_manifest_listing_members_stage_and_data(two_fold_run):
    manifest = json.loads((two_fold_run / MANIFEST).read_text())
    assert manifest["complete"] and manifest["stage"] == "A" and manifest["name"] == "a"
    assert [m["checkpoint"] for m in manifest["members"]] == ["a0_best.pth", "a1_best.pth"]
    assert set(manifest["data_fingerprint"]) >= {"cells", "genes", "values", "labels"}
    assert manifest["model_config"]["encoder"]["dim"] == 16  # the members' architecture
    assert read_run(two_fold_run).members == [two_fold_run / "a0_best.pth", two_fold_run / "a1_best.pth"]


def test_prediction_and_stage_b_refuse_an_unfinished_run(two_fold_run, data_path, tmp_path):  # noqa: F811
    unfinished = tmp_path / "unfinished"
    shutil.copytree(two_fold_run, unfinished)
    (unfinished / MANIFEST).unlink()
    (unfinished / "a1_val_predictions.csv").unlink()
    result = run(predict_argv(data_path, unfinished, tmp_path / "out"))
    assert result.returncode == 2 and "unfinished" in result.stderr and "--resume" in result.stderr
    assert "fold(s) 1" in result.stderr and not (tmp_path / "out").exists()
    stage_b = run(train_argv(data_path, tmp_path / "b", "--model_path", str(unfinished), "--bayes_head", "--epoch", "1",
                             "--cv_splits", "2"))
    assert stage_b.returncode == 2 and "unfinished" in stage_b.stderr


def test_a_directory_holds_one_run(two_fold_run, data_path, tmp_path):  # noqa: F811
    shared = tmp_path / "shared"
    shutil.copytree(two_fold_run, shared)
    second = run(train_argv(data_path, shared, "--epoch", "1", "--model_name", "b"))
    assert second.returncode == 2 and "already holds the run 'a'" in second.stderr
    assert not list(shared.glob("b*"))
    (shared / "b_config.json").write_text((shared / "a_config.json").read_text())  # as a foreign tool might leave it
    result = run(predict_argv(data_path, shared, tmp_path / "out"))
    assert result.returncode == 2 and "holds 2 runs" in result.stderr


def test_resume_refuses_changed_training_data(data_path, tmp_path):  # noqa: F811
    directory = tmp_path / "run"
    assert run(train_argv(data_path, directory, "--epoch", "1")).returncode == 0
    changed = anndata.read_h5ad(data_path)
    changed.X = changed.X * 1.5
    changed_path = tmp_path / "changed.h5ad"
    changed.write_h5ad(changed_path)
    result = run(train_argv(changed_path, directory, "--epoch", "1", "--resume"))
    assert result.returncode == 2 and "the training data changed" in result.stderr
    assert "expression values" in result.stderr


def test_a_second_writer_is_refused_while_the_first_holds_the_directory(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, '.');"
                               "from directory_lock import locked\n"
                               f"with locked({str(tmp_path / 'd')!r}):\n    print('held', flush=True); time.sleep(60)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=f"in use by process {holder.pid}"), locked(tmp_path / "d"):
            pass
        holder.send_signal(signal.SIGKILL)  # a stale lock: its process is gone
        holder.wait(timeout=30)
        with locked(tmp_path / "d"):
            pass
    finally:
        holder.kill()


def test_two_predictions_into_one_new_directory_one_is_refused(two_fold_run, data_path, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out"
    first = subprocess.Popen(predict_argv(data_path, two_fold_run, out), cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (out / ".lock").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    second = predict_updated.main(predict_argv(data_path, two_fold_run, out)[2:])  # in-process: no start-up delay
    _, first_err = first.communicate(timeout=120)
    assert first.returncode == 0, first_err
    assert second == 2 and "in use by process" in capsys.readouterr().err
    assert (out / "run.json").exists()


def test_staged_replacement_keeps_the_old_outputs_when_writing_fails(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "run.json").write_text("old")
    with pytest.raises(RuntimeError), staged_replacement(target) as staging:
        (staging / "run.json").write_text("new")
        raise RuntimeError("disk trouble")
    assert (target / "run.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with staged_replacement(target) as staging:
        (staging / "run.json").write_text("new")
    assert (target / "run.json").read_text() == "new"


def test_overwrite_killed_at_random_points_leaves_the_old_or_the_new_outputs(two_fold_run, data_path, tmp_path):  # noqa: F811
    """Kill `predict_updated.py --overwrite` at random moments: each time the directory holds one complete run's
    outputs (every file of the same run, told apart by --seed), and the next run is never blocked."""
    out = tmp_path / "out"
    assert run(predict_argv(data_path, two_fold_run, out, "--seed", "1")).returncode == 0
    expected = sorted(p.name for p in out.iterdir())
    started = time.monotonic()
    assert run(predict_argv(data_path, two_fold_run, out, "--seed", "2", "--overwrite")).returncode == 0
    duration = time.monotonic() - started
    seed = random.SystemRandom().randrange(2**32)
    rng = random.Random(seed)
    for attempt in range(6):
        process = subprocess.Popen(predict_argv(data_path, two_fold_run, out, "--seed", str(10 + attempt), "--overwrite"),
                                   cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3 * duration, 1.1 * duration))
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        # a killed process cannot remove its lock file; the next run takes the stale lock over
        assert sorted(p.name for p in out.iterdir() if p.name != ".lock") == expected, f"attempt {attempt}, seed {seed}"
        seeds = {json.loads((out / "run.json").read_text())["args"]["seed"]}
        h5ad = anndata.read_h5ad(out / "predictions.h5ad")
        assert len(h5ad.obs) > 0
        assert seeds <= {2, *range(10, 10 + attempt + 1)}, f"attempt {attempt}, seed {seed}"
    assert run(predict_argv(data_path, two_fold_run, out, "--seed", "3", "--overwrite")).returncode == 0
    assert json.loads((out / "run.json").read_text())["args"]["seed"] == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "leftovers of killed writes"


def test_overwrite_refuses_a_directory_holding_other_files(two_fold_run, data_path, tmp_path):  # noqa: F811
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = run(predict_argv(data_path, two_fold_run, out, "--overwrite"))
    assert result.returncode == 2 and "notes.txt" in result.stderr
    assert (out / "notes.txt").read_text() == "mine"


def test_pipeline_killed_in_each_stage_resumes_to_the_uninterrupted_result(data_path, tmp_path):  # noqa: F811
    """`finetune_sparse.py pipeline` killed during Stage A, B1 and B2, rerun each time: the final out-of-fold
    predictions equal those of an uninterrupted pipeline."""
    env = {**os.environ, "PRESET": "demo", "DATA_PATH": str(data_path), "LABEL_KEY": "cell_type", "EPOCHS_A": "2",
           "EPOCHS_B": "2", "CV_SPLITS": "2", "DIM": "16", "H_DIM": "16", "PRUNE_STEP": "0.3", "DEVICE": "cpu"}

    def pipeline(run_dir):
        return [sys.executable, "finetune_sparse.py", "pipeline", "--run_dir", str(run_dir)]

    whole = tmp_path / "whole"
    result = run(pipeline(whole), env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    killed = tmp_path / "killed"
    for stage in ("stageA", "stageB1", "stageB2"):
        process = subprocess.Popen(pipeline(killed), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while not list((killed / stage).glob("*0_last.pth")) and process.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    result = run(pipeline(killed), env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    for fold in range(2):
        name = f"stageB2{fold}_val_predictions.csv"
        assert (killed / "stageB2" / name).read_text() == (whole / "stageB2" / name).read_text()


def test_training_overwrite_killed_at_random_points_leaves_the_complete_old_run(data_path, tmp_path):  # noqa: F811
    """`finetune_sparse.py --overwrite` of a complete run, SIGKILLed at random moments: each time the directory
    holds the complete old run (or, when the kill came too late, the complete new one), never a mixture, and a
    finished overwrite then replaces it as a whole."""
    directory = tmp_path / "run"
    argv = train_argv(data_path, directory, "--epoch", "2", "--cv_splits", "2", "--model_name", "r")
    assert run([*argv, "--seed", "1"]).returncode == 0
    started = time.monotonic()
    assert run([*argv, "--seed", "2", "--overwrite"]).returncode == 0
    duration = time.monotonic() - started
    assert json.loads((directory / MANIFEST).read_text())["options"]["seed"] == 2
    assert run([*argv, "--seed", "1", "--overwrite"]).returncode == 0
    old_manifest = (directory / MANIFEST).read_text()
    seed = random.SystemRandom().randrange(2**32)
    rng = random.Random(seed)
    for attempt in range(4):
        process = subprocess.Popen([*argv, "--seed", str(10 + attempt), "--overwrite"], cwd=ROOT,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.2 * duration, 0.95 * duration))
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        where = f"attempt {attempt}, seed {seed}"
        manifest = (directory / MANIFEST).read_text()
        if manifest != old_manifest:  # the kill came after the swap: then it is the new complete run
            assert json.loads(manifest)["options"]["seed"] == 10 + attempt, where
            old_manifest = manifest
        members = read_run(directory).members
        assert [path.name for path in members] == ["r0_best.pth", "r1_best.pth"], where
        seeds = {load_checkpoint(path).args["seed"] for path in members}
        assert seeds == {json.loads(manifest)["options"]["seed"]}, where  # never one run's manifest, another's models
    assert run([*argv, "--seed", "3", "--overwrite"]).returncode == 0
    assert json.loads((directory / MANIFEST).read_text())["options"]["seed"] == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "leftovers of killed overwrites"


def test_a_flag_equal_to_the_default_that_contradicts_the_checkpoint_is_refused(two_fold_run, data_path, tmp_path):  # noqa: F811
    """--dim 200 is the parser's default, yet the user typed it: against a dim-16 model it is refused, not ignored."""
    result = run(train_argv(data_path, tmp_path / "b", "--model_path", str(two_fold_run), "--cv_splits", "2",
                            "--bayes_head", "--epoch", "1", "--dim", "200"))
    assert result.returncode == 2 and "--dim" in result.stderr and "16" in result.stderr, result.stderr
    assert not (tmp_path / "b").exists()
