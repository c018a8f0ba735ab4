"""A really full disk: a small tmpfs mounted for the test. Prediction and training end with one line `error: cannot
write ...: No space left on device` and exit status 2 (no traceback, no HDF5 noise, no bus error), leave no partial or
temp file, and leave an earlier run's complete outputs exactly as they were."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from test_cli_errors import BIN_NUM, CLASSES, GENES, TINY, make_adata, tiny_model

import utils
from checkpoints import save_checkpoint

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mounts a tmpfs (Linux)")

ROOT = Path(__file__).resolve().parent.parent
NO_SPACE = "No space left on device"


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Callable[[str], Path]]:
    """mount(size) -> a fresh tmpfs of that size (e.g. '200k'); all are unmounted at the end."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        point = tmp_path / f"disk{len(mounted)}"
        point.mkdir()
        if shutil.which("mount") is None:
            pytest.skip("no mount command to create a small full disk")
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"mounting a small tmpfs is not permitted here (needs root): {result.stderr.strip()}")
        mounted.append(point)
        return point

    try:
        yield mount
    finally:
        for point in mounted:
            subprocess.run(["umount", "-l", str(point)], capture_output=True, check=False)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """A Stage A model, its 48-cell data set (outputs fit in 200 kB, plots of labelled data do not) and a 1500-cell
    one (its .h5ad alone does not fit)."""
    root = tmp_path_factory.mktemp("full_disk")
    make_adata().write_h5ad(root / "small.h5ad")
    rng = np.random.default_rng(1)
    large = np.where(rng.random((1500, len(GENES))) < 0.5, 0, rng.uniform(0, 4, (1500, len(GENES))))
    make_adata(large).write_h5ad(root / "large.h5ad")
    save_checkpoint(root / "model.pth", tiny_model(), genes=GENES, classes=CLASSES, bin_num=BIN_NUM, stage="A")
    return {"small": root / "small.h5ad", "large": root / "large.h5ad", "model": root / "model.pth"}


PROGRESS_LINE = re.compile(r"^predicting \(.*\): [\d,]+(/[\d,]+)? cells")


def run_script(script: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)


