"""The run store: round trips, non-finite numbers, WAL, dead-run detection, bad paths, concurrent writers, export."""

import csv
import io
import json
import math
import os
import socket
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from qnwb.store import (
    ALGOPERF_COLUMNS,
    STATUSES,
    RunStore,
    _process_start,
    csv_rows,
    export_csv,
    export_json,
    process_alive,
    store_path,
)


@pytest.fixture
def store(tmp_path):
    with RunStore(tmp_path / "s.sqlite") as s:
        yield s


def _write_run(store, steps=3, status="finished", **identity):
    rid = store.create_run(
        {"problem": "p", "optimizer": "o", **identity},
        problem="p",
        optimizer="o",
        seed=identity.get("seed", 0),
        device="cpu",
    )
    for t in range(1, steps + 1):
        store.log_step(
            rid,
            t,
            {
                "loss": 1.0 / t,
                "gradient_evaluations": 2 * t,
                "curvature_products": 10 * t,
                "time": 0.1 * t,
                "train_time": 0.05 * t,
            },
            {"rho": 0.5 * t, "memory_size": t},
        )
        if t % 2 == 0 or t == steps:
            store.log_evaluation(
                rid,
                t,
                {
                    "validation_loss": 2.0 / t,
                    "validation_error": 1.0 / (t + 1),
                    "train_loss": 1.5 / t,
                    "gradient_evaluations": 2 * t,
                    "curvature_products": 10 * t,
                    "time": 0.1 * t,
                },
            )
    if status != "running":
        store.finish_run(rid, status, summary={"steps": steps})
    return rid


def test_round_trip_of_every_table(store):
    rid = _write_run(store, steps=4)
    store.log_steering(rid, 2, "damping", 1.0, 0.5)
    run = store.run(rid)
    assert (run["status"], run["steps"], run["problem"], run["seed"], run["device"]) == (
        "finished",
        4,
        "p",
        0,
        "cpu",
    )
    assert run["config"] == {"problem": "p", "optimizer": "o"}
    assert set(run["versions"]) >= {"python", "torch", "qnwb"}
    assert run["pid"] == os.getpid() and run["host"] == socket.gethostname()
    assert run["summary"] == {"steps": 4}
    steps = store.steps(rid)
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    assert [s["gradient_evaluations"] for s in steps] == [2, 4, 6, 8]
    assert steps[2]["stats"] == {"rho": 1.5, "memory_size": 3}
    assert [e["step"] for e in store.evaluations(rid)] == [2, 4]
    assert store.evaluations(rid)[1]["validation_error"] == pytest.approx(0.2)
    events = store.steering_events(rid)
    assert [(e["step"], e["parameter"], e["old_value"], e["new_value"]) for e in events] == [
        (2, "damping", 1.0, 0.5)
    ]


def test_wal_mode_and_busy_timeout_are_set(store):
    assert store._query("PRAGMA journal_mode")[0]["journal_mode"] == "wal"
    assert store._query("PRAGMA busy_timeout")[0]["timeout"] == 60_000
    assert store._query("PRAGMA foreign_keys")[0]["foreign_keys"] == 1


def test_non_finite_numbers_are_null_in_columns_and_exact_in_json(store):
    rid = store.create_run({"x": float("nan")})
    store.log_step(
        rid, 1, {"loss": float("inf")}, {"rho": float("-inf"), "sy": float("nan"), "flag": True}
    )
    step = store.steps(rid)[0]
    assert step["loss"] is None
    assert (
        step["stats"]["rho"] == -math.inf
        and math.isnan(step["stats"]["sy"])
        and step["stats"]["flag"] is True
    )
    assert math.isnan(store.run(rid)["config"]["x"])


def test_a_failed_transaction_leaves_nothing(store):
    rid = store.create_run({})
    with pytest.raises(RuntimeError):
        with store.transaction() as db:
            db.execute("INSERT INTO steps (run_id, step) VALUES (?, 1)", (rid,))
            raise RuntimeError("in the middle")
    assert store.steps(rid) == []
    store.log_step(rid, 1, {"loss": 1.0})
    with pytest.raises(sqlite3.IntegrityError):  # a step stored twice is refused, the first kept
        store.log_step(rid, 1, {"loss": 2.0})
    assert [s["loss"] for s in store.steps(rid)] == [1.0]


