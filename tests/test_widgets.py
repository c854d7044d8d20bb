"""The dashboard, headless: widgets built and clicked without a browser or a kernel, a real runner in a real thread."""

import time

import pytest
import torch

from qnwb.optim.schedules import SutskeverMomentum
from qnwb.store import RunStore
from qnwb.widgets import MOMENTUM_SCHEDULES, Dashboard, readable

SMALL = {
    "problem": "addition",
    "problem_options": {"T": 10, "hidden": 8, "batch_size": 50},
    "evaluate_every": 2,
}


def wait_for(condition, seconds=120):
    end = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < end, "timed out waiting"  # a hang guard, not a speed check
        time.sleep(0.01)


def test_start_pause_step_and_stop_drive_a_run_in_a_thread_and_the_figures_grow(tmp_path):
    board = Dashboard(
        {
            **SMALL,
            "optimizer": "nag",
            "hyperparameters": {"lr": 0.01},
            "budget": {"steps": 100_000},
        },
        store=RunStore(tmp_path / "s.sqlite"),
        refresh_s=0.0,
    )
    board.buttons["start"].click()
    wait_for(lambda: board.runner.step >= 5)
    board.buttons["pause"].click()
    assert not board.thread.is_alive() and "paused" in board.message.value
    paused_at, progress = board.runner.step, board.figures["progress"]
    assert (
        len(progress.data[0].x) == paused_at and progress.data[2].x[0] == 0
    )  # training loss; held-out error from step 0
    assert list(progress.data[2].x) == [e["step"] for e in board.runner.history["evaluations"]]
    board.buttons["step"].click()
    assert board.runner.step == paused_at + 1 and len(progress.data[0].x) == paused_at + 1
    assert [t.name for t in board.figures["optimizer"].data] == [
        "lr",
        "momentum",
    ]  # NAG: its ε and μ per step
    assert len(board.figures["optimizer"].data[1].y) == paused_at + 1
    board.buttons["start"].click()
    wait_for(lambda: board.runner.step >= paused_at + 4)
    board.buttons["stop"].click()
    assert not board.thread.is_alive() and "stopped" in board.message.value


def test_a_changed_control_reaches_the_optimizer_at_the_next_step_and_is_stored(tmp_path):
    store = RunStore(tmp_path / "s.sqlite")
    board = Dashboard(
        {
            **SMALL,
            "optimizer": "hessian_free",
            "hyperparameters": {"cg_max_iterations": 10},
            "budget": {"steps": 20},
        },
        store=store,
    )
    assert list(board.controls) == ["damping", "structural_damping", "cg_max_iterations"]
    board.buttons["step"].click()
    board.controls["damping"].value = 0.25
    board.buttons["step"].click()
    assert board.runner.history["steps"][1]["stats"]["damping"] == 0.25
    events = store.steering_events(board.runner.run_id)
    assert [(e["step"], e["parameter"], e["new_value"]) for e in events] == [(1, "damping", 0.25)]
    # HF's own λ update shows in the box, and showing it is not a steering event
    while (
        board.runner.optimizer.param_groups[0]["damping"] == 0.25 and board.runner.step < 20
    ):  # until ρ moves λ
        board.buttons["step"].click()
    chosen = board.runner.optimizer.param_groups[0]["damping"]
    assert (
        chosen != 0.25
        and board.controls["damping"].value == readable(chosen)  # four significant digits
        and len(store.steering_events(board.runner.run_id)) == 1
    )
    assert [t.name for t in board.figures["optimizer"].data][2:4] == [
        "ρ",
        "λ",
    ]  # hf_trace_figure, fed by HFTraceRecorder
    assert list(board.figures["optimizer"].data[3].y) == [
        s["stats"]["damping"] for s in board.runner.history["steps"]
    ]


def test_bad_control_values_show_a_message_and_leave_the_optimizer_unchanged():
    board = Dashboard({**SMALL, "optimizer": "lbfgs", "budget": {"steps": 2}}, store=False)
    before = board.runner.optimizer.param_groups[0]["lr"]
    board.controls["lr"].value = -1.0
    assert "refused" in board.message.value and board.controls["lr"].value == before
    board.buttons["step"].click()
    assert (
        board.runner.optimizer.param_groups[0]["lr"] == before
        and board.runner.history["steering"] == []
    )


