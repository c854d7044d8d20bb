"""qnwb.optim.HessianFree: the Levenberg–Marquardt rule, ρ, convergence, structural damping, state_dict, safety."""

import copy
import math

import pytest
import torch
from references import explicit_ggn, explicit_structural
from torch import nn

from qnwb.core import assign_flat_, flat_params, make_generator
from qnwb.curvature import GGN
from qnwb.init import esn_init_
from qnwb.models import TanhRNN
from qnwb.optim import HessianFree, levenberg_marquardt
from qnwb.tasks import Addition


@pytest.mark.parametrize(
    "rho, expected",
    [
        (0.76, 2 / 3),
        (0.75, 1.0),
        (0.5, 1.0),
        (0.25, 1.0),
        (0.24, 1.5),
        (-2.0, 1.5),
        (math.nan, 1.5),
        (math.inf, 1.5),
        (5.0, 2 / 3),
    ],
)
def test_levenberg_marquardt_rule_of_section_8_5(rho, expected):
    assert levenberg_marquardt(1.0, rho) == pytest.approx(expected)


def least_squares(seed=0, n=200):
    g = make_generator(seed)
    X = torch.randn(n, 6, generator=g, dtype=torch.float64)
    Y = X @ torch.randn(6, 2, generator=g, dtype=torch.float64) + 0.1 * torch.randn(
        n, 2, generator=g, dtype=torch.float64
    )
    torch.manual_seed(seed)
    return nn.Linear(6, 2, dtype=torch.float64), X, Y


def lstsq_solution(X, Y):
    design = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], 1)
    return torch.linalg.lstsq(design, Y).solution


@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
def test_convex_least_squares_is_solved_in_a_handful_of_steps(curvature):
    model, X, Y = least_squares()
    hf = HessianFree(model, "squared_error", damping=1e-3, curvature=curvature)
    for _ in range(4):
        hf.step((X, Y))
    torch.testing.assert_close(
        torch.cat([model.weight.T, model.bias[None]]).detach(),
        lstsq_solution(X, Y),
        rtol=1e-8,
        atol=1e-10,
    )


def test_rho_is_one_on_a_quadratic_and_the_damped_switch_measures_against_cg_s_model():
    model, X, Y = least_squares(1)
    hf = HessianFree(model, "squared_error", damping=1.0)
    hf.step((X, Y))
    assert hf.stats["rho"] == pytest.approx(1.0, abs=1e-9)  # f is exactly its undamped model here
    assert hf.stats["next_damping"] == pytest.approx(2 / 3)
    model2, X2, Y2 = least_squares(1)
    damped = HessianFree(model2, "squared_error", damping=1.0, rho="damped")
    damped.step((X2, Y2))
    s = damped.stats
    # the damped model adds ½λ‖δ‖², so it predicts less decrease than f delivers: ρ > 1
    assert s["rho"] > 1.0 and s["model_reduction_damped"] > s["model_reduction_undamped"]


def addition_rnn(T=10, hidden=8, seed=0):
    task = Addition(T)
    model = esn_init_(
        TanhRNN(2, hidden, 1, dtype=torch.float64), input_scale=0.1, generator=make_generator(seed)
    )
    batch = task.batch(64, make_generator(seed + 1), dtype=torch.float64)
    return model, batch


def test_state_dict_round_trips_mid_run_and_the_resumed_run_continues_identically():
    model, batch = addition_rnn()
    hf = HessianFree(
        model, "squared_error", damping=0.5, structural_damping=0.3, cg_max_iterations=30
    )
    for _ in range(2):
        hf.step(batch)
    saved_model, saved_optimizer = copy.deepcopy(model.state_dict()), copy.deepcopy(hf.state_dict())
    for _ in range(2):
        hf.step(batch)
    expected, expected_damping = flat_params(model).clone(), hf.param_groups[0]["damping"]

    resumed_model, _ = addition_rnn()
    resumed_model.load_state_dict(saved_model)
    resumed = HessianFree(
        resumed_model, "squared_error", damping=123.0, structural_damping=0.3, cg_max_iterations=30
    )
    resumed.load_state_dict(
        saved_optimizer
    )  # λ, μ, the previous update and the step count come back
    for _ in range(2):
        resumed.step(batch)
    torch.testing.assert_close(flat_params(resumed_model), expected, rtol=0, atol=0)
    assert resumed.param_groups[0]["damping"] == expected_damping and resumed.stats["step"] == 4


