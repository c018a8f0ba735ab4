"""A failed write (disk full) of any output is one line `error: cannot write PATH: CAUSE`, exit status 2, and leaves
neither a partial file nor a temp file behind; predictions.csv and the .h5ad's obs share their column names."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import anndata
import h5py
import numpy as np
import pandas as pd
import pytest
from test_cli_errors import BIN_NUM, CLASSES, GENES, TINY, make_adata, tiny_model

import finetune_sparse
import predict_updated
import utils
from checkpoints import save_checkpoint

pytestmark = [
    pytest.mark.filterwarnings("ignore:the checkpoint's head is deterministic"),  # Stage A checkpoints
    pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux) to fill the disk"),
]

NO_SPACE = "No space left on device"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("write_errors")
    make_adata().write_h5ad(root / "data.h5ad")
    save_checkpoint(root / "model.pth", tiny_model(), genes=GENES, classes=CLASSES, bin_num=BIN_NUM, stage="A")
    return {"data": root / "data.h5ad", "model": root / "model.pth"}


def predict_argv(files: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["--data_path", str(files["data"]), "--model_path", str(files["model"]), "--output_dir", str(out),
            "--device", "cpu", "--bayes_mc_samples", "2", "--label_key", "cell_type", *extra]


# ---- a full disk, for one output only -------------------------------------------------------------------------


def fill_disk_for(monkeypatch, target: str) -> None:
    """atomic_write's temp file for `target` is opened on /dev/full, where every write fails with ENOSPC."""
    real_open = open

    def open_on_full_disk(file, mode="r", *args, **kwargs):
        if Path(file).name.startswith(f".tmp-{target}-"):
            return real_open("/dev/full", mode, *args, **kwargs)
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(utils, "open", open_on_full_disk, raising=False)  # shadows the builtin in utils only


def fill_disk_for_h5py(monkeypatch) -> None:
    """HDF5 reports a full disk inside a long message, without errno/strerror; h5py raises it as OSError."""

    def create_dataset(self, *args, **kwargs):
        raise OSError("Can't write data (file write failed: time = Mon Jan  1 00:00:00 2024, filename = 'x.h5ad', "
                      f"file descriptor = 5, errno = {errno.ENOSPC}, error message = '{NO_SPACE}', buf = 0x1, "
                      "total write size = 8192, bytes this sub-write = 8192, bytes actually written = "
                      "18446744073709551615, offset = 0)")

    monkeypatch.setattr(h5py.Group, "create_dataset", create_dataset)


def assert_write_error(capsys, code: int, path: Path) -> None:
    captured = capsys.readouterr()
    assert code == 2, captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"error: cannot write {path}: {NO_SPACE}; "), lines[0]
    assert "Traceback" not in captured.err


def temp_files(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.startswith(".tmp")]


# ---- prediction -----------------------------------------------------------------------------------------------


def test_full_disk_while_writing_the_h5ad_is_one_line_error_without_leftovers(files, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    fill_disk_for_h5py(monkeypatch)
    capsys.readouterr()
    assert_write_error(capsys, predict_updated.main(predict_argv(files, out)), out / "predictions.h5ad")
    assert not out.exists()  # a new output directory whose run wrote nothing is not left behind, nor any temp file


def test_full_disk_while_writing_the_csv_keeps_the_old_file(files, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    assert predict_updated.main(predict_argv(files, out)) == 0
    before = (out / "predictions.csv").read_bytes()
    fill_disk_for(monkeypatch, "predictions.csv")
    capsys.readouterr()
    code = predict_updated.main(predict_argv(files, out, "--overwrite", "--seed", "3"))
    assert_write_error(capsys, code, out / "predictions.csv")
    assert (out / "predictions.csv").read_bytes() == before  # the earlier run's complete file, not a torn one
    assert temp_files(out) == []


@pytest.mark.parametrize("target", ["metrics.json", "reliability.png"])
def test_full_disk_while_writing_json_or_png_is_one_line_error(files, tmp_path, monkeypatch, capsys, target):
    out = tmp_path / "out"
    fill_disk_for(monkeypatch, target)
    capsys.readouterr()
    assert_write_error(capsys, predict_updated.main(predict_argv(files, out)), out / target)
    assert not out.exists()  # outputs are written beside it and swapped in as a whole: nothing partial appears


# ---- training -------------------------------------------------------------------------------------------------


def test_full_disk_while_saving_a_checkpoint_is_one_line_error_without_leftovers(files, tmp_path, monkeypatch,
                                                                                  capsys):
    out = tmp_path / "run"
    fill_disk_for(monkeypatch, "run0_best.pth")
    capsys.readouterr()
    argv = [*TINY, "--data_path", str(files["data"]), "--ckpt_dir", str(out), "--model_name", "run"]
    assert_write_error(capsys, finetune_sparse.main(argv), out / "run0_best.pth")
    assert not (out / "run0_best.pth").exists() and temp_files(out) == []


def test_save_checkpoint_reports_the_path_of_a_failed_write(tmp_path, monkeypatch):
    """torch.save's own writer would turn the OSError into an opaque RuntimeError."""
    fill_disk_for(monkeypatch, "model.pth")
    with pytest.raises(utils.OutputError, match=f"cannot write .*model.pth: {NO_SPACE}") as caught:
        save_checkpoint(tmp_path / "model.pth", tiny_model(), genes=GENES, classes=CLASSES, bin_num=BIN_NUM,
                        stage="A")
    assert caught.value.path == tmp_path / "model.pth"
    assert list(tmp_path.iterdir()) == []


# ---- run_cli's safety net for other file errors -----------------------------------------------------------------


def test_run_cli_turns_a_file_error_into_one_line(tmp_path, capsys):
    missing = tmp_path / "no_such_dir" / "train.log"
    assert utils.run_cli(lambda: open(missing, "w")) == 2
    assert capsys.readouterr().err == f"error: cannot access {missing}: No such file or directory; check the path, " \
                                      "free space and permissions\n"


def test_run_cli_keeps_the_traceback_of_an_os_error_without_a_file():
    def job():
        raise OSError(errno.EIO, "Input/output error")

    with pytest.raises(OSError, match="Input/output"):
        utils.run_cli(job)


# ---- one set of per-cell column names -------------------------------------------------------------------------


def test_predictions_csv_and_h5ad_obs_share_column_names(files, tmp_path):
    out = tmp_path / "out"
    assert predict_updated.main(predict_argv(files, out)) == 0
    table = pd.read_csv(out / "predictions.csv")
    obs = anndata.read_h5ad(out / "predictions.h5ad").obs
    shared = ["pred_label", "pred_unassigned", *predict_updated.CELL_COLUMNS.values()]
    assert shared == ["pred_label", "pred_unassigned", "pred_confidence", "pred_entropy", "pred_expected_entropy",
                      "pred_mutual_info", "pred_std", "pred_novelty"]
    assert set(shared) <= set(table.columns) and set(shared) <= set(obs.columns)
    assert not {"confidence", "entropy", "mutual_info"} & set(table.columns)
    for column in predict_updated.CELL_COLUMNS.values():  # float32 in both; the CSV's text reads back exactly
        assert obs[column].dtype == np.float32
        np.testing.assert_array_equal(table[column].to_numpy(np.float32), obs[column].to_numpy())