def test_the_momentum_schedule_control_steers_a_schedule_spec_and_refuses_a_bad_mu_max(tmp_path):
    store = RunStore(tmp_path / "s.sqlite")
    board = Dashboard(
        {**SMALL, "optimizer": "nag", "hyperparameters": {"lr": 0.01}, "budget": {"steps": 6}},
        store=store,
    )
    assert set(board.controls) == {"lr", "momentum_schedule", "mu_max"}
    assert (board.controls["momentum_schedule"].value, board.controls["mu_max"].value) == (
        "constant μ",
        0.9,
    )
    board.buttons["step"].click()
    board.controls["mu_max"].value = 0.95
    board.controls["momentum_schedule"].value = "Sutskever eq. 5"
    board.controls["mu_max"].value = 1.5  # μ_max must be < 1: refused, put back, nothing queued
    assert "refused" in board.message.value and board.controls["mu_max"].value == 0.95
    board.buttons["start"].click()
    board.thread.join(120)
    momenta = [s["stats"]["momentum"] for s in board.runner.history["steps"]]
    assert momenta == [0.9] + [SutskeverMomentum(mu_max=0.95)(t) for t in range(1, 6)]
    events = [(e["step"], e["new_value"]) for e in store.steering_events(board.runner.run_id)]
    assert events == [(1, 0.95), (1, {"schedule": "SutskeverMomentum", "mu_max": 0.95})]
    assert set(MOMENTUM_SCHEDULES) >= {"constant μ", "Sutskever eq. 5"}


def test_an_exception_in_the_training_thread_is_shown_not_lost():
    board = Dashboard(
        {**SMALL, "optimizer": "sgd", "hyperparameters": {"lr": 1e4}, "budget": {"steps": 50}},
        store=False,
    )
    board.buttons["start"].click()
    board.thread.join(120)
    assert (
        isinstance(board.error, FloatingPointError)
        and "error" in board.message.value
        and board.runner.status == "failed"
    )


def test_reset_starts_a_new_run_from_the_pickers_and_stops_the_old_one(tmp_path):
    store = RunStore(tmp_path / "s.sqlite")
    board = Dashboard(
        {**SMALL, "optimizer": "hessian_free", "budget": {"steps": 100_000}},
        store=store,
        refresh_s=0.0,
    )
    board.buttons["start"].click()
    wait_for(lambda: board.runner.step >= 2)
    first, old_thread = board.runner, board.thread
    board.pickers["problem"].value = "xor"
    board.pickers["T"].value, board.pickers["hidden"].value, board.pickers["seed"].value = 12, 5, 7
    board.pickers["optimizer"].value = "adaqn"
    board.buttons["reset"].click()
    assert not old_thread.is_alive() and store.run(first.run_id)["status"] == "stopped"
    config = board.runner.config
    assert (
        config["problem"],
        config["problem_options"]["T"],
        config["problem_options"]["hidden"],
        config["optimizer"],
        config["seed"],
    ) == ("xor", 12, 5, "adaqn", 7)
    assert (
        board.runner.model.n_hidden == 5
        and board.runner.step == 0
        and board.runner.run_id != first.run_id
    )
    assert "lr" in board.controls and "damping" not in board.controls
    assert not board.figures["progress"].data[0].x  # the old run's curves are gone
    for _ in range(3):
        board.buttons["step"].click()
    memory = board.figures["optimizer"]  # memory_figure, fed by MemoryRecorder
    assert (
        memory.layout.title.text == "AdaQN: the pair memory"
        and memory.data[0].name == "pairs used by the step"
    )
    assert len(memory.data[0].y) == 3
    assert board.figures["hidden"].data[0].type == "heatmap"


def test_a_refused_reset_keeps_the_current_run():
    board = Dashboard({**SMALL, "optimizer": "adam", "budget": {"steps": 3}}, store=False)
    runner = board.runner
    board.pickers["problem"].value = "curves"
    board.pickers["optimizer"].value = "hessian_free"
    board.config = {**board.config, "evaluate_every": -1}  # a configuration the runner refuses
    board.buttons["reset"].click()
    assert (
        board.runner is runner
        and "error" in board.message.value
        and "evaluate_every" in board.message.value
    )


def test_a_spectrum_snapshot_is_taken_between_steps_and_does_not_change_the_run(tmp_path):
    from qnwb.runs import replay

    store = RunStore(tmp_path / "s.sqlite")
    board = Dashboard(
        {**SMALL, "optimizer": "adam", "hyperparameters": {"lr": 0.01}, "budget": {"steps": 40}},
        store=store,
    )
    board.buttons["start"].click()
    wait_for(lambda: board.runner.step >= 1)
    board.buttons["spectrum"].click()  # while running: the training thread takes it after its step
    board.thread.join(120)
    step, kind, probe = board.spectrum_snapshot
    assert 1 <= step < 40 and kind == "hessian" and probe.runs[0].values.numel() == 5
    assert (
        board.figures["spectrum"].data
        and f"at step {step}" in board.figures["spectrum"].layout.title.text
    )
    again = replay(board.runner.run_id, store)
    assert all(
        torch.equal(p, q) for p, q in zip(board.runner.model.parameters(), again.model.parameters())
    )