def first_update(**options):
    model, batch = addition_rnn(seed=3)
    before = flat_params(model).clone()
    hf = HessianFree(
        model,
        "squared_error",
        damping=0.1,
        cg_max_iterations=20,
        line_search=False,
        iterate_selection="last",
        **options,
    )
    hf.step(batch)
    return flat_params(model) - before, hf.stats


def test_structural_damping_changes_the_update_and_can_use_the_squared_distance():
    plain, s0 = first_update()
    tanh, s1 = first_update(structural_damping=1.0)
    squared, s2 = first_update(structural_damping=1.0, structural_distance="squared")
    assert s0["structural_weight"] == 0 and s1["structural_weight"] == pytest.approx(0.1)  # λμ
    assert (plain - tanh).norm() > 1e-3 * plain.norm() and (
        tanh - squared
    ).norm() > 1e-4 * tanh.norm()
    # What structural damping penalises is the predicted change of the hidden states, δᵀG_Sδ (M&S 2011 §3.2),
    # not the length of δ: measured 38.4 without it and 0.025 with it on this problem.
    model, batch = addition_rnn(seed=3)
    G = GGN(model, "squared_error", batch, structural_distance="tanh", structural_weight=0.0)
    G_plus = GGN(model, "squared_error", batch, structural_distance="tanh", structural_weight=1.0)

    def hidden_change(d):
        return (d @ G_plus.mv(d) - d @ G.mv(d)).item()

    assert hidden_change(tanh) < hidden_change(plain) / 100


class ExplodesBeyond(nn.Module):
    """A linear model whose output is NaN once any weight exceeds a bound: a stand-in for an overflowing network."""

    def __init__(self, bound=2.0):
        super().__init__()
        self.bound = bound
        self.linear = nn.Linear(3, 1, dtype=torch.float64)
        with torch.no_grad():
            self.linear.weight.zero_()
            self.linear.bias.zero_()

    def forward(self, x):
        out = self.linear(x)
        return torch.where(
            self.linear.weight.abs().max() > self.bound, torch.full_like(out, math.nan), out
        )


def test_a_non_finite_loss_never_reaches_the_parameters():
    model = ExplodesBeyond()
    g = make_generator(0)
    X = torch.randn(50, 3, generator=g, dtype=torch.float64)
    Y = X @ torch.tensor(
        [[10.0], [0.0], [0.0]], dtype=torch.float64
    )  # the full step wants a weight of 10
    hf = HessianFree(model, "squared_error", damping=1e-4)
    hf.step((X, Y))
    s = hf.stats
    assert torch.isfinite(flat_params(model)).all() and model.linear.weight.abs().max() <= 2.0
    assert s["step_size"] < 1.0 and math.isfinite(s["loss_after"]) and s["loss_after"] < s["loss"]
    assert s["next_damping"] > s["damping"]  # ρ was not finite at the proposed step


def test_a_smaller_curvature_batch_and_the_counts():
    model, X, Y = least_squares(2)
    hf = HessianFree(model, "squared_error", damping=1e-2)
    hf.step((X, Y), curvature_batch=(X[:50], Y[:50]))
    s = hf.stats
    assert s["curvature_products"] == s["cg_iterations"]  # CG's products only:
    assert s["forward_products"] == 1  # the undamped ρ's δᵀGδ is one forward-mode product
    hf.step((X, Y), curvature_batch=(X[:50], Y[:50]))
    assert (
        hf.stats["curvature_products"] == hf.stats["cg_iterations"] + 1
    )  # a warm start costs one product more
    assert set(s) >= {
        "loss",
        "loss_after",
        "rho",
        "damping",
        "cg_iterations",
        "cg_stop",
        "chosen_iterate",
        "step_size",
        "model_reduction_undamped",
        "model_reduction_damped",
        "gradient_s",
        "cg_s",
        "evaluation_s",
    }


