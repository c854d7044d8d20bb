"""What the ranks of the data-parallel tests run (spawned processes import it by name), and the same on one process."""

import torch

from qnwb.core import flat_params, make_generator
from qnwb.curvature import (
    GGN,
    EmpiricalFisher,
    Hessian,
    empirical_fisher_diagonal,
    ggn_diagonal_estimate,
)
from qnwb.losses import matching_loss
from qnwb.models import TanhRNN
from qnwb.optim import make_optimizer, take_step
from qnwb.parallel import combine_with_loss, shard, world

LOSS = matching_loss("squared_error")


def rnn(seed: int = 0) -> TanhRNN:
    "A small float64 tanh RNN whose units are neither linear nor saturated."
    return TanhRNN(2, 6, 1, dtype=torch.float64, generator=make_generator(seed))


def batch(seed: int, cases: int = 7, steps: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    "Inputs and targets of `cases` sequences; targets only at some time steps (NaN elsewhere)."
    g = make_generator(1000 + seed)
    inputs = torch.randn(cases, steps, 2, generator=g, dtype=torch.float64)
    targets = torch.randn(cases, steps, 1, generator=g, dtype=torch.float64)
    targets[:, : steps // 2] = float("nan")
    return inputs, targets


def products(seed: int = 0) -> dict:
    """The gradient, GGN·v with structural damping, Hessian·v, the Fisher's product and diagonals on this rank's
    shard of one batch (the whole batch on one process), summed across the ranks."""
    model = rnn(seed)
    data = shard(batch(seed))
    v = torch.randn(flat_params(model).numel(), generator=make_generator(7), dtype=torch.float64)
    value = LOSS(model(data[0]), data[1])
    grads = torch.autograd.grad(value, list(model.parameters()))
    loss, gradient = combine_with_loss(value, torch.cat([g.reshape(-1) for g in grads]), data)
    ggn = GGN(model, LOSS, data, structural_distance="tanh", structural_weight=0.3)
    fisher = EmpiricalFisher(model, LOSS, data)
    return {
        "rank": world()[0],
        "loss": loss.detach(),
        "gradient": gradient,
        "ggn": ggn.mv(v),
        "ggn_plain": ggn.mv(v, structural=False),
        "quadratic_form": torch.tensor(ggn.quadratic_form(v)),
        "hessian": Hessian(model, LOSS, data).mv(v),
        "fisher": fisher.mv(v),
        "fisher_diagonal": fisher.diagonal(),
        "fisher_diagonal_streamed": empirical_fisher_diagonal(model, LOSS, data, chunk=2),
        "chapelle_erhan": ggn_diagonal_estimate(
            model,
            LOSS,
            data,
            samples=2,
            structural_distance="tanh",
            structural_weight=0.3,
            generator=make_generator(11),
        ),
    }


def trajectory(name: str, hyperparameters: dict, steps: int = 10, seed: int = 0) -> dict:
    """`steps` steps of optimizer `name` through take_step, every batch (gradient, curvature, monitoring) this rank's
    shard of the same draws: θ after each step and the stats every rank must agree on."""
    model = rnn(seed)
    optimizer = make_optimizer(name, model, LOSS, hyperparameters, seed)
    draws = iter(range(10_000))
    monitor = shard(batch(999, cases=9))
    thetas, stats = [], []
    for k in range(steps):
        result = take_step(
            optimizer,
            model,
            LOSS,
            shard(batch(k, cases=8)),
            curvature_batches=lambda: shard(batch(500 + next(draws), cases=6)),
            monitor_batch=monitor,
        )
        thetas.append(flat_params(model).clone())
        stats.append(
            {
                "loss": result.loss,
                **{k: v for k, v in result.stats.items() if isinstance(v, (int, float, str))},
            }
        )
    return {"rank": world()[0], "thetas": torch.stack(thetas), "stats": stats}


# the optimizers' settings in the trajectory tests: HF with λ = 10 keeps its CG well conditioned, so rounding is
# not amplified (at λ = 1 with 15–20 CG iterations a 1e-16 change of θ grows to 1e-9 in one step on one process too)
TRAJECTORIES = {
    "hessian_free": {"structural_damping": 0.1, "cg_max_iterations": 20, "damping": 10.0},
    "lbfgs": {"lr": 0.5},
    "sqn": {"lr": 0.05, "L": 2},
    "adaqn": {"lr": 0.05, "L": 2},
    "lsr1": {},
    "cm": {"lr": 0.01, "momentum": 0.9},
    "nag": {"lr": 0.01, "momentum": 0.9},
}


def trajectories(steps: int = 10) -> dict:
    "`trajectory` of every optimizer of TRAJECTORIES, in one process group."
    return {name: trajectory(name, h, steps) for name, h in TRAJECTORIES.items()}


def run_config(config: dict, store: str | bool, die_at: int | None = None) -> dict:
    """A Runner's run of `config` on this rank (rank 0 records it in `store`); rank 1 exits abruptly after step
    `die_at` when given, as a crashed machine would."""
    import os

    from qnwb.runs import Runner

    runner = Runner(config, store=store, progress=False)
    if die_at is not None and world()[0] == 1:
        runner.on_step = lambda info: os._exit(3) if info["step"] == die_at else None
    summary = runner.run()
    return {
        "rank": world()[0],
        "run_id": runner.run_id,
        "losses": [row["loss"] for row in runner.history["steps"]],
        "evaluations": [
            (row["validation_loss"], row["validation_error"], row["train_loss"])
            for row in runner.history["evaluations"]
        ],
        "theta": flat_params(runner.model).clone(),
        "status": summary["status"],
    }


def warnings_of_lenet() -> list[str]:
    "The warnings a Runner of the batch-normalised LeNet problem gives on this rank."
    import warnings

    from qnwb.runs import Runner

    config = {
        "problem": "lenet",
        "problem_options": {"batch_norm": True},
        "optimizer": "nag",
        "budget": {"steps": 1},
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Runner(config, store=False, progress=False)
    return [str(w.message) for w in caught]
