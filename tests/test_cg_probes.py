"""qnwb.diagnostics.cg: CG traces against dense float64 models and direct losses, the §9 split, CG vs NAG, figures."""

import math

import pytest
import torch
from references import explicit_hessian, flat_function

from qnwb.core import flat_params, make_generator
from qnwb.curvature import GGN
from qnwb.diagnostics.cg import (
    backtracking_choice,
    cg_trace,
    cg_trace_figure,
    cg_trace_for,
    cg_vs_nag,
    cg_vs_nag_figure,
    eigendirection_error_figure,
    eigendirection_errors,
)
from qnwb.init import esn_init_
from qnwb.losses import matching_loss
from qnwb.models import MLP, TanhRNN
from qnwb.optim import HessianFree
from qnwb.quadratic import Quadratic
from qnwb.solvers import backtracking_grid
from qnwb.tasks import Addition


def mlp_problem(seed=0, cases=40, device="cpu"):
    """A small tanh MLP whose units are neither linear nor saturated, with regression data and held-out data."""
    g = make_generator(seed)
    torch.manual_seed(seed)
    model = MLP([4, 6, 3], dtype=torch.float64).to(device)
    X = torch.randn(2 * cases, 4, generator=g, dtype=torch.float64).to(device)
    Y = torch.sin(X[:, :3] * 1.5) + 0.3 * X[:, 3:4]
    with torch.no_grad():
        pre = model[0](X)
    assert 0.05 < pre.abs().mean() < 2.0  # neither linear nor saturated
    return model, (X[:cases], Y[:cases]), (X[cases:], Y[cases:])


def gradient(model, loss, batch):
    value = matching_loss(loss)(model(batch[0]), batch[1])
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, list(model.parameters()))])


def loss_at(model, loss, flat, batch):
    "The loss at the flat parameters `flat`, evaluated directly (the model's own parameters untouched)."
    with torch.no_grad():
        return float(matching_loss(loss)(flat_function(model, batch[0])(flat), batch[1]))