@pytest.mark.parametrize(
    "options, words",
    [
        ({"damping": -1.0}, "damping"),
        ({"structural_damping": -0.1}, "structural_damping"),
        ({"warm_start": 1.01}, "warm_start"),
        ({"warm_start": -0.5}, "warm_start"),
        ({"lr": 0.0}, "lr"),
        ({"cg_max_iterations": 0}, "cg_max_iterations"),
        ({"cg_tolerance": 0.0}, "cg_tolerance"),
        ({"rho": "optimistic"}, "rho"),
        ({"curvature": "fisher"}, "curvature"),
        ({"curvature": "hessian", "structural_damping": 0.1}, "structural_damping"),
        ({"structural_distance": "cosine"}, "structural_distance"),
        ({"structural_reduction": "median"}, "structural_reduction"),
        ({"cg_min_iterations": 300}, "cg_min_iterations"),
        ({"preconditioner": "jacobi"}, "preconditioner"),
        ({"preconditioner_exponent": 0.0}, "preconditioner_exponent"),
        ({"preconditioner_exponent": 1.5}, "preconditioner_exponent"),
        ({"preconditioner_shift": -1.0}, "preconditioner_shift"),
        ({"iterate_selection": "best"}, "iterate_selection"),
        ({"warm_start_from": "first"}, "warm_start_from"),
        ({"cg_objective_window": 0}, "cg_objective_window"),
        ({"cg_objective_every": 0}, "cg_objective_every"),
        ({"cg_objective_tolerance": -1e-3}, "cg_objective_tolerance"),
        ({"lr": lambda t: 0.0}, "lr.*schedule at update 0"),
        ({"warm_start": lambda t: 2.0}, "warm_start.*schedule at update 0"),
    ],
)
def test_bad_hyperparameters_get_clear_errors(options, words):
    model, _, _ = least_squares()
    with pytest.raises(ValueError, match=words):
        HessianFree(model, "squared_error", **options)


def test_a_step_with_no_acceptable_length_is_rejected_and_theta_stays():
    model = ExplodesBeyond(bound=0.0)  # any change of the weights makes the loss NaN
    g = make_generator(0)
    X = torch.randn(50, 3, generator=g, dtype=torch.float64)
    Y = X @ torch.tensor([[1.0], [0.0], [0.0]], dtype=torch.float64)
    before = flat_params(model).clone()
    hf = HessianFree(model, "squared_error", damping=1e-2)
    hf.step((X, Y))
    torch.testing.assert_close(flat_params(model), before, rtol=0, atol=0)
    assert hf.stats["step_size"] == 0.0 and hf.stats["loss_after"] == hf.stats["loss"]
    assert hf.stats["next_damping"] == pytest.approx(1.5e-2)


def stretch_cg(monkeypatch, stretch) -> list:
    "Make every CG iterate HF sees `stretch(x, b)` (b = −∇f), to steer its line search; returns the list of stretched iterates."
    import qnwb.optim.hessian_free

    seen, original = [], qnwb.optim.hessian_free.conjugate_gradient

    def stretched(A, b, x0=None, **kwargs):
        result = original(A, b, x0, **kwargs)
        result.saved = [(i, stretch(x, b)) for i, x in result.saved]
        seen.extend(x for _, x in result.saved)
        return result

    monkeypatch.setattr(qnwb.optim.hessian_free, "conjugate_gradient", stretched)
    return seen


