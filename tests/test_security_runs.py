"""Safe to share: crafted checkpoints, live and stale resumes, path mistakes, damaged and read-only stores, a full disk,
SIGTERM, and what the store prints. Each test names what it guards against; each failed on the code before the guard."""

import io
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
import zipfile
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch

from qnwb.runs import Runner
from qnwb.store import RunStore

QNWB = Path(sys.executable).parent / "qnwb"
# `qnwb run` of a tiny problem, before its step count
QUICK_RUN = ("run", "--problem", "quadratic", "--optimizer", "adam", "-b", "steps")
SMALL = {
    "problem": "quadratic",
    "problem_options": {"n": 6, "batch_size": 3},
    "optimizer": "adam",
    "hyperparameters": {"lr": 0.01},
    "budget": {"steps": 6},
    "evaluate_every": 2,
    "device": "cpu",
    "seed": 1,
}


def config(**changes):
    return {**SMALL, **changes}


def params(runner):
    return [p.detach().clone() for p in runner.model.parameters()]


def stop_at(k):
    return lambda info: info["step"] == k and info["runner"].request_stop()


def cli(*args, env=None, timeout=300):
    return subprocess.run(
        [str(QNWB), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


def in_process(*args):
    "`(status, stdout, stderr)` of `qnwb ARGS` run in this process."
    from qnwb.cli import main

    with redirect_stdout(io.StringIO()) as out, redirect_stderr(io.StringIO()) as err:
        status = main([str(a) for a in args])
    return status, out.getvalue(), err.getvalue()


def stored_runs(path) -> list[dict]:
    "The runs of the store at `path` read while another process may be creating it ([] until it has its tables)."
    try:
        with RunStore(path, mark_dead=False) as s:
            return s.runs()
    except (ValueError, sqlite3.Error):
        return []


def rows(path):
    "Every row of every table of the store at `path`, as plain tuples (what must survive a mistake)."
    with sqlite3.connect(path) as db:
        return {
            t: db.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall()
            for t in ("runs", "steps", "evaluations", "steering")
        }


@contextmanager
def mounted(folder: Path, size: str = "1m"):
    "A tmpfs of `size` at `folder` (root only; the test is skipped where mounting is not allowed)."
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


# --------------------------------------------------------------------------------------------------------------------
# checkpoints are data


class Marker:
    "Unpickling this calls os.system: the marker file appears if a loader runs code from the file."

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_a_crafted_checkpoint_never_runs_code(tmp_path):
    marker = tmp_path / "ran"
    runner = Runner(config(), store=tmp_path / "s.sqlite", progress=False)
    runner.run()
    saved = torch.load(runner.checkpoint_path, weights_only=False)
    for place in ("config", "optimizer", "top"):
        crafted = dict(saved)
        if place == "top":
            crafted["payload"] = Marker(marker)
        else:
            crafted[place] = {**saved[place], "payload": Marker(marker)}
        torch.save(crafted, runner.checkpoint_path)
        with pytest.raises(ValueError, match="cannot read") as refused:
            Runner.resume(runner.checkpoint_path, progress=False)
        assert "\n" not in str(refused.value)
        assert not marker.exists(), f"a checkpoint with code in its {place} ran it"


def test_checkpoint_fields_are_checked_one_by_one(tmp_path):
    runner = Runner(config(), store=False, progress=False)
    runner.run()
    good = runner.state()
    path = tmp_path / "c.pt"
    cases = [
        ({k: v for k, v in good.items() if k != "step"}, "lacks the field(s) ['step']"),
        ({**good, "extra": 1}, "has field(s) qnwb does not write"),
        ({**good, "step": "7"}, "the field 'step' holds a str"),
        ({**good, "version": 1}, "format version 1"),
        ({**good, "counts": {"gradient_evaluations": -1}}, "'counts' must hold"),
        ({**good, "model": {"theta": [1.0]}}, "'model' must map parameter names to tensors"),
        ({**good, "schedule_specs": {"lr": torch.float32}}, "it holds a dtype"),
    ]  # torch's loader allows it; qnwb never writes one
    for saved, message in cases:
        torch.save(saved, path)
        with pytest.raises(
            ValueError,
            match=message.replace("(", r"\(")
            .replace(")", r"\)")
            .replace("[", r"\[")
            .replace("]", r"\]"),
        ):
            Runner.resume(path, store=False, progress=False)
    torch.save(good, path)
    Runner.resume(path, store=False, progress=False)  # the unmodified checkpoint loads


def test_a_checkpoint_that_expands_when_read_is_refused(tmp_path):
    runner = Runner(config(), store=False, progress=False)
    runner.run()
    path = tmp_path / "c.pt"
    torch.save(runner.state(), path)
    packed = (
        tmp_path / "packed.pt"
    )  # the same members, deflated: a small file that could hold gigabytes
    with (
        zipfile.ZipFile(path) as source,
        zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as target,
    ):
        for member in source.infolist():
            target.writestr(member.filename, source.read(member.filename))
    with pytest.raises(ValueError, match="is compressed"):
        Runner.resume(packed, store=False, progress=False)
    nested = [[]]  # shared references: 2**40 paths through 40 small lists
    for _ in range(40):
        nested = [nested, nested]
    torch.save({**runner.state(), "schedule_specs": {"lr": nested}}, path)
    with pytest.raises(ValueError, match="expands when read"):
        Runner.resume(path, store=False, progress=False)


def test_a_refused_checkpoint_leaves_the_model_and_optimizer_untouched(tmp_path):
    first = Runner(config(budget={"steps": 3}), store=False, progress=False)
    first.run()
    other = Runner(config(seed=2, budget={"steps": 5}), store=False, progress=False)
    other.run()
    before, optimizer_before = params(other), json.dumps(str(other.optimizer.state_dict()))
    broken = first.state()
    broken["streams"]["train"]["generator"] = torch.zeros(
        3, dtype=torch.uint8
    )  # refused after the model and optimizer loaded
    with pytest.raises(Exception) as refused:
        other.load_state(broken)
    assert all(torch.equal(a, b) for a, b in zip(before, params(other)))
    assert refused.type is ValueError and "nothing was loaded" in str(refused.value)
    assert json.dumps(str(other.optimizer.state_dict())) == optimizer_before and other.step == 5
    nag = Runner(config(optimizer="nag"), store=False, progress=False)
    with pytest.raises(ValueError, match="saved by a 'adam' run; this run's optimizer is 'nag'"):
        nag.load_state(first.state())


def test_resume_never_opens_the_store_path_written_inside_a_checkpoint(tmp_path):
    a = Runner(config(), store=tmp_path / "a.sqlite", progress=False)
    a.run()
    b = Runner(
        config(seed=5), store=tmp_path / "b.sqlite", progress=False
    )  # run 1 of another store
    b.run()
    with pytest.raises(ValueError, match="belongs to another run store"):
        Runner.resume(a.checkpoint_path, store=tmp_path / "b.sqlite", progress=False)
    copy = (
        tmp_path / "elsewhere" / "copy.pt"
    )  # outside its store's folder: the default store, which is not its store
    copy.parent.mkdir()
    shutil.copy(a.checkpoint_path, copy)
    os.environ["QNWB_STORE"], saved = str(tmp_path / "b.sqlite"), os.environ.get("QNWB_STORE")
    try:
        with pytest.raises(ValueError, match="belongs to another run store"):
            Runner.resume(copy, progress=False)
    finally:
        os.environ.pop("QNWB_STORE") if saved is None else os.environ.__setitem__(
            "QNWB_STORE", saved
        )
    assert RunStore(tmp_path / "b.sqlite").run(b.run_id)["preemption_count"] == 0


# --------------------------------------------------------------------------------------------------------------------
# resume: never two processes on one run, never a stale checkpoint


CHILD = textwrap.dedent("""
    import json, sys
    from qnwb.runs import Runner
    Runner(json.loads(sys.argv[2]), store=sys.argv[1], progress=False).run()
""")


def test_a_run_that_another_process_runs_cannot_be_resumed(tmp_path):
    path = tmp_path / "s.sqlite"
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            CHILD,
            str(path),
            json.dumps(config(budget={"steps": 10**7}, checkpoint_every=2)),
        ],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while True:
            assert child.poll() is None, child.communicate()
            assert time.monotonic() < deadline, "the child never wrote a checkpoint"
            run = (stored_runs(path) or [None])[0]
            if (
                run
                and run["steps"] >= 4
                and run["checkpoint"]
                and Path(run["checkpoint"]).is_file()
            ):
                break
            time.sleep(0.05)
        with pytest.raises(ValueError, match="another process is running it|it is running"):
            Runner.resume(run["checkpoint"], progress=False)
        with RunStore(path, mark_dead=False) as s:
            assert (
                s.run(run["id"])["status"] == "running"
                and s.run(run["id"])["preemption_count"] == 0
            )
            assert s.run(run["id"])["steps"] >= run["steps"]  # the live run's rows are all there
    finally:
        child.kill()
        child.wait()


def test_a_live_run_of_another_pid_namespace_is_not_marked_killed_and_not_resumed_without_force(
    tmp_path,
):
    store = RunStore(tmp_path / "s.sqlite")
    runner = Runner(config(), store=store, on_step=stop_at(3), progress=False)
    runner.run()
    with (
        store.transaction() as db
    ):  # as another container on this host records it: its own pid numbering
        db.execute(
            "UPDATE runs SET status = 'running', pid = ?, pidns = 'pid:[4026500000]', host = ? WHERE id = ?",
            (2**22 + 4321, socket.gethostname(), runner.run_id),
        )
    again = RunStore(tmp_path / "s.sqlite")
    assert (
        again.run(runner.run_id)["status"] == "running"
    )  # a reader cannot judge it, so it does not mark it killed
    with pytest.raises(ValueError, match="another host or PID namespace"):
        Runner.resume(runner.checkpoint_path, progress=False)
    resumed = Runner.resume(runner.checkpoint_path, progress=False, force=True)
    assert resumed.run()["status"] == "finished"


def test_a_stale_copy_of_a_checkpoint_keeps_the_stored_history(tmp_path):
    path = tmp_path / "s.sqlite"
    part = Runner(config(budget={"steps": 8}), store=path, on_step=stop_at(3), progress=False)
    part.run()
    stale = tmp_path / "stale.pt"
    shutil.copy(part.checkpoint_path, stale)  # a copy taken at step 3
    Runner.resume(part.checkpoint_path, progress=False).run()  # the run goes on to its end, step 8
    before = rows(path)
    with pytest.raises(ValueError, match="stale copy"):
        Runner.resume(stale, store=path, progress=False)
    assert rows(path) == before  # every step and evaluation of the finished run is still there


def test_rows_after_the_checkpoint_of_a_killed_run_move_aside_instead_of_vanishing(tmp_path):
    path = tmp_path / "s.sqlite"
    runner = Runner(
        config(budget={"steps": 9}, checkpoint_every=3),
        store=path,
        on_step=lambda i: i["step"] == 7 and 1 / 0,
        progress=False,
    )
    with pytest.raises(ZeroDivisionError):
        runner.run()  # failed at step 7: its newest checkpoint is of step 6
    lost = [r["loss"] for r in RunStore(path).steps(runner.run_id)][6:]
    resumed = Runner.resume(runner.checkpoint_path, progress=False)
    resumed.run()
    with RunStore(path) as s:
        assert [x["step"] for x in s.steps(runner.run_id)] == list(range(1, 10))
        discarded = s.discarded(runner.run_id)
        assert [(d["kind"], d["step"]) for d in discarded if d["kind"] == "step"] == [("step", 7)]
        assert [d["row"]["loss"] for d in discarded if d["kind"] == "step"] == lost


# --------------------------------------------------------------------------------------------------------------------
# path mistakes never destroy the store


def test_no_path_mistake_destroys_the_store(tmp_path):
    path = tmp_path / "s.sqlite"
    done = Runner(config(), store=path, progress=False)
    done.run()
    os.link(path, tmp_path / "hard.sqlite")
    (tmp_path / "soft.sqlite").symlink_to(path)
    before = rows(path)
    mistakes = [
        str(path),
        f"{path}-wal",
        f"{path}-shm",
        str(tmp_path / "hard.sqlite"),
        str(tmp_path / "soft.sqlite"),
        str(done.checkpoint_path),
        str(tmp_path / "." / "s.sqlite"),
    ]
    for target in mistakes:
        with pytest.raises(ValueError, match="run store|checkpoint of run|SQLite database"):
            Runner(config(checkpoint=target), store=path, progress=False)
        status, _, err = in_process("runs", "export", "--out", target, "--store", path, "--force")
        assert status == 2 and err.count("\n") == 1, (target, err)
        status, _, err = in_process(
            "runs", "export", "--format", "json", "--out", target, "--store", path, "--force"
        )
        assert status == 2, (target, err)
    other = tmp_path / "other.sqlite"
    RunStore(other).close()
    with pytest.raises(
        ValueError, match="SQLite database"
    ):  # another store: no list knows it, its header does
        Runner(config(checkpoint=str(other)), store=path, progress=False)
    assert (
        rows(path) == before
        and RunStore(path)._query("PRAGMA integrity_check")[0]["integrity_check"] == "ok"
    )


def test_an_existing_file_is_replaced_only_with_force_and_atomically(tmp_path):
    path = tmp_path / "s.sqlite"
    Runner(config(), store=path, progress=False).run()
    out = tmp_path / "notes.csv"
    out.write_text("my notes")
    status, _, err = in_process("runs", "export", "--out", out, "--store", path)
    assert status == 2 and "exists; pass --force" in err and out.read_text() == "my notes"
    with pytest.raises(ValueError, match="exists; pass --force"):
        Runner(config(checkpoint=str(out)), store=path, progress=False)
    assert (
        out.read_text() == "my notes" and len(RunStore(path).runs()) == 1
    )  # refused before the run was recorded
    assert in_process("runs", "export", "--out", out, "--store", path, "--force")[0] == 0
    assert out.read_text().startswith("run_id,") and not list(tmp_path.glob("*.partial")) + list(
        tmp_path.glob(".*partial")
    )


def test_two_stores_in_one_folder_never_share_a_checkpoint(tmp_path):
    a = Runner(
        config(budget={"steps": 8}), store=tmp_path / "a.sqlite", on_step=stop_at(3), progress=False
    )
    a.run()
    b = Runner(
        config(seed=4, budget={"steps": 8}),
        store=tmp_path / "b.sqlite",
        on_step=stop_at(5),
        progress=False,
    )
    b.run()
    assert a.run_id == b.run_id == 1 and a.checkpoint_path != b.checkpoint_path
    resumed = Runner.resume(RunStore(tmp_path / "a.sqlite").run(1)["checkpoint"], progress=False)
    assert (resumed.step, resumed.config["seed"], resumed.store.path) == (
        3,
        1,
        tmp_path / "a.sqlite",
    )


def test_store_paths_survive_a_change_of_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Runner(config(), store="data/s.sqlite", on_step=stop_at(2), progress=False).run()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    store = RunStore(tmp_path / "data" / "s.sqlite")
    assert Path(store.run(1)["checkpoint"]) == tmp_path / "data" / "s.sqlite-runs" / "run-1.pt"
    assert (
        in_process("runs", "resume", "1", "--store", tmp_path / "data" / "s.sqlite", "--quiet")[0]
        == 0
    )


def test_tilde_means_home_in_config_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    Runner(config(checkpoint="~/c.pt"), store=False, progress=False).run()
    assert (tmp_path / "home" / "c.pt").is_file() and not (tmp_path / "~").exists()


# --------------------------------------------------------------------------------------------------------------------
# the store: read-only, damaged, full


def test_a_read_only_store_lists_shows_and_exports(tmp_path):
    folder = tmp_path / "ro"
    with mounted(folder):
        runner = Runner(config(), store=folder / "s.sqlite", progress=False)
        runner.run()
        runner.store.close()  # no file of the mount may stay open for it to become read-only
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        for args in (
            ("runs", "list"),
            ("runs", "show", "1"),
            ("runs", "export", "--out", tmp_path / "out.csv"),
        ):
            done = cli(*args, "--store", folder / "s.sqlite")
            assert done.returncode == 0, (args, done.stderr)
        assert "finished" in cli("runs", "list", "--store", folder / "s.sqlite").stdout
        assert len((tmp_path / "out.csv").read_text().splitlines()) == 5


def test_reading_never_writes_to_the_store(tmp_path):
    path = tmp_path / "s.sqlite"
    Runner(config(), store=path, progress=False).run()
    with RunStore(path) as s:  # a run whose process is gone, still "running"
        s.create_run({"problem": "x"}, problem="x")
        with s.transaction() as db:
            db.execute("UPDATE runs SET pid = ? WHERE id = 2", (2**22 + 99,))
    before = rows(path)
    for args in (
        ("runs", "list"),
        ("runs", "show", "2"),
        ("runs", "export", "--out", tmp_path / "o.json", "--format", "json"),
    ):
        assert in_process(*args, "--store", path)[0] == 0
    assert rows(path) == before  # shown as killed, not written
    assert "killed" in in_process("runs", "list", "--store", path)[1]


def test_a_damaged_row_is_shown_as_damaged_and_the_others_list_and_export(tmp_path):
    path = tmp_path / "s.sqlite"
    for seed in (1, 2, 3):
        Runner(config(seed=seed), store=path, progress=False).run()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE runs SET config = '{\"problem\": ' WHERE id = 2")
        db.execute("UPDATE steps SET stats = 'not json' WHERE run_id = 3 AND step = 2")
    status, out, err = in_process("runs", "list", "--store", path)
    assert status == 0 and len(out.splitlines()) == 4 and "[damaged: config]" in out, err
    status, out, err = in_process(
        "runs", "export", "--out", tmp_path / "steps.csv", "--kind", "steps", "--store", path
    )
    assert status == 0 and "[2]" in err, err
    lines = (tmp_path / "steps.csv").read_text().splitlines()
    assert (
        len(lines) == 1 + 3 * 6
        and lines[0].endswith(",damaged")
        and sum("step.stats" in line for line in lines) == 1
    )
    assert in_process("runs", "show", "2", "--store", path)[0] == 0


def test_a_damaged_store_file_is_reported_before_anything_is_appended(tmp_path):
    path = tmp_path / "s.sqlite"
    store = RunStore(path)
    for seed in range(4):
        Runner(config(seed=seed, budget={"steps": 30}), store=store, progress=False).run()
    store.close()  # the last connection folds the write-ahead log into the file
    pages = bytearray(path.read_bytes())
    pages[3 * 4096 : 4 * 4096] = b"\xa5" * 4096
    path.write_bytes(pages)
    status, _, err = in_process(*QUICK_RUN, "2", "--store", path, "--quiet")
    assert status == 2 and "is damaged" in err and err.count("\n") == 1, err
    assert path.read_bytes() == bytes(pages)


def test_a_checkpoint_that_cannot_be_written_fails_the_run_with_its_error_and_leaves_no_partial_file(
    tmp_path, monkeypatch
):
    import qnwb.runs

    def full(obj, f, *args, **kwargs):
        if hasattr(f, "write"):
            f.write(b"half a checkpoint")
        else:
            Path(f).write_bytes(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(qnwb.runs.torch, "save", full)
    runner = Runner(config(), store=tmp_path / "s.sqlite", progress=False)
    with pytest.raises(OSError, match="No space left"):
        runner.run()
    run = RunStore(tmp_path / "s.sqlite").run(runner.run_id)
    assert (
        run["status"] == "failed"
        and "checkpoint: cannot write" in run["error"]
        and "No space left" in run["error"]
    )
    assert (
        not [p for p in tmp_path.rglob("*") if "partial" in p.name]
        and not runner.checkpoint_path.exists()
    )


def test_a_full_disk_fails_the_run_with_the_real_error(tmp_path):
    runs = tmp_path / "tiny"
    with mounted(runs, size="64k"):
        problem = {
            "problem": "addition",
            "problem_options": {"T": 10, "hidden": 100, "batch_size": 10, "held_out": 10},
        }  # 42 kB a copy
        done = cli(
            "run",
            "--problem",
            "addition",
            "--optimizer",
            "adam",
            "-o",
            "T",
            10,
            "-o",
            "hidden",
            100,
            "-o",
            "batch_size",
            10,
            "-o",
            "held_out",
            10,
            "-b",
            "steps",
            2,
            "--store",
            tmp_path / "s.sqlite",
            "--quiet",
        )
        assert problem and done.returncode == 0, (
            done.stderr
        )  # the store is elsewhere; now the checkpoint on the tiny disk
        config_file = tmp_path / "c.json"
        config_file.write_text(
            json.dumps(
                {
                    **problem,
                    "optimizer": "adam",
                    "budget": {"steps": 2},
                    "checkpoint": str(runs / "c.pt"),
                }
            )
        )
        done = cli("run", config_file, "--store", tmp_path / "s.sqlite", "--quiet")
        assert (
            done.returncode == 1
            and "No space left on device" in done.stderr
            and "Traceback" not in done.stderr
        ), done.stderr
        run = RunStore(tmp_path / "s.sqlite").run(2)
        assert run["status"] == "failed" and "No space left on device" in run["error"]
        assert list(runs.iterdir()) == []  # no partial file


# --------------------------------------------------------------------------------------------------------------------
# signals


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_the_run_after_its_step_with_a_checkpoint_and_it_resumes(
    tmp_path, sig, code
):
    path = tmp_path / "s.sqlite"
    child = subprocess.Popen(
        [
            str(QNWB),
            *QUICK_RUN,
            str(10**7),
            "--store",
            str(path),
            "--quiet",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.monotonic() + 240
    while True:
        assert child.poll() is None, child.communicate()
        assert time.monotonic() < deadline
        if (stored_runs(path) or [{"steps": 0}])[0]["steps"] >= 5:
            break
        time.sleep(0.05)
    child.send_signal(sig)
    out, err = child.communicate(timeout=120)
    assert child.returncode == code, err
    assert (
        f"stopped by {sig.name}" in err and "qnwb runs resume 1" in err and "Traceback" not in err
    ), err
    with RunStore(path, read_only=True) as s:
        run = s.run(1)
        assert run["status"] == "stopped" and run["error"] == f"stopped by {sig.name}"
        assert run["checkpoint_step"] == run["steps"] >= 5
    steps = run["steps"]
    status, out, err = in_process(
        "runs", "resume", "1", "-b", "steps", steps + 3, "--store", path, "--quiet"
    )
    assert status == 0 and out.startswith(f"run 1: finished, {steps + 3} steps"), err


# --------------------------------------------------------------------------------------------------------------------
# what the store prints, and smaller guards


def test_names_reach_the_terminal_escaped_and_spreadsheets_as_text(tmp_path):
    path = tmp_path / "s.sqlite"
    Runner(
        config(name='=HYPERLINK("http://example.invalid","x")'), store=path, progress=False
    ).run()
    Runner(config(), store=path, progress=False).run()
    with sqlite3.connect(path) as db:  # a store written by someone else, or by hand
        db.execute(
            "UPDATE runs SET name = ?, error = ? WHERE id = 2",
            ("\x1b[2J\x1b[31mowned\r", "\x1b]0;title\x07"),
        )
    status, out, _ = in_process("runs", "list", "--store", path)
    assert status == 0 and "\x1b" not in out and "\r" not in out and "\\x1b[2J" in out
    status, out, _ = in_process("runs", "show", "2", "--store", path)
    assert status == 0 and "\x1b" not in out and "\x07" not in out
    in_process("runs", "export", "--out", tmp_path / "r.csv", "--store", path)
    text = (tmp_path / "r.csv").read_text()
    assert "'=HYPERLINK" in text and ",=HYPERLINK" not in text and '"=HYPERLINK' not in text
    with pytest.raises(ValueError, match="printable"):
        Runner(config(name="\x1b[31mred"), store=path, progress=False)


def test_a_failed_run_is_one_line_not_a_traceback(tmp_path):
    diverging = (
        tmp_path / "diverging.json"
    )  # plain gradient descent with 100 times too long a step, in float32: inf within 50 steps
    diverging.write_text(
        json.dumps(
            config(
                optimizer="sgd",
                hyperparameters={"lr": 100.0},
                dtype="float32",
                budget={"steps": 50},
            )
        )
    )
    done = cli("run", diverging, "--store", tmp_path / "s.sqlite", "--quiet")
    assert (
        done.returncode == 1
        and "FloatingPointError" in done.stderr
        and "Traceback" not in done.stderr
    ), done.stderr
    assert done.stderr.strip().count("\n") == 0, done.stderr
    debug = cli("--debug", "run", diverging, "--store", tmp_path / "s.sqlite", "--quiet")
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_a_replay_applies_stored_steering_events_only_through_steers_checks(tmp_path):
    store = RunStore(tmp_path / "s.sqlite")
    steered = Runner(config(budget={"steps": 4}), store=store, progress=False)
    steered.on_step = lambda info: steered.steer("lr", 0.05) if info["step"] == 1 else None
    steered.run()
    with store.transaction() as db:  # an edited store: a rate the constructor refuses
        db.execute("UPDATE steering SET new_value = '-1.0' WHERE run_id = ?", (steered.run_id,))
    status, _, err = in_process(
        "runs", "replay", steered.run_id, "--store", tmp_path / "s.sqlite", "--quiet"
    )
    assert status == 2 and "is refused" in err, err
    with store.transaction() as db:
        db.execute(
            "UPDATE steering SET parameter = 'params', new_value = '1' WHERE run_id = ?",
            (steered.run_id,),
        )
    status, _, err = in_process(
        "runs", "replay", steered.run_id, "--store", tmp_path / "s.sqlite", "--quiet"
    )
    assert status == 2 and "cannot be steered" in err, err


def test_a_dashboard_reset_before_start_leaves_no_running_rows(tmp_path):
    from qnwb.widgets import Dashboard

    path = tmp_path / "s.sqlite"
    board = Dashboard(
        {"problem": "quadratic", "optimizer": "adam", "budget": {"steps": 3}}, store=path
    )
    board.reset()
    board.reset()
    board.close()
    statuses = [r["status"] for r in RunStore(path).runs()]
    assert statuses == ["created"] * 3, statuses


def test_a_run_fails_after_ten_rejected_steps_in_a_row_with_theta_kept(tmp_path):
    runner = Runner(
        config(optimizer="nag", budget={"steps": 50}), store=tmp_path / "s.sqlite", progress=False
    )
    before = params(runner)
    runner.model.theta.register_hook(
        lambda g: g * float("nan")
    )  # a finite loss, a NaN gradient: NAG rejects every step
    with pytest.raises(FloatingPointError, match="rejected 10 steps in a row"):
        runner.run()
    assert all(torch.equal(a, b) for a, b in zip(before, params(runner)))
    run = RunStore(tmp_path / "s.sqlite").run(runner.run_id)
    assert (run["status"], run["steps"]) == ("failed", 10)


# --------------------------------------------------------------------------------------------------------------------
# further ways in, found by trying: each guarded and tested


@pytest.mark.parametrize(
    "optimizer, setting",
    [
        ("hessian_free", {"preconditioner": "chapelle_erhan", "preconditioner_samples": 10**12}),
        ("hessian_free", {"cg_max_iterations": 10**9}),
        ("lbfgs", {"max_evaluations": 10**9}),
        ("lsr1", {"max_evaluations": 10**9}),
        ("adaqn", {"L": 10**9}),
        ("sqn", {"L": 10**9}),
    ],
)
def test_one_step_always_ends_so_a_budget_or_a_signal_can_stop_the_run(optimizer, setting):
    with pytest.raises(ValueError, match="must be an int in \\[1, 100000\\]"):
        Runner(
            {
                "problem": "addition",
                "problem_options": {"T": 10, "hidden": 4},
                "optimizer": optimizer,
                "hyperparameters": setting,
                "budget": {"seconds": 5},
            },
            store=False,
            progress=False,
        )


@pytest.mark.parametrize(
    "options",
    [
        {"hidden": 10**6},
        {"T": 10**9},
        {"held_out": 10**9},
        {"T": 2000, "batch_size": 100_000, "hidden": 4096},
    ],
)
def test_problem_sizes_that_would_allocate_without_bound_are_refused_before_anything_is_built(
    options,
):
    with pytest.raises(ValueError, match="at most|ELEMENTS_LIMIT"):
        Runner(
            {
                "problem": "addition",
                "problem_options": options,
                "optimizer": "adam",
                "budget": {"steps": 1},
            },
            store=False,
            progress=False,
        )


def test_a_lock_name_planted_as_a_link_never_truncates_another_file(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "s.sqlite-runs").mkdir()
    (tmp_path / "s.sqlite-runs" / "run-1.lock").symlink_to(victim)
    status, _, err = in_process(*QUICK_RUN, 3, "--store", tmp_path / "s.sqlite", "--quiet")
    assert status == 2 and "not a lock file" in err and victim.read_text() == "precious", err
    assert (
        RunStore(tmp_path / "s.sqlite").run(1)["status"] == "failed"
    )  # the store says why run 1 never started
    os.link(
        victim, tmp_path / "s.sqlite-runs" / "run-3.lock"
    )  # a hard link: the same file under the lock's name of run 3
    assert in_process(*QUICK_RUN, 3, "--store", tmp_path / "s.sqlite")[0] == 0
    status, _, err = in_process(*QUICK_RUN, 3, "--store", tmp_path / "s.sqlite")
    assert status == 2 and "not a lock file" in err and victim.read_text() == "precious", err


def test_the_names_of_a_stores_folder_are_reserved_for_it(tmp_path):
    a = Runner(config(), store=tmp_path / "a.sqlite", progress=False)
    a.run()
    for name in (
        "a.sqlite-runs/run-5.pt",
        "a.sqlite-runs/run-2.lock",
        "a.sqlite-runs/run-1.lock",
    ):  # a later run's, locks
        with pytest.raises(ValueError, match="reserved for the store|the lock file of run 1"):
            Runner(
                config(checkpoint=str(tmp_path / name)),
                store=tmp_path / "a.sqlite",
                progress=False,
                overwrite=True,
            )
    Runner(
        config(), store=tmp_path / "a.sqlite", progress=False
    ).run()  # run 2 is not jammed by any of them
    before = a.checkpoint_path.read_bytes()
    with pytest.raises(
        ValueError, match="reserved for the store"
    ):  # another store's checkpoint, even with --force
        Runner(
            config(checkpoint=str(a.checkpoint_path)),
            store=tmp_path / "b.sqlite",
            progress=False,
            overwrite=True,
        )
    status, _, err = in_process(
        "runs",
        "export",
        "--out",
        tmp_path / "a.sqlite-wal",
        "--store",
        tmp_path / "b.sqlite",
        "--force",
    )
    assert status == 2 and "SQLite database" in err and a.checkpoint_path.read_bytes() == before


def test_someone_elses_database_is_never_turned_into_a_store(tmp_path):
    path = tmp_path / "app.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE users (name TEXT)")
        db.execute("INSERT INTO users VALUES ('ada')")
    before = path.read_bytes()
    status, _, err = in_process(*QUICK_RUN, 2, "--store", path, "--quiet")
    assert status == 2 and "not a run store" in err, err
    assert path.read_bytes() == before and not Path(f"{path}-wal").exists()


def test_a_temporary_file_cannot_be_redirected_by_a_planted_link(tmp_path):
    Runner(config(), store=tmp_path / "s.sqlite", progress=False).run()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    for guess in range(64):  # links under every name a predictable scheme (pid, thread) could use
        (out / f".e.csv.{os.getpid()}-{guess}.partial").symlink_to(victim)
        (out / f".e.csv.{os.getpid()}.partial").unlink(missing_ok=True)
    (out / f".e.csv.{os.getpid()}.partial").symlink_to(victim)
    import threading

    (out / f".e.csv.{os.getpid()}-{threading.get_ident()}.partial").symlink_to(victim)
    assert (
        in_process("runs", "export", "--out", out / "e.csv", "--store", tmp_path / "s.sqlite")[0]
        == 0
    )
    assert victim.read_text() == "precious" and not (out / "e.csv").is_symlink()


def test_a_checkpoint_or_a_store_does_not_choose_where_the_curves_cache_goes(tmp_path):
    runner = Runner(
        {
            "problem": "curves",
            "problem_options": {
                "size": 8,
                "sizes": [12, 4],
                "train": 60,
                "test": 20,
                "batch_size": 25,
            },
            "optimizer": "adam",
            "budget": {"steps": 2},
        },
        store=False,
        progress=False,
    )
    runner.run()
    crafted = runner.state()
    crafted["config"]["problem_options"]["root"] = str(tmp_path / "elsewhere" / "deep")
    torch.save(crafted, tmp_path / "c.pt")
    Runner.resume(tmp_path / "c.pt", store=False, progress=False).run()
    assert not (tmp_path / "elsewhere").exists()


def test_a_dashboard_shows_error_text_as_text(tmp_path):
    from qnwb.widgets import Dashboard

    board = Dashboard(
        {"problem": "quadratic", "optimizer": "adam", "budget": {"steps": 3}}, store=False
    )
    board._say(
        "a message holding <img src=x onerror=alert(1)>"
    )  # as an error message or a refused value would
    assert (
        "<img" not in board.message.value
        and "&lt;img src=x onerror=alert(1)&gt;" in board.message.value
    )
    board.close()


def test_huge_numbers_are_one_line_mistakes_and_json_output_is_standard_json(tmp_path):
    path = tmp_path / "s.sqlite"
    for flags in (
        ("--evaluate-every", "1" + "0" * 400),
        ("-b", "steps", "1" + "0" * 400),
        ("-H", "lr", "1" + "0" * 400),
    ):
        status, _, err = in_process(
            "run",
            "--problem",
            "quadratic",
            "--optimizer",
            "adam",
            "-b",
            "seconds",
            5,
            *flags,
            "--store",
            path,
        )
        assert status == 2 and err.count("\n") == 1 and "Overflow" not in err, (flags, err)
    Runner(config(), store=path, progress=False).run()
    with sqlite3.connect(path) as db:
        db.execute(
            "UPDATE evaluations SET validation_loss = 'NaN', validation_error = ? WHERE run_id = 1",
            ("\x1b]0;pwned\x07",),
        )
    status, out, _ = in_process("runs", "show", "1", "--store", path)
    assert status == 0 and "\x1b" not in out and "\x07" not in out
    status, out, _ = in_process("runs", "show", "1", "--json", "--store", path)
    with sqlite3.connect(path) as db:
        db.execute("UPDATE evaluations SET validation_loss = ? WHERE run_id = 1", (float("nan"),))
    status, out, _ = in_process("runs", "show", "1", "--json", "--store", path)
    json.loads(out, parse_constant=lambda name: pytest.fail(f"bare {name} in JSON output"))
