"""qnwb.solvers.conjugate_gradient against direct solves and the exact trust-region solution, in float64."""

import math

import pytest
import torch

from qnwb.curvature import GGN
from qnwb.models import MLP
from qnwb.solvers import backtracking_grid, conjugate_gradient


def spd(n, low=1.0, high=10.0, seed=0, device="cpu"):
    """A random symmetric matrix with eigenvalues spread evenly in [low, high], and a right-hand side."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    A = Q @ torch.diag(torch.linspace(low, high, n, dtype=torch.float64)) @ Q.T
    b = torch.randn(n, generator=g, dtype=torch.float64)
    return A.to(device), b.to(device)


def q_of(A, b, x):
    return 0.5 * x @ A @ x - b @ x


@pytest.mark.parametrize("n, seed", [(5, 0), (20, 1), (40, 2)])
def test_exact_in_n_steps_without_preconditioning(n, seed, device):
    A, b = spd(n, seed=seed, device=device)
    result = conjugate_gradient(lambda v: A @ v, b, max_iterations=n, tolerance=None)
    torch.testing.assert_close(result.x, torch.linalg.solve(A, b), rtol=1e-10, atol=1e-12)
    assert result.iterations == n and result.products == n and result.stop == "max_iterations"


def test_q_from_the_residual_equals_the_direct_value_at_every_kept_iterate():
    A, b = spd(60, 0.01, 100.0, seed=3)
    result = conjugate_gradient(lambda v: A @ v, b, max_iterations=60, tolerance=None)
    assert [step for step, _ in result.saved] == [5, 7, 9, 11, 15, 19, 25, 32, 41, 54, 60]
    for step, x in result.saved:
        torch.testing.assert_close(result.q[step], q_of(A, b, x), rtol=1e-9, atol=1e-12)
    assert (result.q[1:] <= result.q[:-1] + 1e-12).all()  # CG decreases q monotonically


def test_saved_iterates_are_the_iterates_of_shorter_runs():
    A, b = spd(50, 0.01, 100.0, seed=4)
    result = conjugate_gradient(lambda v: A @ v, b, max_iterations=40, tolerance=None)
    for step, x in result.saved:
        shorter = conjugate_gradient(
            lambda v: A @ v, b, max_iterations=step, tolerance=None, save_iterates=False
        )
        torch.testing.assert_close(x, shorter.x, rtol=0, atol=0)
    assert backtracking_grid(250)[:8] == [5, 7, 9, 11, 15, 19, 25, 32]
    assert all(math.ceil(5 * 1.3**j) in backtracking_grid(250) for j in range(15))


def test_a_diagonal_preconditioner_speeds_up_a_badly_scaled_system():
    A0, b = spd(60, 1.0, 3.0, seed=5)
    d = torch.logspace(-2, 2, 60, dtype=torch.float64)
    A = d.sqrt()[:, None] * A0 * d.sqrt()[None, :]  # well conditioned up to a diagonal scaling
    exact = torch.linalg.solve(A, b)
    plain = conjugate_gradient(lambda v: A @ v, b, max_iterations=15, tolerance=None)
    preconditioned = conjugate_gradient(
        lambda v: A @ v, b, preconditioner=A.diagonal(), max_iterations=15, tolerance=None
    )
    assert (preconditioned.x - exact).norm() < 1e-6 * exact.norm()
    assert (plain.x - exact).norm() > 100 * (preconditioned.x - exact).norm()
    callable_p = conjugate_gradient(
        lambda v: A @ v,
        b,
        preconditioner=lambda r: r / A.diagonal(),
        max_iterations=15,
        tolerance=None,
    )
    torch.testing.assert_close(callable_p.x, preconditioned.x)


def test_warm_start_counts_its_extra_product_and_converges_sooner():
    A, b = spd(40, 0.1, 10.0, seed=6)
    exact = torch.linalg.solve(A, b)
    x0 = exact + 1e-3 * torch.randn(
        40, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    cold = conjugate_gradient(lambda v: A @ v, b, max_iterations=8, tolerance=None)
    warm = conjugate_gradient(lambda v: A @ v, b, x0=x0, max_iterations=8, tolerance=None)
    assert warm.products == 9 and cold.products == 8
    assert (warm.x - exact).norm() < (cold.x - exact).norm()
    torch.testing.assert_close(
        warm.q[0], q_of(A, b, x0), rtol=1e-12, atol=1e-14
    )  # q from the residual of the warm start


def relative_progress(q, j):
    k = max(10, math.ceil(j / 10))
    return ((q[j] - q[j - k]) / q[j]).item() if j >= k and q[j] < 0 else math.inf


@pytest.mark.parametrize(
    "n, low, tolerance, minimum", [(200, 1e-3, 1e-2, 0), (200, 1e-3, 1e-3, 0), (600, 1e-6, 1e-7, 0)]
)
def test_progress_termination_fires_at_the_first_step_that_meets_eq_2(n, low, tolerance, minimum):
    # the last case stops beyond step 110, where the window k = max(10, j/10) grows past 10
    A, b = spd(n, low, 1.0, seed=7 if n == 200 else 11)
    result = conjugate_gradient(
        lambda v: A @ v, b, tolerance=tolerance, min_iterations=minimum, max_iterations=n
    )
    j = result.iterations
    assert result.stop == "progress" and j >= max(minimum, 10)
    assert relative_progress(result.q, j) < tolerance
    assert all(relative_progress(result.q, i) >= tolerance for i in range(max(minimum, 10), j))
    assert result.products == j


@pytest.mark.parametrize("n, low, epsilon", [(200, 1e-3, 5e-4), (600, 1e-6, 1e-5)])
def test_the_average_reading_stops_where_the_window_s_average_progress_meets_epsilon(
    n, low, epsilon
):
    # Martens 2010's code: s_j < k·ε; a step later than the literal window reading of eq. 2 can never be
    A, b = spd(n, low, 1.0, seed=7 if n == 200 else 11)
    result = conjugate_gradient(
        lambda v: A @ v, b, tolerance=epsilon, termination="average", max_iterations=n
    )
    j = result.iterations

    def average(i):
        return relative_progress(result.q, i) / max(10, math.ceil(i / 10))

    assert result.stop == "progress" and j >= 10
    assert average(j) < epsilon
    assert all(average(i) >= epsilon for i in range(10, j))
    literal = conjugate_gradient(lambda v: A @ v, b, tolerance=epsilon, max_iterations=n)
    assert literal.iterations > j  # the window reading asks k times more progress
    with pytest.raises(ValueError, match="termination: 'mean' is not one of"):
        conjugate_gradient(lambda v: A @ v, b, termination="mean")


def exact_trust_region(A, b, radius):
    """argmin q(x) subject to ‖x‖ ≤ radius, by eigendecomposition and bisection on the multiplier (A positive definite)."""
    w, V = torch.linalg.eigh(A)
    c = V.T @ b

    def x_of(lam):
        return V @ (c / (w + lam))

    if x_of(0.0).norm() <= radius:
        return x_of(0.0)
    low, high = 0.0, 1.0
    while x_of(high).norm() > radius:
        high *= 2
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if x_of(mid).norm() > radius else (low, mid)
    return x_of(high)


@pytest.mark.parametrize("radius", [0.05, 0.3, 1.0])
def test_steihaug_returns_a_boundary_point_at_least_half_as_good_as_the_trust_region_solution(
    radius,
):
    A, b = spd(30, 0.01, 5.0, seed=8)
    result = conjugate_gradient(lambda v: A @ v, b, radius=radius)
    optimum = exact_trust_region(A, b, radius)
    assert result.stop == "boundary"
    assert abs(result.x.norm().item() - radius) < 1e-12
    torch.testing.assert_close(result.q[-1], q_of(A, b, result.x), rtol=1e-9, atol=1e-12)
    assert (
        q_of(A, b, result.x) <= 0.5 * q_of(A, b, optimum) + 1e-12
    )  # Steihaug–Toint's guarantee (§8.6)
    norms = [
        x.norm().item()
        for _, x in conjugate_gradient(lambda v: A @ v, b, max_iterations=40, tolerance=None).saved
    ]
    assert all(
        a <= b + 1e-12 for a, b in zip(norms, norms[1:])
    )  # from zero, unpreconditioned: ‖x_i‖ grows monotonically


def test_steihaug_with_a_diagonal_preconditioner_uses_the_P_norm():
    A, b = spd(20, 0.1, 5.0, seed=9)
    d = torch.linspace(0.5, 2.0, 20, dtype=torch.float64)
    result = conjugate_gradient(lambda v: A @ v, b, preconditioner=d, radius=0.2)
    assert abs((result.x @ (d * result.x)).sqrt().item() - 0.2) < 1e-12


def test_negative_curvature_stops_or_goes_to_the_boundary():
    A = torch.diag(torch.tensor([-1.0, 2.0, 3.0], dtype=torch.float64))
    b = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    plain = conjugate_gradient(lambda v: A @ v, b)
    assert (
        plain.stop == "negative_curvature" and (plain.x == 0).all() and plain.iterations == 0
    )  # no step along it
    bounded = conjugate_gradient(lambda v: A @ v, b, radius=2.0)
    assert bounded.stop == "negative_curvature"
    torch.testing.assert_close(bounded.x, torch.tensor([2.0, 0.0, 0.0], dtype=torch.float64))
    assert q_of(A, b, bounded.x) < 0


def test_a_non_finite_product_stops_cg_without_touching_x():
    A, b = spd(10, seed=10)
    calls = []

    def flaky(v):
        calls.append(1)
        return A @ v if len(calls) < 4 else torch.full_like(v, float("nan"))

    result = conjugate_gradient(flaky, b)
    assert (
        result.stop == "non_finite" and torch.isfinite(result.x).all() and result.iterations == 3
    )  # the NaN step moved nothing
    torch.testing.assert_close(
        result.x, conjugate_gradient(lambda v: A @ v, b, max_iterations=3, tolerance=None).x
    )


def test_cg_on_a_damped_curvature_operator():
    torch.manual_seed(0)
    mlp = MLP([3, 4, 2], dtype=torch.float64)
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    G, lam = GGN(mlp, "squared_error", (x, y)), 0.1
    b = -torch.randn(G.n, dtype=torch.float64)
    result = conjugate_gradient(lambda v: G.mv(v) + lam * v, b, max_iterations=G.n, tolerance=None)
    torch.testing.assert_close(
        result.x,
        torch.linalg.solve(G.dense() + lam * torch.eye(G.n, dtype=torch.float64), b),
        rtol=1e-7,
        atol=1e-9,
    )


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"max_iterations": 0}, ValueError, "max_iterations"),
        ({"min_iterations": -1}, ValueError, "min_iterations"),
        ({"tolerance": 0.0}, ValueError, "tolerance"),
        ({"tolerance": 2.0}, ValueError, "tolerance"),
        ({"radius": -1.0}, ValueError, "radius"),
        ({"preconditioner": torch.zeros(4, dtype=torch.float64)}, ValueError, "positive"),
        ({"preconditioner": "diag"}, TypeError, "preconditioner"),
        ({"x0": torch.zeros(3, dtype=torch.float64)}, ValueError, "x0"),
        ({"x0": torch.ones(4, dtype=torch.float64), "radius": 1.0}, ValueError, "x0 = 0"),
        ({"monitor": 3.0}, TypeError, "monitor"),
        ({"monitor_every": 0}, ValueError, "monitor_every"),
        ({"monitor_window": 0}, ValueError, "monitor_window"),
        ({"monitor_tolerance": -0.1}, ValueError, "monitor_tolerance"),
        ({"on_step": 1}, TypeError, "on_step"),
    ],
)
def test_bad_arguments_get_clear_errors(kwargs, error, words):
    A, b = spd(4)
    with pytest.raises(error, match=words):
        conjugate_gradient(lambda v: A @ v, b, **kwargs)
    with pytest.raises(TypeError, match="b:"):
        conjugate_gradient(lambda v: v, torch.zeros(2, 2))


def test_min_iterations_holds_the_progress_test_back():
    A, b = spd(200, 1e-3, 1.0, seed=7)
    natural = conjugate_gradient(lambda v: A @ v, b, tolerance=1e-2).iterations
    held = conjugate_gradient(lambda v: A @ v, b, tolerance=1e-2, min_iterations=natural + 15)
    assert held.iterations >= natural + 15 and held.stop == "progress"


@pytest.mark.parametrize("tolerance", [1e-2, 1e-3])
def test_the_lagged_stop_of_the_gpu_path_returns_the_same_result_and_counts_its_spare_product(
    tolerance,
):
    A, b = spd(200, 1e-3, 1.0, seed=7)
    now = conjugate_gradient(lambda v: A @ v, b, tolerance=tolerance)
    late = conjugate_gradient(lambda v: A @ v, b, tolerance=tolerance, _lagged=True)
    assert (late.iterations, late.stop, late.products) == (now.iterations, now.stop, now.products)
    assert (
        now.discarded == 0 and late.discarded == 1
    )  # one product computed past the stop, and said so
    torch.testing.assert_close(late.x, now.x, rtol=0, atol=0)
    torch.testing.assert_close(late.q, now.q, rtol=0, atol=0)
    assert [s for s, _ in late.saved] == [s for s, _ in now.saved]
    negative = torch.diag(torch.tensor([-1.0, 2.0], dtype=torch.float64))
    lagged_negative = conjugate_gradient(
        lambda v: negative @ v, torch.tensor([1.0, 0.0], dtype=torch.float64), _lagged=True
    )
    assert lagged_negative.stop == "negative_curvature" and (lagged_negative.x == 0).all()


def test_an_overflowing_step_size_is_treated_like_non_finite_curvature():
    b = torch.tensor([1.0, 1.0], dtype=torch.float64)
    result = conjugate_gradient(lambda v: 1e-320 * v, b)
    assert result.stop == "non_finite" and torch.isfinite(result.x).all()


def scripted_monitor(values):
    """A monitor that returns `values` in turn and records the iterates it was shown."""
    shown = []

    def monitor(x):
        shown.append(x.clone())
        return values[len(shown) - 1]

    return monitor, shown


@pytest.mark.parametrize("lagged", [False, True])
def test_the_monitor_stops_cg_when_the_objective_is_worse_than_a_window_earlier(lagged):
    A, b = spd(60, 1e-3, 1.0, seed=4)
    # read at steps 3, 6, 9, 12, 15, 18: step 15 (1.0) is not worse than step 9 (1.0) within 10 %, step 18 (1.2) is
    monitor, shown = scripted_monitor([3.0, 2.0, 1.0, 0.9, 1.0 + 0.09, 1.2, 0.1])
    result = conjugate_gradient(
        lambda v: A @ v,
        b,
        tolerance=None,
        monitor=monitor,
        monitor_every=3,
        monitor_window=9,
        monitor_tolerance=0.1,
        _lagged=lagged,
    )
    assert result.stop == "objective" and result.iterations == 18 and len(shown) == 6
    assert [step for step, _ in result.monitored] == [3, 6, 9, 12, 15, 18]
    plain = conjugate_gradient(lambda v: A @ v, b, tolerance=None, max_iterations=18)
    torch.testing.assert_close(
        result.x, plain.x
    )  # the monitor only reads: the iterates are CG's own
    torch.testing.assert_close(shown[-1], plain.x)
    assert result.saved[-1][0] == 18 and result.products == 18


def test_the_monitor_respects_min_iterations_and_stops_on_a_non_finite_value():
    A, b = spd(60, 1e-3, 1.0, seed=4)
    monitor, _ = scripted_monitor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    held = conjugate_gradient(
        lambda v: A @ v,
        b,
        tolerance=None,
        monitor=monitor,
        monitor_every=2,
        monitor_window=2,
        min_iterations=9,
    )
    assert (
        held.stop == "objective" and held.iterations == 10
    )  # worse from step 4 on, but not before step 9
    monitor, _ = scripted_monitor([1.0, math.nan])
    broken = conjugate_gradient(
        lambda v: A @ v, b, tolerance=None, monitor=monitor, monitor_every=5
    )
    assert broken.stop == "objective" and broken.iterations == 10


def test_a_monitor_on_the_quadratic_itself_never_stops_cg():
    A, b = spd(40, seed=5)
    result = conjugate_gradient(
        lambda v: A @ v,
        b,
        tolerance=None,
        max_iterations=40,
        monitor=lambda x: q_of(A, b, x),
        monitor_every=1,
        monitor_window=1,
        monitor_tolerance=1e-9,
    )
    assert result.stop == "max_iterations" and len(result.monitored) == 40
    values = [v for _, v in result.monitored]
    assert all(later <= earlier + 1e-12 for earlier, later in zip(values, values[1:]))


@pytest.mark.parametrize("warm, lagged", [(False, False), (True, False), (True, True)])
def test_on_step_sees_the_start_and_every_iterate_as_shorter_runs_return_them(warm, lagged):
    A, b = spd(30, 0.01, 10.0, seed=11)
    x0 = (
        0.1 * torch.randn(30, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        if warm
        else None
    )
    seen = []
    result = conjugate_gradient(
        lambda v: A @ v,
        b,
        x0,
        tolerance=1e-3,
        on_step=lambda i, x: seen.append((i, x)),
        _lagged=lagged,
    )
    assert [i for i, _ in seen] == list(range(result.iterations + 1)) and result.stop == "progress"
    torch.testing.assert_close(
        seen[0][1], torch.zeros(30, dtype=torch.float64) if x0 is None else x0, rtol=0, atol=0
    )
    for i, x in seen[1:]:  # the recorded tensors were not overwritten by later steps
        shorter = conjugate_gradient(
            lambda v: A @ v, b, x0, max_iterations=i, tolerance=None, save_iterates=False
        )
        torch.testing.assert_close(x, shorter.x, rtol=0, atol=0)
    torch.testing.assert_close(
        torch.stack([q_of(A, b, x) for _, x in seen]), result.q, rtol=1e-9, atol=1e-12
    )


def test_on_step_reports_the_boundary_point_and_a_retracted_step():
    A, b = spd(30, 0.01, 5.0, seed=8)
    seen = []
    bounded = conjugate_gradient(
        lambda v: A @ v, b, radius=0.3, on_step=lambda i, x: seen.append((i, x))
    )
    assert bounded.stop == "boundary" and seen[-1][0] == bounded.iterations
    torch.testing.assert_close(seen[-1][1], bounded.x, rtol=0, atol=0)
    negative = torch.diag(torch.tensor([-1.0, 2.0, 3.0], dtype=torch.float64))
    calls = []
    plain = conjugate_gradient(
        lambda v: negative @ v,
        torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64),
        on_step=lambda i, x: calls.append((i, x.clone())),
    )
    assert plain.iterations == 0 and [i for i, _ in calls] == [
        0,
        1,
    ]  # the step taken back is reported, unchanged
    assert (calls[1][1] == 0).all()