def spd(n, low=0.01, high=10.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    A = (
        Q
        @ torch.diag(torch.logspace(math.log10(low), math.log10(high), n, dtype=torch.float64))
        @ Q.T
    )
    return (A + A.T) / 2, torch.randn(n, generator=g, dtype=torch.float64)


# ---------------------------------------------------------------- cg_trace


@pytest.mark.parametrize("separate, heldout", [(False, True), (True, True), (False, False)])
def test_cg_trace_records_the_dense_models_and_the_direct_losses_at_every_iterate(
    separate, heldout, device
):
    model, batch, held = mlp_problem(device=device)
    curvature_batch = (batch[0][:25], batch[1][:25]) if separate else None
    theta = flat_params(model).clone()
    lam = 0.05
    trace = cg_trace(
        model,
        "squared_error",
        batch,
        damping=lam,
        curvature_batch=curvature_batch,
        heldout=held if heldout else None,
        max_iterations=30,
        tolerance=None,
        seed=7,
        keep_iterates=True,
    )
    torch.testing.assert_close(flat_params(model), theta, rtol=0, atol=0)  # θ is put back
    X = trace.iterates.cpu()
    assert X.shape == (31, theta.numel()) and trace.iterations == 30 and (X[0] == 0).all()
    G = GGN(model, "squared_error", curvature_batch or batch).dense().cpu()
    g = gradient(model, "squared_error", batch).cpu()
    eye = torch.eye(G.shape[0], dtype=G.dtype)
    torch.testing.assert_close(
        trace.damped.cpu(), 0.5 * ((X @ (G + lam * eye)) * X).sum(1) + X @ g, rtol=1e-10, atol=1e-12
    )
    torch.testing.assert_close(
        trace.undamped.cpu(), 0.5 * ((X @ G) * X).sum(1) + X @ g, rtol=1e-10, atol=1e-12
    )
    torch.testing.assert_close(trace.cg_q.cpu(), trace.damped.cpu(), rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(trace.norms.cpu(), X.norm(dim=1))
    data = {"curvature batch": curvature_batch or batch}
    if separate:
        data["gradient batch"] = batch
    if heldout:
        data["held-out"] = held
    assert set(trace.objectives) == set(data)
    for name, d in data.items():
        direct = torch.tensor(
            [loss_at(model, "squared_error", theta + x.to(device), d) for x in X],
            dtype=torch.float64,
        )
        torch.testing.assert_close(trace.objectives[name].cpu(), direct, rtol=1e-12, atol=1e-14)
        assert trace.f0[name] == pytest.approx(loss_at(model, "squared_error", theta, d), rel=1e-12)
        torch.testing.assert_close(trace.reduction(name).cpu(), direct - trace.f0[name])
    s = trace.settings
    assert (
        s["damping"],
        s["structural_damping"],
        s["batch_size"],
        s["seed"],
        s["tolerance"],
        s["max_iterations"],
    ) == (lam, 0.0, 40, 7, None, 30)
    assert s["curvature_batch_size"] == (25 if separate else 40) and s["heldout_size"] == (
        40 if heldout else None
    )
    assert (
        s["stop"] == trace.stop == "max_iterations"
        and s["products"] == 30
        and s["parameters"] == theta.numel()
    )
    assert trace.heldout_step == (
        int(torch.argmin(trace.objectives["held-out"])) if heldout else None
    )


def test_structural_damping_is_in_the_damped_model_and_not_in_the_undamped_one():
    task = Addition(10)
    model = esn_init_(
        TanhRNN(2, 5, 1, dtype=torch.float64), input_scale=0.3, generator=make_generator(0)
    )
    batch = task.batch(16, make_generator(1), dtype=torch.float64)
    lam, mu = 0.3, 0.5
    trace = cg_trace(
        model,
        "squared_error",
        batch,
        damping=lam,
        structural_damping=mu,
        max_iterations=12,
        tolerance=None,
        keep_iterates=True,
    )
    X = trace.iterates
    full = GGN(
        model, "squared_error", batch, structural_distance="tanh", structural_weight=lam * mu
    ).dense()
    plain = GGN(model, "squared_error", batch).dense()
    assert (full - plain).abs().max() > 1e-3  # the structural block matters here
    g = gradient(model, "squared_error", batch)
    eye = torch.eye(full.shape[0], dtype=full.dtype)
    torch.testing.assert_close(
        trace.damped, 0.5 * ((X @ (full + lam * eye)) * X).sum(1) + X @ g, rtol=1e-10, atol=1e-12
    )
    torch.testing.assert_close(
        trace.undamped, 0.5 * ((X @ plain) * X).sum(1) + X @ g, rtol=1e-10, atol=1e-12
    )
    assert (
        trace.settings["structural_weight"] == pytest.approx(lam * mu)
        and trace.settings["probe_products"] == 2 * 13
    )


def test_hessian_curvature_against_torch_func():
    model, batch, _ = mlp_problem(3)
    theta = flat_params(model).clone()
    H = explicit_hessian(model, "squared_error", batch)
    g = gradient(model, "squared_error", batch)
    trace = cg_trace(
        model,
        "squared_error",
        batch,
        damping=2.0,
        curvature="hessian",
        max_iterations=8,
        tolerance=None,
        keep_iterates=True,
    )
    X = trace.iterates
    torch.testing.assert_close(
        trace.damped,
        0.5 * ((X @ (H + 2.0 * torch.eye(len(theta), dtype=H.dtype))) * X).sum(1) + X @ g,
        rtol=1e-9,
        atol=1e-12,
    )


def test_a_step_cg_takes_back_on_negative_curvature_is_not_recorded():
    model, batch, _ = mlp_problem(1)
    trace = cg_trace(
        model,
        "squared_error",
        batch,
        damping=0.0,
        curvature="hessian",
        max_iterations=50,
        tolerance=None,
        keep_iterates=True,
    )
    assert trace.stop == "negative_curvature" and trace.settings["products"] == trace.iterations + 1
    m = trace.iterations
    assert trace.steps.tolist() == list(range(m + 1)) and trace.iterates.shape[0] == m + 1
    for values in (
        trace.damped,
        trace.undamped,
        trace.norms,
        trace.cg_q,
        *trace.objectives.values(),
    ):
        assert values.shape == (m + 1,)
    torch.testing.assert_close(trace.cg_q, trace.damped, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("termination, tolerance", [("window", 1e-4), ("average", 5e-4)])
def test_the_backtracking_choice_and_cg_run_are_those_of_hessian_free(termination, tolerance):
    model, batch, _ = mlp_problem(1)
    trace = cg_trace(
        model,
        "squared_error",
        batch,
        damping=1e-3,
        max_iterations=60,
        tolerance=tolerance,
        termination=termination,
    )
    hf = HessianFree(
        model,
        "squared_error",
        damping=1e-3,
        cg_max_iterations=60,
        cg_tolerance=tolerance,
        cg_termination=termination,
        preconditioner=None,
    )
    hf.step(batch)
    assert hf.stats["cg_iterations"] == trace.iterations and hf.stats["cg_stop"] == trace.stop
    assert hf.stats["chosen_iterate"] == trace.backtracking_step
    assert hf.stats["model_reduction_damped"] == pytest.approx(
        float(trace.damped[trace.backtracking_step]), rel=1e-8
    )
    assert hf.stats["model_reduction_undamped"] == pytest.approx(
        float(trace.undamped[trace.backtracking_step]), rel=1e-8
    )
    assert trace.grid == [s for s in backtracking_grid(60) if s <= trace.iterations] + (
        [trace.iterations] if trace.iterations not in backtracking_grid(60) else []
    )


@pytest.mark.parametrize("preconditioner", [None, "fisher"])
def test_cg_trace_for_traces_the_quadratic_of_the_optimizer_s_next_step(preconditioner):
    model, batch, held = mlp_problem(2)
    hf = HessianFree(
        model,
        "squared_error",
        damping=0.5,
        cg_max_iterations=25,
        preconditioner=preconditioner,
        warm_start=0.9,
    )
    hf.step(batch)
    trace = cg_trace_for(hf, batch, heldout=held)
    assert trace.settings["warm_start"] and trace.settings["preconditioner"] == (
        "given" if preconditioner else None
    )
    assert trace.settings["termination"] == hf.options["cg_termination"] == "average"
    lam = hf.param_groups[0]["damping"]
    assert trace.settings["damping"] == lam
    previous = hf.state[hf.param_groups[0]["params"][0]]["previous_update"]
    hf.step(batch)
    assert (
        hf.stats["cg_iterations"] == trace.iterations
        and hf.stats["chosen_iterate"] == trace.backtracking_step
    )
    assert hf.stats["model_reduction_damped"] == pytest.approx(
        float(trace.cg_q[trace.backtracking_step]), rel=1e-10
    )
    G = GGN(
        model, "squared_error", batch
    )  # θ has moved: only check the start, x_0 = ζ·δ_{k−1}, on the trace's own numbers
    assert (
        trace.norms[0] == pytest.approx(float(0.9 * previous.norm()), rel=1e-12)
        and G.n == previous.numel()
    )
    with pytest.raises(TypeError, match="optimizer"):
        cg_trace_for(torch.optim.SGD(model.parameters(), lr=0.1), batch)


def test_backtracking_choice_walks_back_while_f_improves():
    values = torch.tensor([0.0, 1.0, 4, 3, 2.5, 2.0, 2.2, 2.1])
    assert (
        backtracking_choice(values, [1, 3, 5, 7]) == 5
    )  # 2.1 (7) → 2.0 (5) → 3 (3) is worse: stop (the better 1 is not seen)
    assert backtracking_choice(values, [6, 7]) == 7  # 2.2 is worse than 2.1 already
    assert backtracking_choice(torch.tensor([0.0, math.inf, math.nan]), [1, 2]) == 2


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"damping": -1.0}, ValueError, "damping"),
        ({"structural_damping": -0.1}, ValueError, "structural_damping"),
        ({"curvature": "fisher"}, ValueError, "curvature"),
        ({"curvature": "hessian", "structural_damping": 0.1}, ValueError, "structural_damping"),
        ({"structural_distance": "cosine"}, ValueError, "structural_distance"),
        ({"max_iterations": 0}, ValueError, "max_iterations"),
        ({"preconditioner": "jacobi"}, ValueError, "preconditioner"),
        ({"heldout": (torch.zeros(3, 4), torch.zeros(2, 3))}, ValueError, "heldout"),
        ({"curvature_batch": torch.zeros(3)}, TypeError, "curvature_batch"),
    ],
)
def test_cg_trace_bad_input(kwargs, error, words):
    model, batch, _ = mlp_problem()
    with pytest.raises(error, match=words):
        cg_trace(model, "squared_error", batch, **kwargs)
    with pytest.raises(TypeError, match="model"):
        cg_trace(lambda x: x, "squared_error", batch)


