"""The installation: pyproject.toml's modules and torch floor, the start-up check of torch, the one-line
message of a script whose optional extra is missing, and setup_env.sh's install-once stamp."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import utils

ROOT = Path(__file__).resolve().parents[1]


def pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def run_blocked(tmp_path, script, *args, blocked=(), torch_version=None):
    """Run a script as a user would, in an environment that lacks the modules `blocked` (each one raises
    ModuleNotFoundError on import, as an absent package does) and, given torch_version, whose torch says
    it is that version. Both come from a directory on PYTHONPATH, which comes before site-packages."""
    shadow = tmp_path / "shadow"
    shadow.mkdir(exist_ok=True)
    for name in blocked:
        (shadow / f"{name}.py").write_text(f"raise ModuleNotFoundError(\"No module named '{name}'\", name='{name}')\n")
    if torch_version:
        (shadow / "sitecustomize.py").write_text(f"import torch\ntorch.__version__ = {torch_version!r}\n")
    env = os.environ | {"PYTHONPATH": str(shadow), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(ROOT / script), *map(str, args)]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


# --- pyproject.toml ---------------------------------------------------------------------------


def test_every_top_level_script_is_an_installed_module():
    settings = pyproject()["tool"]["setuptools"]
    assert sorted(settings["py-modules"]) == sorted(path.stem for path in ROOT.glob("*.py"))
    assert settings["packages"] == ["benchmarks"] and (ROOT / "benchmarks" / "__init__.py").is_file()


def test_the_declared_torch_floor_is_the_one_checked_at_start_up():
    (spec,) = [dep for dep in pyproject()["project"]["dependencies"] if dep.startswith("torch")]
    # >=X.Y.0a0: X.Y and its pre-release builds, as require_torch (major and minor only) accepts them
    assert spec == f"torch>={utils.MIN_TORCH}.0a0"


def test_the_dev_extra_holds_every_other_extra():
    extras = pyproject()["project"]["optional-dependencies"]
    assert f"ncf[{','.join(sorted(set(extras) - {'dev'}))}]" in extras["dev"]


# --- the torch floor --------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["2.3.1+cu121", "2.1.0", "1.13.1"])
def test_an_older_torch_is_refused_in_one_line(monkeypatch, version):
    monkeypatch.setattr(torch, "__version__", version)
    with pytest.raises(utils.CliError) as error:
        utils.require_torch()
    assert str(error.value) == f'needs torch >= {utils.MIN_TORCH} (found {version}); pip install "torch>=2.4"'


@pytest.mark.parametrize("version", ["2.4.0", "2.4.0a0+07cecf4168.nv24.05", "2.13.0+cpu", "10.0.0"])
def test_the_floor_and_newer_pass(monkeypatch, version):
    monkeypatch.setattr(torch, "__version__", version)
    utils.require_torch()


@pytest.mark.parametrize(
    "script, args",
    [
        ("ncf.py", ["--data", "cache"]),
        ("inference.py", ["--batch_sizes", "1", "--num_batches", "11"]),
        ("tune.py", ["--data", "cache", "--trials", "1", "--study_name", "s"]),
    ],
)
def test_a_script_stops_at_start_up_on_an_older_torch(tmp_path, script, args):
    # without the check: ncf.py fails in the first step ("fused=True requires ... ['cuda', 'xpu', ...]",
    # measured on torch 2.3.1), inference.py on running out of memory (no torch.OutOfMemoryError)
    result = run_blocked(tmp_path, script, *args, torch_version="2.3.1")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f'{script}: error: needs torch >= {utils.MIN_TORCH} (found 2.3.1); pip install "torch>={utils.MIN_TORCH}"'
    ]


# --- optional extras --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "script, args, blocked, extra",
    [
        ("benchmarks/baselines.py", ["--help"], ["implicit"], "baselines"),
        ("benchmarks/baselines.py", ["--help"], ["scipy"], "baselines"),
        ("benchmarks/tune_bench.py", ["--help"], ["optuna"], "tune"),
        ("tune.py", ["--help"], ["optuna"], "tune"),
        ("plot.py", ["--help"], ["matplotlib"], "plots"),
        ("plot.py", ["--study", "sqlite:///s.db", "--study_name", "s", "--output", "f"], ["optuna"], "tune"),
        ("benchmarks/stability.py", ["--help"], ["matplotlib"], "plots"),  # through plot.py
    ],
)
def test_a_script_without_its_extra_names_it_in_one_line(tmp_path, script, args, blocked, extra):
    result = run_blocked(tmp_path, script, *args, blocked=blocked)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"{Path(script).name}: error: needs the '{extra}' extra (No module named '{blocked[0]}'); "
        f'pip install -e ".[{extra}]"'
    ]


@pytest.mark.parametrize("script", ["ncf.py", "inference.py", "convert.py", "synthetic.py"])
def test_the_core_scripts_need_no_extra(tmp_path, script):
    blocked = ["optuna", "sqlalchemy", "matplotlib", "implicit", "scipy", "threadpoolctl"]
    result = run_blocked(tmp_path, script, "--help", blocked=blocked)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: ")


# --- setup_env.sh -----------------------------------------------------------------------------


def source_setup_env(tmp_path, target, torch_spec):
    """Source setup_env.sh in an active environment whose `python` only records its arguments."""
    environment, bin_dir = tmp_path / "env", tmp_path / "bin"
    environment.mkdir(exist_ok=True)
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "python").write_text(f'#!/bin/sh\necho "$*" >> {tmp_path / "calls"}\n')
    (bin_dir / "python").chmod(0o755)
    env = os.environ | {
        "VIRTUAL_ENV": str(environment), "TORCH_SPEC": torch_spec, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    }  # fmt: skip
    subprocess.run(
        ["bash", "-c", f"source ./setup_env.sh '{target}'"], cwd=ROOT, env=env, check=True, capture_output=True
    )
    calls = tmp_path / "calls"
    return calls.read_text().splitlines() if calls.exists() else []


def test_setup_env_installs_the_project_once_per_torch_checkout_and_target(tmp_path):
    install = "-m pip install --quiet --disable-pip-version-check torch==2.13.0 -e .[dev]"
    torchrec = "-m pip install --quiet --disable-pip-version-check --no-deps torchrec==1.8.0"  # dev has sharding
    assert source_setup_env(tmp_path, ".[dev]", "torch==2.13.0") == [install, torchrec]
    stamp = (tmp_path / "env" / ".ncf-install").read_text()
    md5 = hashlib.md5((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    assert stamp == f"torch==2.13.0 {ROOT} .[dev] {md5}  -\n"
    assert source_setup_env(tmp_path, ".[dev]", "torch==2.13.0") == [install, torchrec]  # nothing new to install
    assert source_setup_env(tmp_path, ".", "torch==2.13.0")[2:] == [install.replace(".[dev]", ".")]
    assert source_setup_env(tmp_path, ".", "torch")[3:] == [install.replace("torch==2.13.0 -e .[dev]", "torch -e .")]
    assert source_setup_env(tmp_path, ".[sharding]", "torch")[4:] == [
        install.replace("torch==2.13.0 -e .[dev]", "torch -e .[sharding]"),
        torchrec,
    ]
