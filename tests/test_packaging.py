"""The wheel works outside the checkout: built by `make dist`'s commands, installed into a fresh virtual environment
(torch first, from the local CPU build), it renders a report from another folder and imports the optimizers."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(out), str(REPO)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (built,) = out.glob("qnwb-*.whl")
    return built


@pytest.mark.slow
def test_the_wheel_carries_every_report_template(wheel):
    names = {Path(n).name for n in zipfile.ZipFile(wheel).namelist() if "/report_templates/" in n}
    assert names == {p.name for p in (REPO / "nbs" / "reports").glob("*.ipynb")}


@pytest.mark.slow
def test_an_installed_wheel_renders_a_report_from_another_folder(wheel, tmp_path):
    venv, elsewhere, home = tmp_path / "venv", tmp_path / "elsewhere", tmp_path / "home"
    elsewhere.mkdir()
    home.mkdir()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "torch==2.13.0"], check=True, timeout=900)  # first: the CPU build
    subprocess.run([*pip, str(wheel)], check=True, timeout=900)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("QNWB_")},
        "HOME": str(home),
        "XDG_DATA_HOME": str(home / "data"),
    }
    imported = subprocess.run(
        [
            str(python),
            "-c",
            "from qnwb.optim import HessianFree, AdaQN, LSR1, NAG; import qnwb; print(qnwb.__file__)",
        ],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert imported.returncode == 0, imported.stderr
    assert str(venv) in imported.stdout  # the installed package, not the checkout
    report = subprocess.run(
        [str(venv / "bin" / "qnwb"), "report", "tour", "-p", "budget", "600", "--quiet"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert report.returncode == 0, report.stderr[-3000:]
    folder = home / "data" / "qnwb" / "reports"  # platformdirs' user data folder on Linux
    assert list(folder.glob("tour-*.html")) and (home / "data" / "qnwb" / "qnwb.sqlite").is_file()
    assert not list(elsewhere.iterdir())  # nothing written where it ran