# ---------------------------------------------------------------- §9 split


@pytest.mark.parametrize("seed, warm", [(0, False), (1, False), (2, True)])
def test_the_eigendirection_terms_sum_to_the_gap_to_the_minimiser(seed, warm):
    A, b = spd(40, 0.01, 10.0, seed=seed)
    x0 = (
        0.3
        * torch.randn(40, generator=torch.Generator().manual_seed(seed + 9), dtype=torch.float64)
        if warm
        else None
    )
    split = eigendirection_errors(A, b, iterations=25, x0=x0)
    xstar = torch.linalg.solve(A, b)
    q = lambda x: 0.5 * x @ A @ x - b @ x  # noqa: E731
    assert split.method == "dense" and split.errors.shape == (26, 40)
    torch.testing.assert_close(
        split.errors.sum(1), split.q - q(xstar), rtol=1e-10, atol=1e-12
    )  # eq. 13
    torch.testing.assert_close(split.gap, split.q - q(xstar), rtol=1e-10, atol=1e-12)
    start = torch.zeros(40, dtype=torch.float64) if x0 is None else x0
    torch.testing.assert_close(
        split.omega.sum(), q(start) - q(xstar), rtol=1e-10, atol=1e-12
    )  # Σω_j = q(x_0) − q(x*)
    torch.testing.assert_close(split.errors[0], split.omega, rtol=1e-10, atol=1e-14)  # p_0 ≡ 1
    torch.testing.assert_close(
        split.errors, split.omega * split.polynomial, rtol=1e-8, atol=1e-14
    )  # ω_j p(λ_j)²
    torch.testing.assert_close(split.eta, torch.linalg.eigh(A).eigenvectors.T @ (A @ start - b))