def test_the_backtracking_of_section_8_8_is_the_shared_armijo_search(monkeypatch):
    """An update three times too long is shrunk by the shared Armijo search, from 0.8ε by factors 0.8 with c = 1e-2 and no
    resolution stop: the same accepted length, loss and number of tries, and the parameters θ + αδ bit for bit."""
    from qnwb.optim.line_search import armijo_backtracking

    model, X, Y = least_squares(4)
    seen = stretch_cg(monkeypatch, lambda x, b: 3.0 * x)
    hf = HessianFree(model, "squared_error", damping=1e-3, iterate_selection="last")
    theta = flat_params(model).clone()
    f0 = hf.step((X, Y))
    after, delta = flat_params(model).clone(), seen[-1]

    def phi(alpha):
        assign_flat_(list(model.parameters()), theta + alpha * delta)
        return hf._objective((X, Y)), math.nan, None

    assign_flat_(list(model.parameters()), theta)
    with torch.enable_grad():
        value = hf.loss(model(X), Y)
        g = torch.cat([v.flatten() for v in torch.autograd.grad(value, list(model.parameters()))])
    reference = armijo_backtracking(
        phi, f0, float(g @ delta), 0.8, c1=1e-2, factor=0.8, max_evaluations=60, resolution=None
    )
    assert (
        reference.success and reference.evaluations == 2
    )  # 3·0.8 and 3·0.64 times the update: the second is short enough
    assert (hf.stats["step_size"], hf.stats["line_search_tries"], hf.stats["loss_after"]) == (
        reference.alpha,
        reference.evaluations,
        reference.value,
    )
    assert torch.equal(after, theta + reference.alpha * delta)


def test_an_infinite_slope_spends_every_try_and_rejects_the_step(monkeypatch):
    "∇fᵀδ = −∞ (an overflowed product): every one of the tries is evaluated, none passes the bound, θ stays."
    model, X, Y = least_squares(5)
    stretch_cg(monkeypatch, lambda x, b: b * math.inf)
    hf = HessianFree(model, "squared_error", damping=1e-3, line_search_tries=5)
    before = flat_params(model).clone()
    hf.step((X, Y))
    assert (hf.stats["line_search_tries"], hf.stats["step_size"]) == (5, 0.0)
    assert torch.equal(flat_params(model), before)


def test_the_next_cg_run_starts_from_zeta_times_the_chosen_update(monkeypatch):
    import qnwb.optim.hessian_free

    model, X, Y = least_squares(3)
    hf = HessianFree(model, "squared_error", damping=0.5, warm_start=0.9, cg_max_iterations=3)
    before = flat_params(model).clone()
    hf.step((X, Y))
    assert hf.stats["step_size"] == 1.0
    delta = flat_params(model) - before
    stored = hf.state[hf.param_groups[0]["params"][0]]["previous_update"]
    torch.testing.assert_close(stored, delta, rtol=1e-12, atol=1e-14)
    starts, original = [], qnwb.optim.hessian_free.conjugate_gradient

    def recording(A, b, x0=None, **kwargs):
        starts.append(x0)
        return original(A, b, x0, **kwargs)

    monkeypatch.setattr(qnwb.optim.hessian_free, "conjugate_gradient", recording)
    hf.step((X, Y))
    torch.testing.assert_close(starts[0], 0.9 * delta, rtol=1e-12, atol=1e-14)


def test_a_step_that_raised_the_loss_raises_lambda_even_when_the_model_predicted_an_increase():
    model, X, Y = least_squares(8)
    hf = HessianFree(
        model,
        "squared_error",
        damping=1.0,
        warm_start=1.0,
        cg_max_iterations=1,
        iterate_selection="last",
        line_search=False,
        preconditioner=None,
    )
    far = 20.0 * torch.randn(14, generator=make_generator(0), dtype=torch.float64)
    hf.state[hf.param_groups[0]["params"][0]]["previous_update"] = (
        far  # a warm start far away: M(δ) > 0 after one CG step
    )
    # (measured: M(δ) = +11.0, f 5.3 → 16.3; Δf/M would be +1.0 and would have lowered λ)
    hf.step((X, Y))
    s = hf.stats
    assert s["model_reduction_undamped"] > 0 and s["loss_after"] > s["loss"]
    assert s["rho"] == -math.inf and s["next_damping"] == pytest.approx(1.5)


