"""The README's commands install into one environment and never into another (Makefile, scripts/make_venv.sh).

`make install VENV=...` runs for real here, into a fresh venv that sees this test's environment
through a .pth file, with pip's index off: the torch pins are then already satisfied and only the
project itself is installed, so the test needs no network and takes seconds.
"""
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from factories import ROOT

MAKE = shutil.which("make")
pytestmark = pytest.mark.skipif(MAKE is None, reason="no make on PATH")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "CONDA_DEFAULT_ENV", "CONDA_PREFIX")}
    return env | extra


def _python_of_dry_run(**env: str) -> str:
    """The interpreter `make install` would install with, from make's dry run in that environment."""
    done = subprocess.run([MAKE, "-n", "-B", "install"], cwd=ROOT, env=_env(**env), capture_output=True,
                          text=True, check=True)
    pip_lines = [line for line in done.stdout.splitlines() if " -m pip install" in line]
    assert pip_lines, done.stdout
    return pip_lines[0].split(" -m pip")[0]


def test_the_environment_make_installs_into(tmp_path):
    assert _python_of_dry_run() == ".venv/bin/python"  # nothing active: the project's own
    assert _python_of_dry_run(VIRTUAL_ENV=str(tmp_path / "v")) == f"{tmp_path}/v/bin/python"
    assert _python_of_dry_run(CONDA_DEFAULT_ENV="work", CONDA_PREFIX="/opt/conda/envs/work") == \
        "/opt/conda/envs/work/bin/python"
    assert _python_of_dry_run(CONDA_DEFAULT_ENV="base", CONDA_PREFIX="/opt/conda") == ".venv/bin/python"
    assert _python_of_dry_run(VIRTUAL_ENV=str(tmp_path / "v"), VENV="elsewhere") == "elsewhere/bin/python"


def _tree_digest(folder: Path) -> str:
    """Names, sizes and modification times of everything under folder: any install there changes it."""
    lines = sorted(f"{p.relative_to(folder)} {p.stat().st_size} {p.stat().st_mtime_ns}"
                   for p in folder.rglob("*") if "__pycache__" not in p.parts and not p.is_symlink())
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


@pytest.mark.slow
def test_make_install_fills_the_chosen_venv_and_leaves_the_others_alone(tmp_path):
    parent = Path(sysconfig.get_paths()["purelib"])  # this test's environment: must not change
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(subprocess.run([venv / "bin" / "python", "-c", purelib], capture_output=True, text=True,
                               check=True).stdout.strip())
    (site / "parent_env.pth").write_text(f"{parent}\n")  # torch & co. from here; pip and setuptools too
    before = _tree_digest(parent)
    # PIP_NO_BUILD_ISOLATION=0 is pip's spelling of --no-build-isolation (setuptools from the parent).
    env = _env(PIP_NO_INDEX="1", PIP_NO_BUILD_ISOLATION="0")
    done = subprocess.run([MAKE, "install", f"VENV={venv}"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (venv / ".ldm-pipeline.stamp").exists()
    assert list(site.glob("ldm_pipeline-*.dist-info"))  # the project went into the chosen venv...
    assert _tree_digest(parent) == before  # ... and nowhere else
    where = subprocess.run([venv / "bin" / "python", "-c", "import jobs; print(jobs.__file__)"], cwd=tmp_path,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where) == ROOT / "jobs" / "__init__.py"  # editable: the work tree
    again = subprocess.run([MAKE, "install", f"VENV={venv}"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert "pip install" not in again.stdout  # the stamp in the venv: installed once


def test_make_venv_makes_a_venv_or_says_what_is_missing(tmp_path):
    script = ROOT / "scripts" / "make_venv.sh"
    subprocess.run([script, str(tmp_path / "v")], check=True, env=_env(), capture_output=True)
    assert (tmp_path / "v" / "bin" / "python").exists() and (tmp_path / "v" / "pyvenv.cfg").exists()
    done = subprocess.run([script, str(tmp_path / "w")], env=_env(LDM_BASE_PYTHON="python9.99"),
                          capture_output=True, text=True)
    assert done.returncode == 1 and "no python9.99 on PATH" in done.stderr
