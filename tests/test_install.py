"""The project installs as a package: `pip install .` puts every module where a fresh environment imports it from,
away from the checkout, and pyproject.toml lists the same modules and dependencies as the repository holds."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import site
import subprocess
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = ["finetune_sparse", "predict_updated", "bayesian_sparse_transformer", "novelty", "checkpoints", "utils",
           "performer_pytorch"]
SCRIPTS = ["bst-train", "bst-baseline", "bst-predict"]


def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11")
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def requirement_lines(name: str) -> list[str]:
    lines = (ROOT / name).read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith(("#", "-r"))]


def test_pyproject_lists_every_top_level_module_and_the_requirements_files_dependencies():
    config = pyproject()
    assert sorted(config["tool"]["setuptools"]["py-modules"]) == sorted(p.stem for p in ROOT.glob("*.py"))
    assert config["tool"]["setuptools"]["packages"] == ["performer_pytorch", "presets"]
    runtime = requirement_lines("requirements.txt")
    # torch only bounded below: GPU users bring their own build; requirements.txt pins the tested CPU one
    assert [r for r in config["project"]["dependencies"] if not r.startswith("torch")] == \
        [r for r in runtime if not r.startswith("torch")]
    assert "torch>=2.1" in config["project"]["dependencies"]
    # the reference performer-pytorch shares our package's import name: tests only, through requirements-dev.txt
    assert config["project"]["optional-dependencies"]["dev"] == \
        [r for r in requirement_lines("requirements-dev.txt") if not r.startswith("performer-pytorch")]


def copy_sources(target: Path) -> Path:
    """What a clone holds for the build, copied so the build's egg-info and build/ land outside the checkout."""
    target.mkdir()
    for path in [*ROOT.glob("*.py"), ROOT / "pyproject.toml", ROOT / "README.md", ROOT / "LICENSE"]:
        shutil.copy2(path, target / path.name)
    for package in ("performer_pytorch", "presets"):
        shutil.copytree(ROOT / package, target / package, ignore=shutil.ignore_patterns("__pycache__"))
    return target


def test_a_non_editable_install_is_imported_from_the_environment_not_the_checkout(tmp_path):
    for tool in ("pip", "setuptools"):
        if importlib.util.find_spec(tool) is None:
            pytest.skip(f"{tool} is not installed here, so nothing can be installed offline")
    env_dir = tmp_path / "env"
    try:
        venv.EnvBuilder(with_pip=False).create(env_dir)
    except (OSError, subprocess.CalledProcessError) as err:
        pytest.skip(f"cannot create a virtual environment here: {err}")
    python = env_dir / "bin" / "python"
    env_site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                              capture_output=True, text=True, check=True).stdout.strip()
    # This interpreter's installed packages (torch, scanpy, pip, setuptools, ...) seen from the new environment, after
    # its own site-packages: nothing is downloaded, and what the install writes there comes first.
    ours = dict.fromkeys([*site.getsitepackages(), sysconfig.get_path("purelib"), sysconfig.get_path("platlib")])
    Path(env_site, "_test_install_deps.pth").write_text("".join(f"{p}\n" for p in ours if Path(p).is_dir()))
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    source = copy_sources(tmp_path / "source")
    install = subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                              "--no-index", "--disable-pip-version-check", str(source)],
                             capture_output=True, text=True, cwd=tmp_path, env=clean, timeout=300)
    assert install.returncode == 0, install.stdout + install.stderr
    shutil.rmtree(source)  # the installed modules must not need their source tree
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = f"import importlib\nfor name in {MODULES!r}:\n    print(importlib.import_module(name).__file__)"
    run = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd=elsewhere, env=clean, timeout=300)
    assert run.returncode == 0, run.stderr
    files = [Path(line).resolve() for line in run.stdout.splitlines() if line.strip()]
    assert len(files) == len(MODULES)
    for name, file in zip(MODULES, files):
        assert file.is_relative_to(Path(env_site).resolve()), f"{name} imported from {file}, not the environment"
        assert not file.is_relative_to(ROOT), f"{name} imported from the checkout"
    bin_dir = python.parent
    assert all((bin_dir / script).exists() for script in SCRIPTS)
    # a console script runs its module's main(): --help needs no data
    help_text = subprocess.run([bin_dir / "bst-predict", "--help"], capture_output=True, text=True, cwd=elsewhere,
                               env=clean, timeout=300)
    assert help_text.returncode == 0 and re.search(r"--model_path", help_text.stdout), help_text.stderr
    # the presets travel with the install: a notebook outside the checkout reaches the tuned settings
    preset = subprocess.run([python, "-c", "import options; print(options.load_preset('demo')['A']['dim'])"],
                            capture_output=True, text=True, cwd=elsewhere, env=clean, timeout=300)
    assert preset.returncode == 0 and preset.stdout.strip() == "32", preset.stderr
