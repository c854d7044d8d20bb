"""The dashboard, headless: widgets built and clicked without a browser or a kernel, a real runner in a real thread."""
import time

from qnwb.store import RunStore
from qnwb.widgets import Dashboard

SMALL = {"problem": "addition", "problem_options": {"T": 10, "hidden": 8, "batch_size": 50}, "evaluate_every": 2}


def wait_for(condition, seconds=120):
    end = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < end, "timed out waiting"  # a hang guard, not a speed check
        time.sleep(0.01)


def test_start_pause_step_and_stop_drive_a_run_in_a_thread_and_the_figures_grow(tmp_path):
    board = Dashboard({**SMALL, "optimizer": "nag", "hyperparameters": {"lr": 0.01}, "budget": {"steps": 100_000}},
                      store=RunStore(tmp_path / "s.sqlite"), refresh_s=0.0)
    board.buttons["start"].click()
    wait_for(lambda: board.runner.step >= 5)
    board.buttons["pause"].click()
    assert not board.thread.is_alive() and "paused" in board.message.value
    paused_at = board.runner.step
    assert len(board.loss_figure.data[0].x) == paused_at and board.loss_figure.data[1].x  # loss and held-out error drawn
    board.buttons["step"].click()
    assert board.runner.step == paused_at + 1 and len(board.loss_figure.data[0].x) == paused_at + 1
    board.buttons["start"].click()
    wait_for(lambda: board.runner.step >= paused_at + 4)
    board.buttons["stop"].click()
    assert not board.thread.is_alive() and "stopped" in board.message.value


def test_a_changed_control_reaches_the_optimizer_at_the_next_step_and_is_stored(tmp_path):
    store = RunStore(tmp_path / "s.sqlite")
    board = Dashboard({**SMALL, "optimizer": "hessian_free", "hyperparameters": {"cg_max_iterations": 10}, "budget": {"steps": 3}},
                      store=store)
    assert set(board.controls) == {"damping", "structural_damping", "cg_max_iterations"}
    board.buttons["step"].click()
    board.controls["damping"].value = 0.25
    board.buttons["step"].click()
    assert board.runner.history["steps"][1]["stats"]["damping"] == 0.25
    events = store.steering_events(board.runner.run_id)
    assert [(e["step"], e["parameter"], e["new_value"]) for e in events] == [(1, "damping", 0.25)]


def test_bad_control_values_show_a_message_and_leave_the_optimizer_unchanged():
    board = Dashboard({**SMALL, "optimizer": "lbfgs", "budget": {"steps": 2}})
    assert "memory" not in board.controls and set(board.controls) == {"lr"}
    before = board.runner.optimizer.param_groups[0]["lr"]
    board.controls["lr"].value = -1.0
    assert "refused" in board.message.value and board.controls["lr"].value == before
    board.buttons["step"].click()
    assert board.runner.optimizer.param_groups[0]["lr"] == before and board.runner.history["steering"] == []


def test_an_exception_in_the_training_thread_is_shown_not_lost():
    board = Dashboard({**SMALL, "optimizer": "sgd", "hyperparameters": {"lr": 1e30}, "budget": {"steps": 50}})
    board.buttons["start"].click()
    board.thread.join(120)
    assert isinstance(board.error, FloatingPointError) and "error" in board.message.value and board.runner.status == "failed"


def test_a_run_steered_from_the_dashboard_replays_to_the_same_parameters(tmp_path):
    import torch

    from qnwb.runs import replay

    store = RunStore(tmp_path / "s.sqlite")
    board = Dashboard({**SMALL, "optimizer": "hessian_free", "hyperparameters": {"cg_max_iterations": 10}, "budget": {"steps": 5}},
                      store=store)
    board.buttons["step"].click()
    board.controls["damping"].value = 0.3
    board.buttons["step"].click()
    board.buttons["step"].click()
    board.controls["structural_damping"].value = board.controls["structural_damping"].value + 0.01
    board.buttons["start"].click()
    board.thread.join(120)
    assert board.runner.step == 5 and len(store.steering_events(board.runner.run_id)) == 2
    again = replay(board.runner.run_id, store, into=store)
    assert all(torch.equal(p, q) for p, q in zip(board.runner.model.parameters(), again.model.parameters()))
    assert [(e["step"], e["parameter"]) for e in store.steering_events(again.run_id)] == [(1, "damping"), (3, "structural_damping")]
