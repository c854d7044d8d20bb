"""Adding an optimizer in one place: a registry entry is all the runner, the benchmarks, the reports' run grid and the
dashboard need; and the step adapter drives every registered optimizer the same way."""

import pytest
import torch

from qnwb.optim import (
    OPTIMIZERS,
    OptimizerEntry,
    entry_for,
    make_optimizer,
    optimizer_entry,
    register_optimizer,
    suggested_hyperparameters,
    take_step,
)


class SignDescent(torch.optim.Optimizer):
    """θ ← θ − lr·sign(∇f): a small optimizer that is nobody's default, with the stats qnwb's optimizers publish."""

    def __init__(self, params, lr: float = 0.01, shrink: float = 1.0):
        if not 0 < lr <= 1:
            raise ValueError(f"lr: must be in (0, 1], got {lr!r}")
        super().__init__(params, {"lr": lr, "shrink": shrink})
        self.stats = {}

    @torch.no_grad()
    def step(self, closure):
        with torch.enable_grad():
            loss = closure()
        group = self.param_groups[0]
        for p in group["params"]:
            p.sub_(group["lr"] * p.grad.sign())
        group["lr"] *= group["shrink"]
        self.stats = {"lr": group["lr"], "loss": float(loss)}
        return loss


@pytest.fixture
def sign_descent():
    entry = register_optimizer(
        "sign_descent",
        OptimizerEntry(
            SignDescent,
            controls=("lr",),
            construction_only=("shrink",),
            suggested={"default": {"lr": 0.02}},
        ),
    )
    yield entry
    del OPTIMIZERS["sign_descent"]


SMALL = {
    "problem": "addition",
    "problem_options": {"T": 10, "hidden": 4, "batch_size": 20, "held_out": 20},
}


def test_a_registered_optimizer_runs_through_the_runner(sign_descent):
    from qnwb.runs import Runner

    runner = Runner(
        {
            **SMALL,
            "optimizer": "sign_descent",
            "hyperparameters": {"lr": 0.01},
            "budget": {"steps": 6},
        },
        store=False,
        progress=False,
    )
    assert runner.run()["steps"] == 6
    assert (
        runner.counts["gradient_evaluations"] == 6
        and runner.history["steps"][-1]["stats"]["lr"] == 0.01
    )
    assert runner.steerable() == ["lr"]  # shrink is construction-only
    runner.steer("lr", 0.005)
    runner.config["budget"] = {"steps": 7}
    runner.run()
    assert runner.optimizer.param_groups[0]["lr"] == 0.005


def test_a_registered_optimizer_runs_in_the_benchmark(sign_descent):
    from qnwb.bench import bench_optimizers

    result = bench_optimizers(
        ["sign_descent", "adam"],
        steps=3,
        lrs={"sign_descent": 0.01},
        hidden=6,
        layers=1,
        length=4,
        batch=3,
        evaluate_every=3,
    )
    assert set(result["optimizers"]) == {"sign_descent", "adam"}
    assert len(result["optimizers"]["sign_descent"]["train"]) == 3


def test_a_registered_optimizer_runs_in_a_report_grid(sign_descent, capsys):
    from qnwb.reports import run_grid

    runners, failed = run_grid(
        ["sign_descent"],
        [0, 1],
        lambda o, s: {**SMALL, "optimizer": o, "seed": s, "budget": {"steps": 2}},
        store=False,
    )
    assert sorted(runners) == [("sign_descent", 0), ("sign_descent", 1)] and not failed
    assert runners["sign_descent", 1].config["hyperparameters"] == {
        "lr": 0.02
    }  # its entry's suggestion
    assert "sign_descent seed 1: finished" in capsys.readouterr().out


def test_a_registered_optimizer_gets_its_dashboard_controls(sign_descent):
    pytest.importorskip("ipywidgets")
    from qnwb.widgets import Dashboard

    board = Dashboard({**SMALL, "optimizer": "sign_descent", "budget": {"steps": 2}}, store=False)
    try:
        assert list(board.controls) == ["lr"] and board.controls["lr"].value == 0.02
        assert "sign_descent" in board.pickers["optimizer"].options
        board.controls["lr"].value = 0.03
        board.buttons["step"].click()
        assert board.runner.optimizer.param_groups[0]["lr"] == 0.03
    finally:
        board.close()