def test_the_split_by_hand_from_the_chapter_s_definitions():
    A, b = spd(6, 0.5, 4.0, seed=5)
    lam, V = torch.linalg.eigh(A)
    split = eigendirection_errors(A, b, iterations=3)
    x = torch.linalg.solve(A, b) * 0  # x_0 = 0
    eta = V.T @ (A @ x - b)
    omega = 0.5 * eta**2 / lam
    # the iterate x_2 of CG: the minimiser of q over K_2(A, r_0) = span{r_0, A r_0}
    K = torch.stack([-b, -A @ b], 1)
    x2 = K @ torch.linalg.solve(K.T @ A @ K, K.T @ b)
    beta = V.T @ x2
    torch.testing.assert_close(
        split.errors[2], omega * (lam * beta / eta + 1) ** 2, rtol=1e-8, atol=1e-12
    )


def test_cg_converges_along_large_eigenvalues_first():
    # §9's example: two tight clusters with equal total weight ω; CG places its first roots by the large one
    g = torch.Generator().manual_seed(3)
    lam = torch.cat(
        [
            torch.linspace(0.009, 0.011, 20, dtype=torch.float64),
            torch.linspace(9.0, 11.0, 20, dtype=torch.float64),
        ]
    )
    Q, _ = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64))
    A = Q @ torch.diag(lam) @ Q.T
    b = Q @ (2 * lam).sqrt()  # η_j = −√(2λ_j): ω_j = ½η_j²/λ_j = 1 for every j
    split = eigendirection_errors((A + A.T) / 2, b, iterations=4)
    torch.testing.assert_close(
        split.omega, torch.ones(40, dtype=torch.float64), rtol=1e-8, atol=1e-8
    )
    small, large = split.polynomial[1, :20], split.polynomial[1, 20:]
    assert (
        large.max() < 0.02 and small.min() > 0.9
    )  # one step: the large cluster has converged, the small has not moved
    assert (split.polynomial[4, :20] < 0.05).all()  # later steps take the small cluster too


