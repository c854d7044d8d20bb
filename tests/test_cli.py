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
    return subprocess.run(
        [str(QNWB), *args], capture_output=True, text=True, env={**os.environ, **env}, timeout=300
    )


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
    result = run(
        "bench",
        "optimizers",
        "--optimizers",
        "adagrad",
        "adam",
        "--steps",
        "4",
        "--hidden",
        "6",
        "--layers",
        "2",
        "--length",
        "8",
        "--batch",
        "3",
        "--lr",
        "adam=0.01",
        "--html",
        str(html),
        "--json",
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert (
        list(data["optimizers"]) == ["adagrad", "adam"] and data["optimizers"]["adam"]["lr"] == 0.01
    )
    assert (
        len(data["optimizers"]["adagrad"]["train"]) == 4
        and data["optimizers"]["adagrad"]["work_vs_adagrad"] == 1.0
    )
    assert html.exists() and "plotly" in html.read_text()
    bad = run("bench", "optimizers", "--lr", "adam=-1")
    assert bad.returncode == 2 and "NAME=RATE" in bad.stderr


def test_bench_help_lists_every_benchmark():
    done = run("bench", "--help")
    assert done.returncode == 0, done.stderr
    for name in ("curvature", "hf", "optimizers", "lanczos"):
        assert name in done.stdout


def test_bench_lanczos_prints_its_table():
    done = run(
        "bench",
        "lanczos",
        "--k",
        "2",
        "--batch",
        "8",
        "--steps",
        "3",
        "--hidden",
        "4",
        "--repeat",
        "1",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("top 2 eigenvalues of the GGN of TanhRNN(2, 4, 1)")
    assert "Lanczos within 2k + 10 = 14 products" in done.stdout


def test_run_then_runs_list_show_and_export(tmp_path):
    store = str(tmp_path / "runs.sqlite")
    done = run(
        "run",
        "--problem",
        "addition",
        "--optimizer",
        "adam",
        "-o",
        "T",
        "12",
        "-o",
        "hidden",
        "8",
        "-H",
        "lr",
        "0.01",
        "-b",
        "steps",
        "20",
        "--evaluate-every",
        "10",
        "--quiet",
        "--json",
        "--store",
        store,
        OMP_NUM_THREADS="1",
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["status"] == "finished" and summary["steps"] == 20
    listing = run("runs", "list", "--json", "--store", store)
    assert [
        (r["id"], r["optimizer"], r["status"], r["steps"]) for r in json.loads(listing.stdout)
    ] == [(summary["run_id"], "adam", "finished", 20)]
    shown = json.loads(
        run("runs", "show", str(summary["run_id"]), "--json", "--store", store).stdout
    )
    assert shown["config"]["hyperparameters"] == {"lr": 0.01} and [
        e["step"] for e in shown["evaluations"]
    ] == [0, 10, 20]
    out = tmp_path / "runs.csv"
    exported = run("runs", "export", "--out", str(out), "--store", store)
    assert exported.returncode == 0, exported.stderr
    lines = out.read_text().splitlines()
    assert len(lines) == 4 and "validation/error" in lines[0].split(",")


def test_a_run_from_a_yaml_config(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        "problem: quadratic\noptimizer: lbfgs\nbudget: {steps: 5}\nevaluate_every: 5\n"
    )
    done = run(
        "run", str(config), "--quiet", "--store", str(tmp_path / "s.sqlite"), OMP_NUM_THREADS="1"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("run 1: finished, 5 steps")


def test_user_mistakes_end_with_one_line_and_status_2(tmp_path):
    assert run("report", "nope").returncode == 2  # and once through the console script
    store = str(tmp_path / "none.sqlite")
    bad = tmp_path / "bad.json"
    bad.write_text("{bad")
    good = tmp_path / "good.json"
    good.write_text(
        json.dumps({"problem": "quadratic", "optimizer": "adam", "budget": {"steps": 2}})
    )
    cases = [
        (("report", "nope"), "unknown report 'nope'"),
        (("report", "tour", "-p", "bogus", "1"), "unknown bogus"),
        (("report", "tour", "-p", "budget", "many"), "budget must be a int"),
        (
            (
                "run",
                "--problem",
                "addition",
                "--optimizer",
                "adamm",
                "-b",
                "steps",
                "5",
                "--store",
                store,
            ),
            "'adamm' is not one of",
        ),
        (
            (
                "run",
                "--problem",
                "additio",
                "--optimizer",
                "adam",
                "-b",
                "steps",
                "5",
                "--store",
                store,
            ),
            "'additio' is not one of",
        ),
        (
            (
                "run",
                "--problem",
                "addition",
                "--optimizer",
                "adam",
                "-b",
                "steps",
                "0",
                "--store",
                store,
            ),
            "must be a positive int",
        ),
        (("run", str(bad), "--store", store), "is not valid JSON"),
        (("run", str(tmp_path / "missing.yaml"), "--store", store), "cannot read"),
        (("runs", "list", "--store", store), "does not exist"),
        (
            ("run", str(good), "--seed", "7", "-o", "n", "5", "--store", store),
            "-o, --seed would be ignored",
        ),
    ]
    from contextlib import redirect_stderr
    from io import StringIO

    from qnwb.cli import main

    for (
        args,
        message,
    ) in cases:  # in-process: the same handlers as the console script, without a process start each
        with redirect_stderr(StringIO()) as err:
            status = main(list(args))
        assert status == 2 and message in err.getvalue() and err.getvalue().count("\n") == 1, (
            args,
            err.getvalue(),
        )
    assert not (tmp_path / "none.sqlite").exists()  # no store was created by any of those mistakes


def test_runs_replay_reruns_a_steered_run(tmp_path):
    from contextlib import redirect_stdout
    from io import StringIO

    from qnwb.cli import main
    from qnwb.runs import Runner
    from qnwb.store import RunStore

    store = RunStore(tmp_path / "s.sqlite")
    steered = Runner(
        {
            "problem": "quadratic",
            "optimizer": "adam",
            "hyperparameters": {"lr": 0.01},
            "budget": {"steps": 4},
        },
        store=store,
        progress=False,
    )
    steered.on_step = lambda info: steered.steer("lr", 0.05) if info["step"] == 1 else None
    steered.run()
    with redirect_stdout(StringIO()) as out:
        assert (
            main(
                [
                    "runs",
                    "replay",
                    str(steered.run_id),
                    "--record",
                    "--quiet",
                    "--store",
                    str(tmp_path / "s.sqlite"),
                ]
            )
            == 0
        )
    assert out.getvalue().startswith(
        f"replayed run {steered.run_id}: 4 steps, 1 steering event(s) applied, status finished, recorded as run 2"
    )