def test_registering_refuses_what_it_cannot_use():
    with pytest.raises(ValueError, match="already registered"):
        register_optimizer("adam", OPTIMIZERS["adam"])
    with pytest.raises(ValueError, match="not hyperparameters of SignDescent"):
        OptimizerEntry(SignDescent, controls=("momentum",))
    with pytest.raises(ValueError, match="curvature_batches"):
        OptimizerEntry(SignDescent, curvature_batches="always")
    with pytest.raises(ValueError, match="not one of"):
        optimizer_entry("sign_descent")  # the fixture's entry is gone again


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_the_step_adapter_counts_what_the_optimizer_reports(name):
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2).double()
    x, y = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
    from qnwb.losses import matching_loss

    loss = matching_loss("squared_error")
    optimizer = make_optimizer(name, net, loss, suggested_hyperparameters(name))
    with torch.no_grad():
        before = float(loss(net(x), y))
    closure_calls = []
    wrap = lambda f: lambda: (closure_calls.append(1), f())[1]
    result = take_step(
        optimizer,
        net,
        loss,
        (x, y),
        curvature_batches=lambda: (x, y),
        monitor_batch=(x, y),
        wrap=wrap,
    )
    entry = entry_for(optimizer)[1]
    if entry.step_takes == "closure":
        assert (
            result.gradient_evaluations == len(closure_calls) >= 1
        )  # every closure call, counted (no monitor at step 1)
    else:
        assert (
            result.gradient_evaluations == result.stats["gradient_evaluations"]
            and not closure_calls
        )
    assert (result.curvature_products > 0) == (
        entry.curvature_products and name == "hessian_free"
    )  # SQN's first pair comes later
    assert result.loss == pytest.approx(
        before, rel=1e-9
    )  # the batch loss at the parameters before the step
    with torch.no_grad():
        assert float(loss(net(x), y)) != before  # and the step moved them


def test_a_step_that_needs_curvature_batches_says_so():
    net = torch.nn.Linear(2, 1)
    from qnwb.losses import matching_loss

    loss = matching_loss("squared_error")
    optimizer = make_optimizer("sqn", net, loss)
    with pytest.raises(ValueError, match="curvature_batches: 'sqn'"):
        take_step(optimizer, net, loss, (torch.randn(4, 2), torch.randn(4, 1)))


@pytest.mark.parametrize("optimizer", ["lsr1", "nag", "cm"])
def test_a_step_that_leaves_theta_leaves_batch_norms_running_statistics_bit_for_bit(optimizer):
    import math

    from qnwb.losses import matching_loss
    from qnwb.models import LeNet
    from qnwb.optim import make_optimizer, take_step

    net = LeNet("mnist", batch_norm=True, generator=torch.Generator().manual_seed(0))
    images = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(8)
    loss = matching_loss("softmax_cross_entropy")
    hyper = {"lsr1": {"radius": 1e3}}.get(optimizer, {"lr": 0.01})
    built = make_optimizer(optimizer, net, loss, hyper)
    before = [b.clone() for b in net.buffers()]
    if optimizer == "lsr1":  # a first trial 1000 long is rejected (ρ ≤ η)
        assert take_step(built, net, loss, (images, labels)).stats["accepted"] is False
    else:  # a batch with NaN pixels: the step is refused
        take_step(built, net, loss, (images.masked_fill(images > 0.5, math.nan), labels))
    assert all(torch.equal(b, c) for b, c in zip(net.buffers(), before))
    take_step(
        built, net, loss, (images, labels)
    )  # an accepted step (for L-SR1: the next, shorter trial, or later)
    for _ in range(5):
        if not all(torch.equal(b, c) for b, c in zip(net.buffers(), before)):
            break
        take_step(built, net, loss, (images, labels))
    assert not all(torch.equal(b, c) for b, c in zip(net.buffers(), before))