def test_the_preconditioner_follows_lambda_and_is_on_for_feed_forward_nets_only():
    from qnwb.curvature import EmpiricalFisher

    model, X, Y = least_squares(4)
    hf = HessianFree(
        model, "squared_error", damping=0.5
    )  # "auto": a feed-forward net gets the Fisher diagonal
    for _ in range(2):
        before = copy.deepcopy(model)
        hf.step((X, Y))
        λ = hf.stats["damping"]
        expected = (EmpiricalFisher(before, "squared_error", (X, Y)).diagonal() + λ).pow(0.75)
        torch.testing.assert_close(hf.last_preconditioner, expected)
    assert hf.stats["damping"] != 0.5  # λ moved, and the preconditioner moved with it
    rnn, batch = addition_rnn()
    assert (
        HessianFree(rnn, "squared_error").options["preconditioner"] is None
    )  # M&S 2011: off for RNNs
    estimated = HessianFree(
        rnn, "squared_error", structural_damping=0.1, preconditioner="chapelle_erhan"
    )
    estimated.step(batch)
    assert (
        estimated.last_preconditioner.shape == flat_params(rnn).shape
        and (estimated.last_preconditioner > 0).all()
    )


def test_a_good_diagonal_preconditioner_speeds_up_a_badly_scaled_problem():
    g = make_generator(5)
    scales = torch.logspace(-2, 2, 6, dtype=torch.float64)
    X = torch.randn(300, 6, generator=g, dtype=torch.float64) * scales
    Y = X @ torch.randn(6, 1, generator=g, dtype=torch.float64)
    iterations = {}
    for kind in (None, "fisher"):
        torch.manual_seed(0)
        model = nn.Linear(6, 1, dtype=torch.float64)
        hf = HessianFree(
            model,
            "squared_error",
            damping=1e-6,
            preconditioner=kind,
            preconditioner_exponent=1.0,
            cg_tolerance=1e-10,
        )
        hf.step((X, Y))
        iterations[kind] = hf.stats["cg_iterations"]
    assert iterations["fisher"] < iterations[None]


def test_presets_of_section_13():
    model, X, Y = least_squares(5)
    original = HessianFree.preset("martens2010", model, "squared_error")
    assert (
        original.options["iterate_selection"] == "backtracking"
        and original.options["line_search"]
        and original.options["preconditioner"] == "fisher"
    )
    rnn, batch = addition_rnn()
    assert HessianFree.preset("rnn2011", rnn, "squared_error").param_groups[0][
        "structural_damping"
    ] == pytest.approx(1 / 30)
    hybrid = HessianFree.preset(
        "hybrid2013", model, "squared_error", cg_max_iterations=20
    )  # any argument can be changed
    assert not hybrid.options["line_search"] and hybrid.param_groups[0]["cg_max_iterations"] == 20
    with pytest.raises(ValueError, match="preset"):
        HessianFree.preset("newton", model, "squared_error")
    for name in (
        "martens2010",
        "rnn2011",
    ):  # the recipes of Martens' code stop CG by its average progress
        preset = HessianFree.preset(name, rnn, "squared_error")
        assert (
            preset.options["cg_termination"] == "average"
            and preset.param_groups[0]["cg_tolerance"] == 5e-4
        )


def test_the_cg_termination_choice_reaches_cg():
    iterations = {}
    for termination in ("window", "average"):
        rnn, batch = addition_rnn()
        hf = HessianFree(
            rnn,
            "squared_error",
            damping=1e-3,
            cg_termination=termination,
            cg_tolerance=5e-4,
            seed=0,
        )
        hf.step(batch)
        iterations[termination] = hf.stats["cg_iterations"]
    assert (
        iterations["average"] < iterations["window"]
    )  # k times looser: CG stops sooner on the same step
    with pytest.raises(ValueError, match="cg_termination: 'mean' is not one of"):
        HessianFree(rnn, "squared_error", cg_termination="mean")