def test_the_ritz_split_is_exact_for_iterates_inside_the_krylov_space_and_says_what_it_measures():
    A, b = spd(80, 0.5, 5.0, seed=4)
    ritz = eigendirection_errors(
        lambda v: A @ v, b, iterations=12, n=80, method="ritz", ritz_steps=12
    )
    assert (
        ritz.method == "ritz"
        and ritz.eigenvalues.numel() == 12
        and ritz.settings["lanczos_products"] == 12
    )
    torch.testing.assert_close(ritz.errors.sum(1), ritz.gap, rtol=1e-9, atol=1e-12)
    assert abs(float(ritz.gap[-1])) < 1e-10 * float(
        ritz.gap[0]
    )  # x_12 of CG is the minimiser over K_12: all "solved"
    true = torch.linalg.eigvalsh(A)
    assert (
        float(ritz.eigenvalues.max()) <= float(true.max()) + 1e-12
        and float(ritz.eigenvalues.min()) >= float(true.min()) - 1e-12
    )
    assert ritz.ritz_residuals is not None and ritz.ritz_residuals.shape == (12,)
    longer = eigendirection_errors(
        lambda v: A @ v, b, iterations=12, n=80, method="ritz", ritz_steps=30
    )
    assert longer.reference < ritz.reference  # q(x_30) < q(x_12)


def test_the_default_ritz_run_is_long_enough_to_measure_the_analysed_iterates_against_q_star():
    # the default m = 3 × iterations: the last analysed iterate is not "solved" by construction, and the gaps are q* ones
    A, b = spd(80, 0.5, 5.0, seed=4)
    ritz = eigendirection_errors(lambda v: A @ v, b, iterations=5, n=80, method="ritz")
    dense = eigendirection_errors(A, b, iterations=5, method="dense")
    assert ritz.settings["lanczos_products"] == 15 and ritz.eigenvalues.numel() == 15
    torch.testing.assert_close(ritz.errors.sum(1), ritz.gap, rtol=1e-9, atol=1e-12)
    assert float(ritz.gap[-1]) > 1e-6 * float(ritz.gap[0])
    torch.testing.assert_close(ritz.gap, dense.gap, rtol=1e-4, atol=1e-10 * float(dense.gap[0]))


def test_function_operators_follow_the_right_hand_sides_dtype():
    A, b = spd(30, 0.5, 5.0, seed=5)
    A32, b32 = A.float(), b.float()
    split = eigendirection_errors(lambda v: A32 @ v, b32, iterations=10, n=30)
    duel = cg_vs_nag(lambda v: A32 @ v, b32, iterations=10, n=30)
    assert split.q.dtype == torch.float32 and split.method == "dense" and duel.cg.numel() == 11


def test_cg_vs_nag_figure_leaves_rounding_level_gaps_out_of_the_log_axis():
    A, b = spd(12, 0.5, 5.0, seed=6)
    duel = cg_vs_nag(A, b, iterations=30, momenta=(0.9,))
    cg_line = cg_vs_nag_figure(duel).data[0].y
    assert any(y is None for y in cg_line) and all(
        y is None or y > 0 for y in cg_line
    )  # CG converged: rounding is not drawn


def test_cg_trace_for_leaves_the_optimizers_random_stream_alone():
    from qnwb.optim import HessianFree

    def run(probe: bool):
        torch.manual_seed(0)
        net = torch.nn.Sequential(
            torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)
        ).double()
        x = torch.randn(20, 3, dtype=torch.float64)
        batch = (x, torch.randn(20, 2, dtype=torch.float64))
        hf = HessianFree(
            net, "squared_error", preconditioner="chapelle_erhan", seed=3, cg_max_iterations=10
        )
        hf.step(batch)
        if probe:
            traced = cg_trace_for(hf, batch, tolerance=None, max_iterations=5)
            assert traced.settings["preconditioner"] is not None
        hf.step(batch)
        return torch.cat([p.detach().reshape(-1) for p in net.parameters()]), hf.last_preconditioner

    (theta, P), (theta_probed, P_probed) = run(False), run(True)
    assert torch.equal(theta, theta_probed) and torch.equal(P, P_probed)