def test_a_run_steered_from_the_dashboard_replays_to_the_same_parameters(tmp_path):
    from qnwb.runs import replay

    store = RunStore(tmp_path / "s.sqlite")
    board = Dashboard(
        {
            **SMALL,
            "optimizer": "hessian_free",
            "hyperparameters": {"cg_max_iterations": 10},
            "budget": {"steps": 5},
        },
        store=store,
    )
    board.buttons["step"].click()
    board.controls["damping"].value = 0.3
    board.buttons["step"].click()
    board.buttons["step"].click()
    board.controls["structural_damping"].value = board.controls["structural_damping"].value + 0.01
    board.buttons["start"].click()
    board.thread.join(120)
    assert board.runner.step == 5 and len(store.steering_events(board.runner.run_id)) == 2
    again = replay(board.runner.run_id, store, into=store)
    assert all(
        torch.equal(p, q) for p, q in zip(board.runner.model.parameters(), again.model.parameters())
    )
    assert [(e["step"], e["parameter"]) for e in store.steering_events(again.run_id)] == [
        (1, "damping"),
        (3, "structural_damping"),
    ]


def test_the_default_store_records_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv("QNWB_STORE", str(tmp_path / "default.sqlite"))
    board = Dashboard({**SMALL, "optimizer": "adam", "budget": {"steps": 2}})
    board.buttons["step"].click()
    with RunStore(tmp_path / "default.sqlite") as store:
        assert store.run(board.runner.run_id)["steps"] == 1


def test_running_its_cell_again_closes_the_old_dashboard_and_joins_its_thread():
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    try:
        shell.user_ns["config"] = {**SMALL, "optimizer": "adam", "budget": {"steps": 1_000_000}}
        code = "from qnwb.widgets import Dashboard\nBOARD = Dashboard(config, store=False)\nBOARD.start()"
        shell.run_cell(code, cell_id="cell-a").raise_error()
        first = shell.user_ns["BOARD"]
        shell.run_cell(code.replace("BOARD", "other"), cell_id="cell-b").raise_error()
        other = shell.user_ns["other"]
        wait_for(lambda: first.runner.step >= 1)
        assert first.thread.is_alive() and first.cell == "cell-a"
        shell.run_cell(
            code, cell_id="cell-a"
        ).raise_error()  # the same cell again: its old dashboard stops
        assert first.closed and not first.thread.is_alive() and first.runner.status == "stopped"
        assert not other.closed and other.thread.is_alive()  # another cell's dashboard runs on
        for board in (shell.user_ns["BOARD"], other):
            board.close()
            assert not board.thread.is_alive()
    finally:
        InteractiveShell.clear_instance()


def test_close_stops_the_thread_and_refuses_to_start_again():
    board = Dashboard({**SMALL, "optimizer": "adam", "budget": {"steps": 1_000_000}}, store=False)
    board.buttons["start"].click()
    wait_for(lambda: board.runner.step >= 1)
    board.close()
    assert board.closed and not board.thread.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        board.start()


def test_memory_and_L_controls_resize_adaqn_at_the_next_step_and_refuse_zero(tmp_path):
    store = RunStore(tmp_path / "s.sqlite")
    board = Dashboard(
        {
            **SMALL,
            "optimizer": "adaqn",
            "hyperparameters": {"lr": 0.05, "L": 2, "memory": 3},
            "budget": {"steps": 8},
        },
        store=store,
    )
    assert list(board.controls) == ["lr", "L", "memory"]
    board.buttons["step"].click()
    board.controls[
        "memory"
    ].value = 0  # bad input (no memory at all): refused, shown, nothing changes
    assert (
        "refused" in board.message.value
        and board.controls["memory"].value == 3
        and board.runner._steering == []
    )
    board.controls["memory"].value = 5
    board.controls["L"].value = 3
    board.buttons["start"].click()
    board.thread.join(120)
    stats = [s["stats"] for s in board.runner.history["steps"]]
    assert [s["memory_capacity"] for s in stats] == [3] + [
        5
    ] * 7 and board.runner.optimizer.memory.size == 5
    assert [s["cycle_length"] for s in stats] == [2, 2] + [
        3
    ] * 6  # the cycle open at the change (steps 1–2) kept L = 2
    assert [
        (e["step"], e["parameter"], e["new_value"])
        for e in store.steering_events(board.runner.run_id)
    ] == [(1, "memory", 5), (1, "L", 3)]