def predict(inputs: dict[str, Path], data: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    # One deterministic sample and the confidence rule keep stderr free of warnings about the Stage A model.
    return run_script("predict_updated.py", "--data_path", str(inputs[data]), "--model_path", str(inputs["model"]),
                      "--output_dir", str(out), "--device", "cpu", "--bayes_mc_samples", "1", "--unassign_by",
                      "confidence", *extra)


def assert_no_space_error(result: subprocess.CompletedProcess, file_name: str | None = None) -> None:
    assert result.returncode == 2, result.stderr
    # a slow machine also logs timed progress lines (every 10 s away from a terminal): status, not the error
    lines = [line for line in result.stderr.strip().splitlines() if not PROGRESS_LINE.match(line)]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    assert lines[0].startswith("error: cannot write ") and NO_SPACE in lines[0], lines[0]
    if file_name is not None:
        assert f"{file_name}: {NO_SPACE}" in lines[0], lines[0]
    assert "Traceback" not in result.stderr + result.stdout and "HDF5" not in result.stderr


def files_on(disk: Path) -> dict[str, str]:
    """Every file on the disk with its hash; the output directory's lock file is not an output."""
    return {str(p.relative_to(disk)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(disk.rglob("*")) if p.is_file() and p.name != ".lock"}


# ---- prediction ---------------------------------------------------------------------------------------------------


def test_prediction_that_does_not_fit_is_one_line_error_and_leaves_nothing(inputs, small_disk):
    disk = small_disk("200k")
    result = predict(inputs, "small", disk / "out", "--label_key", "cell_type")  # with plots: about 250 kB
    assert_no_space_error(result)
    assert files_on(disk) == {}


def test_outputs_of_many_cells_that_do_not_fit_are_one_line_error_and_leave_nothing(inputs, small_disk):
    disk = small_disk("200k")
    # the CSV files, written as chunks finish, fill it first: the .h5ad of a file input holds no expression matrix
    assert_no_space_error(predict(inputs, "large", disk / "out"))
    assert files_on(disk) == {}


def test_earlier_complete_outputs_stay_untouched_when_the_new_ones_do_not_fit(inputs, small_disk):
    disk = small_disk("200k")
    out = disk / "out"
    first = predict(inputs, "small", out)
    assert first.returncode == 0, first.stderr
    before = files_on(disk)
    assert {"out/predictions.h5ad", "out/predictions.csv", "out/run.json"} <= set(before)
    assert_no_space_error(predict(inputs, "large", out, "--overwrite"))
    assert files_on(disk) == before
    again = predict(inputs, "small", out, "--overwrite", "--seed", "3")  # and the directory is still usable
    assert again.returncode == 0, again.stderr


def test_h5ad_write_that_fills_the_disk_midway_is_output_error_and_leaves_nothing(small_disk, monkeypatch):
    """Past the free-space check (another process may fill the disk meanwhile): HDF5 never writes to the full disk
    itself, so the failure is one OSError from write(), reported with the path, and the old file stays."""
    disk = small_disk("200k")
    old = disk / "predictions.h5ad"
    old.write_bytes(b"the earlier complete output")
    monkeypatch.setattr(utils, "_check_free_space", lambda path, size: None)
    rng = np.random.default_rng(0)
    adata = make_adata(rng.uniform(1, 4, (3000, len(GENES))), labels=[CLASSES[i % 3] for i in range(3000)])
    with pytest.raises(utils.OutputError, match=f"cannot write {old}: {NO_SPACE}"):
        utils.write_h5ad(old, adata)
    assert old.read_bytes() == b"the earlier complete output"
    assert [p.name for p in disk.iterdir()] == ["predictions.h5ad"]


def test_text_write_that_fills_the_disk_is_output_error_and_leaves_nothing(small_disk):
    disk = small_disk("200k")
    with pytest.raises(utils.OutputError, match=f"cannot write .*table.csv: {NO_SPACE}"):
        with utils.atomic_write(disk / "table.csv") as handle:
            for _ in range(30_000):
                handle.write("cell,0.123456789\n")
    assert list(disk.iterdir()) == []


def test_leftover_temp_file_of_a_killed_write_is_removed_by_the_next_write(tmp_path):
    ours = tmp_path / ".tmp-predictions.h5ad-abc123"
    theirs = [tmp_path / ".tmp-predictions.csv-def456", tmp_path / ".tmp-predictions.h5ad-v2-gh789"]
    for path in (ours, *theirs):
        path.write_bytes(b"half a file")
    utils.write_h5ad(tmp_path / "predictions.h5ad", make_adata())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*(p.name for p in theirs), "predictions.h5ad"])


def test_leftover_temp_file_of_a_killed_prediction_does_not_block_a_rerun(inputs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".tmp-predictions.h5ad-abc123").write_bytes(b"half a file")  # the run was killed while writing
    result = predict(inputs, "small", out)  # no --overwrite: the leftover is not an output
    assert result.returncode == 0, result.stderr
    assert not list(out.glob(".tmp-*")) and (out / "predictions.h5ad").is_file()


# ---- training -----------------------------------------------------------------------------------------------------


def test_checkpoint_that_does_not_fit_is_one_line_error_without_temp_files(inputs, small_disk):
    disk = small_disk("64k")  # the run's small files fit, its checkpoints do not
    result = run_script("finetune_sparse.py", *TINY, "--data_path", str(inputs["small"]), "--ckpt_dir",
                        str(disk / "run"), "--model_name", "run")
    assert_no_space_error(result)
    assert ".pth" in result.stderr
    assert not [name for name in files_on(disk) if Path(name).name.startswith(".tmp-") or name.endswith(".pth")]


def test_training_on_a_disk_too_full_for_its_log_is_one_line_error(inputs, small_disk):
    disk = small_disk("8k")
    result = run_script("finetune_sparse.py", *TINY, "--data_path", str(inputs["small"]), "--ckpt_dir",
                        str(disk / "run"), "--model_name", "run")
    assert_no_space_error(result)