def test_the_split_works_on_a_curvature_operator_and_auto_picks_dense_or_ritz():
    model, batch, _ = mlp_problem(4)
    G = GGN(model, "squared_error", batch)

    class Damped:
        n, dtype, device = G.n, G.dtype, G.device

        def mv(self, v):
            return G.mv(v) + 0.1 * v

        def dense(self):
            return G.dense() + 0.1 * torch.eye(G.n, dtype=G.dtype)

    g = gradient(model, "squared_error", batch)
    dense = eigendirection_errors(Damped(), -g, iterations=10)
    assert dense.method == "dense"
    ritz = eigendirection_errors(Damped(), -g, iterations=10, dense_limit=5)
    assert ritz.method == "ritz"
    torch.testing.assert_close(dense.q, ritz.q)
    assert float(ritz.eigenvalues.max()) == pytest.approx(float(dense.eigenvalues.max()), rel=1e-6)


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"iterations": 0}, ValueError, "iterations"),
        ({"b": torch.ones(7, dtype=torch.float64)}, ValueError, "b:"),
        ({"b": torch.ones(6, 1, dtype=torch.float64)}, TypeError, "b:"),
        ({"method": "lanczos"}, ValueError, "method"),
        ({"method": "ritz", "ritz_steps": 7}, ValueError, "ritz_steps"),
        ({"method": "ritz", "ritz_steps": 0}, ValueError, "ritz_steps"),
        ({"x0": torch.ones(3, dtype=torch.float64)}, ValueError, "x0"),
        ({"n": 5}, ValueError, "dimension"),
    ],
)
def test_eigendirection_bad_input(kwargs, error, words):
    A, b = spd(6, seed=1)
    arguments = {"b": b, **kwargs}
    with pytest.raises(error, match=words):
        eigendirection_errors(A, **arguments)
    with pytest.raises(ValueError, match="positive-definite"):
        eigendirection_errors(-A, b)
    with pytest.raises(ValueError, match="dense_limit"):
        eigendirection_errors(lambda v: A @ v, b, n=6, method="dense", dense_limit=3)
    with pytest.raises(ValueError, match="A: a product"):
        eigendirection_errors(lambda v: v[:3], b, iterations=3, n=6, method="ritz")


# ---------------------------------------------------------------- CG vs NAG


def nag_by_hand(A, b, lr, mu, steps, x0):
    theta, v = x0.clone(), torch.zeros_like(x0)
    xs = [theta.clone()]
    for _ in range(steps):
        v = mu * v - lr * (A @ (theta + mu * v) - b)  # Sutskever et al. 2013 eq. 3
        theta = theta + v  # eq. 4
        xs.append(theta.clone())
    return xs


def cg_by_hand(A, b, steps, x0):
    x = x0.clone()
    r = A @ x - b
    p = -r
    xs = [x.clone()]
    for _ in range(steps):  # M&S 2012 Algorithm 2 with P = I
        alpha = (r @ r) / (p @ A @ p)
        x = x + alpha * p
        r_new = r + alpha * (A @ p)
        p = -r_new + (r_new @ r_new) / (r @ r) * p
        r = r_new
        xs.append(x.clone())
    return xs