def test_a_single_step_leaves_the_budget_and_its_checkpoint_alone_and_stop_is_final(tmp_path):
    board = Dashboard(
        {**SMALL, "optimizer": "adam", "budget": {"steps": 50}},
        store=RunStore(tmp_path / "s.sqlite"),
    )
    board.buttons["step"].click()
    assert board.runner.step == 1 and board.runner.config["budget"] == {"steps": 50}
    assert torch.load(board.runner.checkpoint_path, weights_only=False)["config"]["budget"] == {
        "steps": 50
    }
    board.buttons["stop"].click()
    for button in ("start", "step"):
        board.buttons[button].click()
        assert board.runner.step == 1 and "press reset" in board.message.value
    board.buttons["reset"].click()
    board.buttons["step"].click()
    assert board.runner.step == 1 and board.runner.history["steps"]


def test_the_momentum_control_keeps_the_schedules_other_arguments_and_sgds_momentum_is_a_float_box():
    rnn = {"schedule": "RNNMomentum", "mu0": 0.99, "switch": 3, "initial": 0.5}
    board = Dashboard(
        {
            **SMALL,
            "optimizer": "nag",
            "hyperparameters": {"lr": 0.01, "momentum": rnn},
            "budget": {"steps": 5},
        },
        store=False,
    )
    board.controls["mu_max"].value = 0.9
    board.buttons["start"].click()
    board.thread.join(120)
    assert board.runner.in_force("momentum") == {**rnn, "mu0": 0.9}  # switch and initial kept
    assert [s["stats"]["momentum"] for s in board.runner.history["steps"]] == [
        0.5,
        0.5,
        0.5,
        0.9,
        0.9,
    ]
    sgd = Dashboard(
        {**SMALL, "optimizer": "sgd", "hyperparameters": {"lr": 0.01}, "budget": {"steps": 2}},
        store=False,
    )
    sgd.controls["momentum"].value = 0.9
    sgd.buttons["step"].click()
    assert (
        type(sgd.controls["momentum"]).__name__ == "FloatText"
        and sgd.runner.optimizer.param_groups[0]["momentum"] == 0.9
    )


def test_a_spectrum_asked_for_during_the_last_step_is_still_taken_and_reset_closes_old_controls():
    board = Dashboard({**SMALL, "optimizer": "adam", "budget": {"steps": 3}}, store=False)
    old_controls = list(board.controls.values())
    inner = (
        board.runner.on_step
    )  # the button pressed from the kernel's thread just after the last step's hook ran:
    board.runner.on_step = lambda info: (
        inner(info),
        info["step"] == 3 and setattr(board, "_spectrum_requested", True),
    )
    board.buttons["start"].click()
    board.thread.join(120)
    assert (
        board.spectrum_snapshot is not None
        and board.spectrum_snapshot[0] == 3
        and not board._spectrum_requested
    )
    board.buttons["reset"].click()
    assert board.spectrum_snapshot is None and all(
        c.comm is None for c in old_controls
    )  # closed widgets drop their comm


def test_a_log_slider_steers_the_step_size_and_follows_hfs_damping(tmp_path):
    store = RunStore(tmp_path / "s.sqlite")
    board = Dashboard(
        {
            **SMALL,
            "optimizer": "hessian_free",
            "hyperparameters": {"cg_max_iterations": 5},
            "budget": {"steps": 20},
        },
        store=store,
    )
    assert list(board.sliders) == ["damping"]  # λ spans decades; μ and CG's cap do not get one
    board.sliders["damping"].value = (
        10.0**-2.5
    )  # moved by hand: the box shows it at four digits and steers
    assert board.controls["damping"].value == readable(10.0**-2.5) == 0.003162
    board.buttons["step"].click()
    assert board.runner.history["steps"][0]["stats"]["damping"] == 0.003162
    steered = len(store.steering_events(board.runner.run_id))
    while board.runner.optimizer.param_groups[0]["damping"] == 0.003162 and board.runner.step < 20:
        board.buttons["step"].click()  # until ρ moves λ
    followed = board.runner.optimizer.param_groups[0]["damping"]
    assert board.sliders["damping"].value == pytest.approx(
        readable(followed)
    )  # the slider follows the box
    assert (
        len(store.steering_events(board.runner.run_id)) == steered == 1
    )  # following is not steering
    board.close()
    assert all(s.comm is None for s in board.sliders.values())  # closed with the rest


def test_a_slider_for_the_step_size_of_a_first_order_method():
    board = Dashboard({**SMALL, "optimizer": "nag", "budget": {"steps": 2}}, store=False)
    assert "lr" in board.sliders
    board.sliders["lr"].value = 0.001
    board.buttons["step"].click()
    assert board.runner.optimizer.param_groups[0]["lr"] == 0.001
    board.close()
