"""The `qnwb` console script, run as a user runs it: a real process from the environment's bin/."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

import qnwb

QNWB = Path(sys.executable).parent / "qnwb"


def run(*args, **env):
    assert QNWB.exists(), f"{QNWB} is missing: install qnwb in this environment (make setup)"
    return subprocess.run([str(QNWB), *args], capture_output=True, text=True, env={**os.environ, **env}, timeout=300)


def test_help_lists_the_commands():
    done = run("--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: qnwb") and "info" in done.stdout


def test_version():
    done = run("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"qnwb {qnwb.__version__}"


def test_info_json_reports_this_environment():
    done = run("info", "--json", QNWB_DEVICE="cpu")
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["torch"] == torch.__version__ and info["default device"] == "cpu"


def test_info_explains_an_unusable_device_instead_of_crashing():
    done = run("info", QNWB_DEVICE="cuda:99")
    assert done.returncode == 0, done.stderr
    assert "unavailable" in done.stdout and "cuda:99" in done.stdout


def test_unknown_command_is_a_usage_error():
    done = run("frobnicate")
    assert done.returncode == 2 and "invalid choice" in done.stderr


def test_bench_optimizers_prints_json_and_writes_the_figure(tmp_path):
    html = tmp_path / "optimizers.html"
    result = run("bench", "optimizers", "--optimizers", "adagrad", "adam", "--steps", "4", "--hidden", "6", "--layers", "2",
                 "--length", "8", "--batch", "3", "--lr", "adam=0.01", "--html", str(html), "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert list(data["optimizers"]) == ["adagrad", "adam"] and data["optimizers"]["adam"]["lr"] == 0.01
    assert len(data["optimizers"]["adagrad"]["train"]) == 4 and data["optimizers"]["adagrad"]["work_vs_adagrad"] == 1.0
    assert html.exists() and "plotly" in html.read_text()
    bad = run("bench", "optimizers", "--lr", "adam=-1")
    assert bad.returncode == 2 and "NAME=RATE" in bad.stderr


def test_bench_help_lists_every_benchmark():
    done = run("bench", "--help")
    assert done.returncode == 0, done.stderr
    for name in ("curvature", "hf", "optimizers", "lanczos"):
        assert name in done.stdout


def test_bench_lanczos_prints_its_table():
    done = run("bench", "lanczos", "--k", "2", "--batch", "8", "--steps", "3", "--hidden", "4", "--repeat", "1")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("top 2 eigenvalues of the GGN of TanhRNN(2, 4, 1)")
    assert "Lanczos within 2k + 10 = 14 products" in done.stdout