def test_the_learning_rate_scales_the_update_when_there_is_no_line_search():
    updates = {}
    for rate in (1.0, 0.25):
        model, X, Y = least_squares(6)
        before = flat_params(model).clone()
        hf = HessianFree(
            model,
            "squared_error",
            damping=0.1,
            lr=rate,
            line_search=False,
            iterate_selection="last",
            preconditioner=None,
            cg_max_iterations=5,
        )
        hf.step((X, Y))
        updates[rate] = flat_params(model) - before
        assert hf.stats["step_size"] == rate
    torch.testing.assert_close(updates[0.25], 0.25 * updates[1.0])


def test_an_error_during_the_step_leaves_the_parameters_where_they_were(monkeypatch):
    model, X, Y = least_squares(7)
    hf = HessianFree(model, "squared_error", damping=0.1)
    before = flat_params(model).clone()
    calls = []
    original = hf._objective

    def failing(batch):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # e.g. the user stops a notebook cell during backtracking
        return original(batch)

    monkeypatch.setattr(hf, "_objective", failing)
    with pytest.raises(KeyboardInterrupt):
        hf.step((X, Y))
    torch.testing.assert_close(flat_params(model), before, rtol=0, atol=0)


def tanh_regression(seed=0):
    """A small tanh network on noisy targets, with a gradient, a (small) curvature and a selection batch."""
    g = make_generator(seed)
    X = torch.randn(256, 8, generator=g, dtype=torch.float64)
    Y = torch.sin(3 * X[:, :2]) + 0.3 * torch.randn(256, 2, generator=g, dtype=torch.float64)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 20), nn.Tanh(), nn.Linear(20, 2)).double()
    return model, (X[:128], Y[:128]), (X[:16], Y[:16]), (X[128:], Y[128:])


def recording_cg(monkeypatch):
    """Record every CG call's starting point, monitor and result."""
    import qnwb.optim.hessian_free as module

    calls, original = [], module.conjugate_gradient

    def recording(A, b, x0=None, **kwargs):
        result = original(A, b, x0, **kwargs)
        calls.append({"x0": x0, "monitor": kwargs.get("monitor"), "result": result})
        return result

    monkeypatch.setattr(module, "conjugate_gradient", recording)
    return calls


@torch.no_grad()
def loss_at(model, params, x, batch):
    saved = flat_params(model).clone()
    assign_flat_(list(model.parameters()), params + x)
    value = float(
        nn.functional.mse_loss(model(batch[0]), batch[1], reduction="sum") / (2 * len(batch[0]))
    )
    assign_flat_(list(model.parameters()), saved)
    return value


def test_the_objective_recipe_stops_cg_on_the_curvature_batch_and_picks_the_least_f_on_other_data(
    monkeypatch,
):
    calls = recording_cg(monkeypatch)
    model, batch, curvature, selection = tanh_regression()
    hf = HessianFree.preset("objective2012", model, "squared_error", damping=1e-4)
    hf.step(
        batch, curvature
    )  # a first step without selection data: its iterate becomes the next warm start
    stops = []
    for _ in range(3):
        theta = flat_params(model).clone()
        hf.step(batch, curvature, selection)
        call, stats = calls[-1], hf.stats
        stops.append(stats["cg_stop"])
        # the warm start is zeta times the LAST iterate of the previous run, not the update taken
        torch.testing.assert_close(call["x0"], 0.95 * calls[-2]["result"].x, rtol=0, atol=0)
        # the monitor is f(theta + x) on the curvature batch, and reading it leaves the model where it was
        x = 1e-2 * torch.randn(theta.shape, dtype=theta.dtype, generator=make_generator(1))
        after = flat_params(model).clone()
        assert call["monitor"](x) == pytest.approx(loss_at(model, theta, x, curvature), rel=1e-12)
        assign_flat_(list(model.parameters()), after)
        # the chosen iterate has the least f on the selection data among the kept iterates
        values = {step: loss_at(model, theta, it, selection) for step, it in call["result"].saved}
        assert stats["chosen_iterate"] == min(values, key=values.get)
        assert stats["loss_evaluations"] >= len(call["result"].monitored) + len(values)
        # rho and the line search measure f on the gradient batch, not on the selection data
        assert stats["loss_after"] == pytest.approx(
            loss_at(model, flat_params(model), 0.0, batch), rel=1e-12
        )
    assert (
        "objective" in stops
    )  # with a curvature batch of 16 cases CG overfits it and the test fires