def test_store_path_from_argument_environment_and_default(monkeypatch, tmp_path):
    monkeypatch.delenv("QNWB_STORE", raising=False)
    import qnwb

    checkout = Path(qnwb.__file__).resolve().parent.parent
    assert (
        store_path() == checkout / "data" / "qnwb.sqlite"
    )  # the checkout's, whatever the current folder
    monkeypatch.chdir(tmp_path)
    assert store_path() == checkout / "data" / "qnwb.sqlite"
    monkeypatch.setenv("QNWB_STORE", str(tmp_path / "env.sqlite"))
    assert store_path() == tmp_path / "env.sqlite"
    assert store_path(tmp_path / "arg.sqlite") == tmp_path / "arg.sqlite"
    with RunStore() as s:
        assert s.path == tmp_path / "env.sqlite"
    assert (tmp_path / "env.sqlite").is_file()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p, "is not a file"),  # a folder
        (
            lambda p: (p / "f").write_text("x") and p / "f" / "s.sqlite",
            "cannot make the folder",
        ),  # its folder is a file
        (
            lambda p: (p / "t.sqlite").write_text("not sqlite " * 100) and p / "t.sqlite",
            "cannot open",
        ),
    ],
)
def test_paths_that_cannot_hold_a_store_fail_clearly(tmp_path, make, message):
    path = make(tmp_path)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(ValueError, match=message):
        RunStore(path)
    assert sorted(os.listdir(tmp_path)) == before  # nothing new written


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_a_read_only_folder_fails_clearly(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(ValueError, match="cannot be written"):
            RunStore(folder / "s.sqlite")
    finally:
        folder.chmod(0o700)


def test_create_false_never_makes_a_store(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        RunStore(tmp_path / "no" / "s.sqlite", create=False)
    assert not (tmp_path / "no").exists()


def test_process_alive_tells_live_dead_reused_and_zombie_processes():
    me = os.getpid()
    assert process_alive(me) and process_alive(me, _process_start(me))
    assert not process_alive(me, "1")  # same id, another start time: a reused id
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    start = _process_start(child.pid)
    while True:  # wait for it to exit without reaping it: a zombie
        try:
            with open(f"/proc/{child.pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
        except OSError:
            break
    assert not process_alive(child.pid, start)
    child.wait()
    assert not process_alive(child.pid, start)


def test_dead_runs_of_this_host_are_marked_killed_and_keep_their_steps(store):
    alive = _write_run(store, status="running")
    dead = _write_run(store, steps=5, status="running")
    finished = _write_run(store)
    with store.transaction() as db:
        db.execute(
            "UPDATE runs SET process_start = '1' WHERE id = ?", (dead,)
        )  # its process is gone (another one has its id)
    assert store.mark_dead_runs() == [dead]
    assert [store.run(i)["status"] for i in (alive, dead, finished)] == [
        "running",
        "killed",
        "finished",
    ]
    assert len(store.steps(dead)) == 5
    assert "killed" in STATUSES


def test_runs_of_other_hosts_are_marked_only_when_stale(store):
    rid = _write_run(store, status="running")
    with store.transaction() as db:
        db.execute(
            "UPDATE runs SET host = 'elsewhere', heartbeat = heartbeat - 1000 WHERE id = ?", (rid,)
        )
    assert store.mark_dead_runs() == []
    assert store.mark_dead_runs(stale_after=2000) == []
    assert store.mark_dead_runs(stale_after=500) == [rid]
    assert store.run(rid)["status"] == "killed"


def test_opening_a_store_marks_dead_runs(tmp_path):
    path = tmp_path / "s.sqlite"
    with RunStore(path) as s:
        rid = _write_run(s, status="running")
        with s.transaction() as db:
            db.execute("UPDATE runs SET pid = 4194300 + 7 WHERE id = ?", (rid,))
    with RunStore(path) as s:
        assert s._query("SELECT status FROM runs WHERE id = ?", (rid,))[0]["status"] == "killed"


def test_resume_run_drops_later_rows_and_counts_preemptions(store):
    rid = _write_run(store, steps=6, status="stopped")
    store.resume_run(rid, 3)
    run = store.run(rid)
    assert (run["status"], run["steps"], run["preemption_count"], run["ended"]) == (
        "running",
        3,
        1,
        None,
    )
    assert [s["step"] for s in store.steps(rid)] == [1, 2, 3]
    assert [e["step"] for e in store.evaluations(rid)] == [2]


def test_filters_and_errors(store):
    a = _write_run(store, seed=0)
    b = _write_run(store, seed=1, status="stopped")
    assert [r["id"] for r in store.runs(status="stopped")] == [b]
    assert [r["id"] for r in store.runs(seed=0)] == [a]
    assert store.runs(ids=[]) == []
    with pytest.raises(ValueError, match="status"):
        store.runs(status="done")
    with pytest.raises(ValueError, match="filtered by"):
        store.runs(colour="red")
    with pytest.raises(ValueError, match="no run 99"):
        store.steps(99)
    with pytest.raises(ValueError, match="status"):
        store.finish_run(a, "running")


def test_csv_export_has_algoperf_columns_and_the_stats_of_each_evaluated_step(store):
    a = _write_run(store, steps=4)
    b = _write_run(store, steps=3)
    buffer = io.StringIO()
    assert export_csv(store, buffer, [a, b]) == 4  # evaluations at steps 2, 4 and 2, 3
    rows = list(csv.DictReader(io.StringIO(buffer.getvalue())))
    assert set(ALGOPERF_COLUMNS.values()) <= set(rows[0])
    assert [(int(r["run_id"]), int(r["global_step"])) for r in rows] == [
        (a, 2),
        (a, 4),
        (b, 2),
        (b, 3),
    ]
    assert float(rows[1]["validation/error"]) == pytest.approx(0.2)
    assert float(rows[1]["stats/rho"]) == pytest.approx(2.0)  # the stats of step 4
    assert int(rows[3]["curvature_products"]) == 30
    assert rows[0]["train/error"] == ""  # not measured: empty
    path = store.path.parent / "steps.csv"
    assert export_csv(store, path, a, kind="steps") == 4
    steps = list(csv.DictReader(open(path)))
    assert [float(r["train/batch_loss"]) for r in steps] == pytest.approx([1, 1 / 2, 1 / 3, 1 / 4])
    assert {"stats/rho", "stats/memory_size"} <= set(steps[0])


def test_csv_columns_are_the_union_over_optimizers(store):
    a = store.create_run({})
    store.log_step(a, 1, {}, {"rho": 1.0})
    store.log_evaluation(a, 1, {"validation_loss": 1.0})
    b = store.create_run({})
    store.log_step(b, 1, {}, {"lr": 0.1})
    store.log_evaluation(b, 1, {"validation_loss": 2.0})
    columns, rows = csv_rows(store, [a, b])
    assert {"stats/rho", "stats/lr"} <= set(columns)
    assert rows[0].get("stats/lr") is None and rows[1]["stats/lr"] == 0.1


def test_json_export_holds_every_row(store, tmp_path):
    rid = _write_run(store, steps=3)
    store.log_steering(rid, 1, "lr", 0.1, 0.2)
    document = export_json(store, tmp_path / "x.json", [rid])
    again = json.loads((tmp_path / "x.json").read_text())
    assert again["format"] == "qnwb runs 1"
    assert [s["step"] for s in again["runs"][0]["steps"]] == [1, 2, 3]
    assert again["runs"][0]["steering"][0]["new_value"] == 0.2
    assert len(document["runs"][0]["evaluations"]) == 2
    with pytest.raises(ValueError, match=r"no run\(s\) \[42\]"):
        export_json(store, None, [42])


WRITER = textwrap.dedent("""
    import pathlib, sys, time
    from qnwb.store import RunStore
    path, tag, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    folder = pathlib.Path(path).parent
    with RunStore(path, timeout=120) as s:
        rid = s.create_run({"tag": tag}, name=tag)
        (folder / f"ready-{tag}").touch()
        while len(list(folder.glob("ready-*"))) < 2:  # start writing steps together
            time.sleep(0.001)
        for t in range(1, steps + 1):
            s.log_step(rid, t, {"loss": float(t), "time": time.time()}, {"tag": tag})
            if t % 10 == 0:
                s.log_evaluation(rid, t, {"validation_loss": float(t)})
        s.finish_run(rid, "finished")
""")


def test_two_processes_write_one_store_at_once(tmp_path):
    path = tmp_path / "shared.sqlite"
    RunStore(path).close()  # the schema exists; both writers race on rows
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), tag, "1000"],
            stderr=subprocess.PIPE,
            text=True,
        )
        for tag in ("a", "b")
    ]  # 1000 steps each
    errors = [w.communicate()[1] for w in writers]
    assert [w.returncode for w in writers] == [0, 0], errors
    with RunStore(path) as s:
        runs = s.runs()
        assert sorted(r["name"] for r in runs) == ["a", "b"]
        assert all(r["status"] == "finished" and r["steps"] == 1000 for r in runs)
        for r in runs:
            steps = s.steps(r["id"])
            assert [x["step"] for x in steps] == list(range(1, 1001))
            assert {x["stats"]["tag"] for x in steps} == {r["name"]}
            assert len(s.evaluations(r["id"])) == 100
        spans = [(s.steps(r["id"])[0]["time"], s.steps(r["id"])[-1]["time"]) for r in runs]
        assert max(a for a, _ in spans) < min(
            b for _, b in spans
        )  # the two runs wrote at the same time


def test_outside_a_checkout_the_store_and_reports_live_in_the_users_data_folder(
    monkeypatch, tmp_path
):
    import qnwb
    from qnwb.reports import reports_dir
    from qnwb.store import data_folder

    installed = tmp_path / "site-packages" / "qnwb"
    (installed / "report_templates").mkdir(parents=True)
    monkeypatch.setattr(qnwb, "__file__", str(installed / "__init__.py"))  # as pip installs it
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("QNWB_STORE", raising=False)
    monkeypatch.delenv("QNWB_REPORTS", raising=False)
    assert data_folder() == tmp_path / "xdg" / "qnwb"
    assert store_path() == tmp_path / "xdg" / "qnwb" / "qnwb.sqlite"
    assert reports_dir() == installed / "report_templates"