@pytest.mark.parametrize("warm", [False, True])
def test_cg_and_nag_curves_are_the_explicit_recursions(warm, device):
    A, b = spd(20, 0.05, 5.0, seed=6)
    x0 = (
        0.2 * torch.randn(20, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        if warm
        else None
    )
    A_, b_ = A.to(device), b.to(device)
    duel = cg_vs_nag(
        A_, b_, iterations=15, momenta=("auto", 0.9), x0=None if x0 is None else x0.to(device)
    )
    lam = torch.linalg.eigvalsh(A)
    kappa = float(lam[-1] / lam[0])
    assert duel.lr == pytest.approx(1 / float(lam[-1]), rel=1e-12) and duel.optimum == "dense solve"
    mu_auto = (math.sqrt(kappa) - 1) / (math.sqrt(kappa) + 1)
    assert list(duel.momenta.values()) == pytest.approx([mu_auto, 0.9])
    xstar = torch.linalg.solve(A, b)
    q = lambda x: 0.5 * x @ A @ x - b @ x  # noqa: E731
    assert duel.q_star == pytest.approx(float(q(xstar)), rel=1e-12)
    start = torch.zeros(20, dtype=torch.float64) if x0 is None else x0
    for (_label, gaps), mu in zip(duel.nag.items(), [mu_auto, 0.9]):
        expected = torch.stack([q(x) for x in nag_by_hand(A, b, duel.lr, mu, 15, start)]) - q(xstar)
        torch.testing.assert_close(gaps.cpu(), expected, rtol=1e-10, atol=1e-12)
    expected = torch.stack([q(x) for x in cg_by_hand(A, b, 15, start)]) - q(xstar)
    torch.testing.assert_close(duel.cg.cpu(), expected, rtol=1e-8, atol=1e-11)
    assert duel.cg_products.tolist() == [i + (1 if warm else 0) for i in range(16)]
    assert duel.nag_products.tolist() == list(range(16))
    assert all(
        float(duel.cg[-1]) <= float(g[-1]) for g in duel.nag.values()
    )  # CG is optimal over the Krylov space (from 0)


def test_cg_vs_nag_on_a_quadratic_and_without_dense_algebra():
    quadratic = Quadratic.log_uniform(50, 1e-2, 1.0, seed=2)
    duel = cg_vs_nag(quadratic, iterations=30, momenta=0.95)
    same = cg_vs_nag(quadratic.A, -quadratic.b, iterations=30, momenta=[0.95])
    torch.testing.assert_close(duel.nag["NAG μ = 0.95"], same.nag["NAG μ = 0.95"])
    big = cg_vs_nag(
        lambda v: quadratic.A @ v,
        -quadratic.b,
        iterations=30,
        n=50,
        momenta=0.95,
        dense_limit=10,
        reference_iterations=50,
    )
    assert big.optimum == "CG, 50 steps (estimate)" and big.settings["eigenvalues"].startswith(
        "Lanczos"
    )
    assert big.q_star == pytest.approx(duel.q_star, rel=1e-8)
    assert (
        big.eigenvalue_range[1] == pytest.approx(1.0, rel=1e-8)
        and big.eigenvalue_range[0] >= 1e-2 - 1e-12
    )
    torch.testing.assert_close(big.cg, duel.cg, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"iterations": 0}, ValueError, "iterations"),
        ({"momenta": (1.0,)}, ValueError, "momenta"),
        ({"momenta": ()}, ValueError, "momenta"),
        ({"momenta": ("fast",)}, ValueError, "momenta"),
        ({"lr": 0.0}, ValueError, "lr"),
        ({"b": torch.ones(3, dtype=torch.float64)}, ValueError, "b:"),
        ({"b": None}, ValueError, "b:"),
    ],
)
def test_cg_vs_nag_bad_input(kwargs, error, words):
    A, b = spd(5, seed=2)
    with pytest.raises(error, match=words):
        cg_vs_nag(A, **{"b": b, **kwargs})
    with pytest.raises(ValueError, match="positive-definite"):
        cg_vs_nag(-A, b)
    with pytest.raises(ValueError, match="b:"):
        cg_vs_nag(Quadratic.log_uniform(5), b)
    with pytest.raises(ValueError, match="square"):
        cg_vs_nag(torch.ones(5, 4, dtype=torch.float64), b)


# ---------------------------------------------------------------- figures