def test_a_step_without_the_objective_recipe_passes_no_monitor_and_warm_starts_from_the_update(
    monkeypatch,
):
    calls = recording_cg(monkeypatch)
    model, batch, curvature, selection = tanh_regression()
    hf = HessianFree(model, "squared_error", damping=1e-4, iterate_selection="minimum")
    for _ in range(2):
        hf.step(batch, curvature, selection)
    assert calls[-1]["monitor"] is None and calls[-1]["result"].monitored == []
    stored = hf.state[hf.param_groups[0]["params"][0]]["previous_update"]
    chosen = dict(calls[-1]["result"].saved)[hf.stats["chosen_iterate"]]
    torch.testing.assert_close(stored, chosen, rtol=0, atol=0)


def test_schedules_set_the_learning_rate_and_warm_start_of_every_step(monkeypatch):
    calls = recording_cg(monkeypatch)
    model, X, Y = least_squares(1)
    seen = []

    def rate(t):
        seen.append(t)
        return 1.0 / (t + 1)

    hf = HessianFree(
        model,
        "squared_error",
        damping=0.1,
        lr=rate,
        warm_start=lambda t: 0.5 if t < 2 else 0.9,
        line_search=False,
        iterate_selection="last",
        cg_max_iterations=3,
    )
    for t in range(4):
        before = flat_params(model).clone()
        hf.step((X, Y))
        assert hf.stats["lr"] == 1.0 / (t + 1) and hf.stats["warm_start"] == (0.5 if t < 2 else 0.9)
        update = dict(calls[-1]["result"].saved)[hf.stats["chosen_iterate"]]
        torch.testing.assert_close(flat_params(model) - before, update / (t + 1))
        if t > 0:
            torch.testing.assert_close(
                calls[-1]["x0"], hf.stats["warm_start"] * calls[-2]["result"].x
            )
    assert seen[-4:] == [0, 1, 2, 3]
    saved = copy.deepcopy(hf.state_dict())
    assert "lr" not in saved["options"]  # schedules are code: the constructor brings them back


def test_state_dict_carries_the_options_and_the_chapelle_erhan_generator():
    model, batch = addition_rnn()
    options = dict(
        damping=0.5,
        structural_damping=0.3,
        cg_max_iterations=20,
        preconditioner="chapelle_erhan",
        seed=7,
        iterate_selection="minimum",
        warm_start_from="last",
    )
    hf = HessianFree(model, "squared_error", **options)
    hf.step(batch)
    saved_model, saved_optimizer = copy.deepcopy(model.state_dict()), copy.deepcopy(hf.state_dict())
    for _ in range(2):
        hf.step(batch)
    expected = flat_params(model).clone()

    resumed_model, _ = addition_rnn()
    resumed_model.load_state_dict(saved_model)
    resumed = HessianFree(
        resumed_model,
        "squared_error",
        damping=0.5,
        structural_damping=0.3,
        cg_max_iterations=20,
        preconditioner="chapelle_erhan",
        seed=99,
    )  # other options and seed: the state brings them back
    resumed.load_state_dict(saved_optimizer)
    assert (
        resumed.options["iterate_selection"] == "minimum"
        and resumed.options["warm_start_from"] == "last"
    )
    for _ in range(2):
        resumed.step(batch)
    torch.testing.assert_close(flat_params(resumed_model), expected, rtol=0, atol=0)