def test_cg_trace_figure_draws_the_models_the_objectives_and_the_choice():
    model, batch, held = mlp_problem(5)
    trace = cg_trace(
        model, "squared_error", batch, damping=1e-3, heldout=held, max_iterations=30, tolerance=None
    )
    figure = cg_trace_figure(trace)
    names = [t.name for t in figure.data]
    assert names == [
        "damped model M̂(x) − f(θ)",
        "undamped model M(x) − f(θ)",
        "f(θ + x) − f(θ), curvature batch",
        "f(θ + x) − f(θ), held-out",
        "backtracking grid",
        f"HF's choice (step {trace.backtracking_step})",
    ]
    assert (
        list(figure.data[0].y) == trace.damped.tolist()
        and list(figure.data[1].y) == trace.undamped.tolist()
    )
    assert list(figure.data[0].x) == list(range(31))
    assert list(figure.data[3].y) == pytest.approx(
        (trace.objectives["held-out"] - trace.f0["held-out"]).tolist()
    )
    assert list(figure.data[4].x) == trace.grid == [5, 7, 9, 11, 15, 19, 25, 30]
    assert list(figure.data[4].y) == pytest.approx(
        [float(trace.reduction()[s]) for s in trace.grid]
    )
    assert list(figure.data[5].x) == [trace.backtracking_step]
    assert (
        "CG step" in figure.data[0].hovertemplate and figure.layout.xaxis.title.text == "CG step i"
    )
    assert (
        "Fig. 4" in figure.layout.title.text
        and figure.layout.yaxis.title.text == "change from f(θ)"
    )


def test_eigendirection_figure_heatmap_and_lines():
    A, b = spd(30, 0.01, 10.0, seed=7)
    split = eigendirection_errors(A, b, iterations=12)
    heat = eigendirection_error_figure(split)
    (trace,) = heat.data
    assert trace.type == "heatmap" and len(trace.z) == 30 and len(trace.z[0]) == 13
    torch.testing.assert_close(
        torch.as_tensor(trace.z), torch.log10(split.polynomial.clamp_min(1e-16)).T
    )
    assert trace.customdata[29][4][0] == pytest.approx(float(split.eigenvalues[29]))
    assert "λ =" in trace.hovertemplate and heat.layout.xaxis.title.text == "CG step i"
    absolute = eigendirection_error_figure(split, relative=False)
    torch.testing.assert_close(
        torch.as_tensor(absolute.data[0].z), torch.log10(split.errors.clamp_min(1e-16)).T
    )
    lines = eigendirection_error_figure(split, kind="lines", iterations=[0, 4, 12])
    assert [t.name for t in lines.data] == ["step 0", "step 4", "step 12"]
    assert list(lines.data[1].y) == pytest.approx(split.polynomial[4].clamp_min(1e-16).tolist())
    assert (
        list(lines.data[1].x) == pytest.approx(split.eigenvalues.tolist())
        and lines.layout.xaxis.type == "log"
    )
    ritz = eigendirection_errors(A, b, iterations=5, method="ritz")
    assert "approximate" in eigendirection_error_figure(ritz).layout.title.text
    with pytest.raises(ValueError, match="iterations"):
        eigendirection_error_figure(split, kind="lines", iterations=[13])
    with pytest.raises(ValueError, match="kind"):
        eigendirection_error_figure(split, kind="surface")


def test_cg_vs_nag_figure_draws_every_run():
    A, b = spd(15, 0.1, 2.0, seed=8)
    duel = cg_vs_nag(A, b, iterations=10, momenta=(0.5, "auto"))
    figure = cg_vs_nag_figure(duel)
    assert [t.name for t in figure.data] == ["CG", *duel.nag]
    assert list(figure.data[0].y) == pytest.approx(duel.cg.clamp_min(1e-300).tolist())
    assert list(figure.data[0].x) == list(range(11))
    for trace, gaps in zip(figure.data[1:], duel.nag.values()):
        assert (
            list(trace.y) == pytest.approx(gaps.clamp_min(1e-300).tolist()) and len(trace.x) == 11
        )
    assert (
        figure.layout.yaxis.type == "log"
        and figure.layout.xaxis.title.text == "matrix-vector products"
    )
    assert "q − q*" in figure.data[1].hovertemplate