@pytest.mark.parametrize("how, expected", [("backtracking", 9), ("minimum", 5), ("last", 11)])
def test_the_iterate_selection_rules(how, expected):
    from types import SimpleNamespace

    model, _, _ = least_squares()
    hf = HessianFree(model, "squared_error", iterate_selection=how)
    values = {
        5: 1.0,
        7: 3.0,
        9: 2.0,
        11: 2.5,
    }  # walking back from 11: 9 improves, 7 does not (§8.7 stops there)
    iterates = {step: torch.full((3,), float(step)) for step in values}
    cg = SimpleNamespace(saved=list(iterates.items()))
    step, delta, f = hf._choose(cg, lambda x, data: values[int(x[0])], None)
    assert (step, f) == (expected, values[expected]) and delta is iterates[expected]


def test_selection_data_only_choose_the_iterate_rho_and_the_line_search_use_the_gradient_batch():
    model, X, Y = least_squares(2)
    hf = HessianFree(
        model, "squared_error", damping=0.1, iterate_selection="minimum", cg_max_iterations=20
    )
    hf.step(
        (X, Y), selection_batch=(X, Y + 10.0)
    )  # f on the selection data is far above f on the gradient batch
    assert hf.stats["rho"] == pytest.approx(1.0, abs=0.05)  # a linear model: the quadratic is exact
    assert hf.stats["loss_after"] == pytest.approx(
        loss_at(model, flat_params(model), 0.0, (X, Y)), rel=1e-12
    )


def test_the_undamped_model_of_rho_leaves_out_the_structural_term(monkeypatch):
    calls = recording_cg(monkeypatch)
    model, batch = addition_rnn()
    theta = flat_params(model).clone()
    grads = torch.autograd.grad(
        HessianFree(model, "squared_error").loss(model(batch[0]), batch[1]),
        list(model.parameters()),
    )
    g = torch.cat([t.flatten() for t in grads])
    plain = GGN(model, "squared_error", batch)  # G at θ, no structural damping
    hf = HessianFree(
        model,
        "squared_error",
        damping=0.5,
        structural_damping=0.5,
        cg_max_iterations=10,
        line_search=False,
        iterate_selection="last",
    )
    hf.step(batch)
    delta = calls[-1]["result"].x
    expected = float(g @ delta + 0.5 * delta @ plain.mv(delta))
    assert hf.stats["structural_weight"] == 0.25
    assert hf.stats["model_reduction_undamped"] == pytest.approx(expected, rel=1e-9)
    assert torch.equal(flat_params(model), theta + delta)


@pytest.mark.parametrize("reduction, weight", [("sum", 0.25), ("mean", 0.025)])
def test_structural_reduction_scales_the_structural_weight_by_the_time_steps(
    monkeypatch, reduction, weight
):
    """ "sum": S sums D over a case's T = 10 steps (weight λμ); "mean" averages them (λμ/T): CG's operator is
    G + weight·G_S on the explicit dense matrices."""
    import qnwb.optim.hessian_free as module

    model, batch = addition_rnn(T=10)
    G = explicit_ggn(model, "squared_error", batch)
    G_S = explicit_structural(model, batch, "tanh")
    v = torch.randn(G.shape[0], dtype=G.dtype, generator=torch.Generator().manual_seed(5))
    applied, original = [], module.conjugate_gradient

    def probing(A, b, x0=None, **kwargs):  # CG's operator applied to v at θ, before any update
        applied.append(A(v))
        return original(A, b, x0, **kwargs)

    monkeypatch.setattr(module, "conjugate_gradient", probing)
    hf = HessianFree(
        model,
        "squared_error",
        damping=0.5,
        structural_damping=0.5,
        structural_reduction=reduction,
        cg_max_iterations=3,
    )
    hf.step(batch)
    assert hf.stats["structural_weight"] == pytest.approx(weight, rel=1e-15)
    expected = (G + weight * G_S) @ v + 0.5 * v
    assert torch.allclose(applied[0], expected, rtol=1e-9, atol=1e-9 * float(expected.abs().max()))
