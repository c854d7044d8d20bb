"""qnwb.quadratic: spectra, runs of qnwb.optim's CM/NAG against the 2x2 iteration, closed-form rates, figures."""

import pytest
import torch

from qnwb.optim.schedules import SutskeverMomentum
from qnwb.quadratic import (
    Quadratic,
    eigendirection_figure,
    iteration_matrix,
    oblong_quadratic,
    rate_map,
    rate_map_figure,
    run_momentum,
    spectral_radius,
    trajectories_figure,
)


def test_spectra_and_the_minimizer():
    q = Quadratic.log_uniform(30, 1e-3, 1.0, seed=3)
    assert q.eigenvalues[-1] / q.eigenvalues[0] == pytest.approx(1e3)
    torch.testing.assert_close(torch.linalg.eigvalsh(q.A), q.eigenvalues, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        q.gradient(q.minimizer), torch.zeros(30, dtype=torch.float64), rtol=0, atol=1e-9
    )
    noisy = Quadratic.noisy_quadratic(200, seed=1)
    low, high = noisy.eigenvalues[noisy.eigenvalues < 1], noisy.eigenvalues[noisy.eigenvalues > 30]
    assert len(low) == 180 and len(high) == 20 and bool((high < 60).all()) and bool((low > 0).all())
    unrotated = Quadratic.from_spectrum([3.0, 1.0, 2.0], rotate=False)
    torch.testing.assert_close(
        unrotated.A, torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    )


@pytest.mark.parametrize("method", ["gd", "cm", "nag"])
def test_a_run_is_the_2x2_iteration_along_every_eigendirection(method):
    q = Quadratic.from_spectrum([0.01, 0.3, 1.0, 1.7], seed=4)
    lr, mu = 0.9, 0.0 if method == "gd" else 0.85
    run = run_momentum(q, method, lr=lr, momentum=mu, steps=50)
    for i, lam in enumerate(q.eigenvalues.tolist()):
        T = iteration_matrix("nag" if method == "nag" else "cm", lr, mu, lam)
        state = torch.tensor([float(run.errors[0, i]), 0.0], dtype=torch.float64)
        expected = torch.stack([(torch.linalg.matrix_power(T, t) @ state)[0] for t in range(51)])
        torch.testing.assert_close(
            run.errors[:, i], expected, rtol=1e-9, atol=1e-9 * float(run.errors[0].abs().max())
        )
    if method == "gd":  # GD: (1 − ελ)^t along each direction
        torch.testing.assert_close(run.errors[10], run.errors[0] * (1 - lr * q.eigenvalues) ** 10)
    torch.testing.assert_close(run.values, 0.5 * (run.errors**2 * q.eigenvalues).sum(1))


def test_runs_follow_schedules_and_noise_is_seeded():
    q = Quadratic.log_uniform(10, 1e-2, 1.0, noise=0.1)
    schedule = SutskeverMomentum(0.99, period=5)
    a, b, c = (run_momentum(q, "nag", 0.5, schedule, 30, seed=s) for s in (0, 0, 1))
    assert a.momenta == [schedule(t) for t in range(30)]
    torch.testing.assert_close(a.x, b.x, rtol=0, atol=0)
    assert not torch.equal(a.x, c.x)


@pytest.mark.parametrize("method", ["cm", "nag"])
@pytest.mark.parametrize(
    "lr, mu, lam",
    [
        (0.1, 0.9, 1.0),
        (1.0, 0.99, 1.0),
        (1.4, 0.9, 1.0),
        (3.9, 0.9, 1.0),
        (0.5, 0.0, 0.3),
        (2.1, 0.0, 1.0),
        (1.0, 0.5, 2.0),
    ],
)
def test_the_closed_form_rate_matches_the_matrix_and_marks_divergence(method, lr, mu, lam):
    T = iteration_matrix(method, lr, mu, lam)
    radius = float(spectral_radius(method, lr, mu, lam))
    assert radius == pytest.approx(float(torch.linalg.eigvals(T).abs().max()), rel=1e-10, abs=1e-12)
    growth = float(torch.linalg.matrix_power(T, 400).norm())
    assert (growth > 1.0) == (
        radius > 1.0 + 1e-9
    )  # iterating the matrix agrees with the map about divergence


def test_the_divergence_boundaries_of_cm_and_nag():
    mu = 0.9
    cm_edge, nag_edge = (
        2 * (1 + mu),
        2 * (1 + mu) / (1 + 2 * mu),
    )  # ελ at which each method stops converging
    for edge, method in ((cm_edge, "cm"), (nag_edge, "nag")):
        assert (
            float(rate_map([1.0], [edge * 0.999], [mu], method))
            < 1
            < float(rate_map([1.0], [edge * 1.001], [mu], method))
        )
    grid = rate_map(
        torch.logspace(-2, 0, 5), torch.linspace(0.1, 4.0, 7), torch.tensor([0.0, 0.5, 0.9]), "nag"
    )
    assert grid.shape == (3, 7)


def test_bad_inputs_get_clear_errors():
    with pytest.raises(ValueError, match="empty"):
        Quadratic.from_spectrum([])
    with pytest.raises(ValueError, match="> 0"):
        Quadratic.from_spectrum([1.0, -0.5])
    with pytest.raises(ValueError, match="noise"):
        Quadratic.from_spectrum([1.0], noise=-1.0)
    q = Quadratic.from_spectrum([1.0, 2.0])
    with pytest.raises(ValueError, match="method"):
        run_momentum(q, "adam")
    with pytest.raises(ValueError, match="x0"):
        run_momentum(q, x0=torch.zeros(3))
    with pytest.raises(ValueError, match="momentum"):
        run_momentum(q, "cm", momentum=1.0)
    with pytest.raises(ValueError, match="momenta"):
        rate_map([1.0], [0.1], [1.0])
    with pytest.raises(ValueError, match="eigenvalues"):
        rate_map([0.0], [0.1], [0.5])
    with pytest.raises(ValueError, match="n = 2"):
        trajectories_figure(Quadratic.from_spectrum([1.0, 2.0, 3.0]), [])


def test_figures():
    oblong = oblong_quadratic(50.0)
    start = torch.tensor([-10.0, 1.0], dtype=torch.float64)
    runs = [run_momentum(oblong, m, 0.9, 0.95, 40, x0=start) for m in ("gd", "cm", "nag")]
    figure = trajectories_figure(oblong, runs)
    assert [t.name for t in figure.data[1:]] == ["GD", "CM", "NAG", "x*"] and len(
        figure.data[2].x
    ) == 41
    # the paper's point: CM swings along the high-curvature axis much more than NAG
    assert runs[1].x[2:, 1].abs().max() > 10 * runs[2].x[2:, 1].abs().max()
    rates = rate_map_figure(
        torch.logspace(-2, 0, 4), torch.logspace(-2, 0.5, 8), torch.linspace(0, 0.99, 6)
    )
    assert len(rates.data) == 4
    directions = eigendirection_figure(oblong, runs[1:], directions=2)
    assert len(directions.data) == 4 and directions.layout.yaxis.type == "log"


def test_the_convergence_figure_and_the_schedules_story():
    from qnwb.optim.schedules import SutskeverMomentum
    from qnwb.quadratic import convergence_figure

    hard = Quadratic.log_uniform(20, 1e-3, 1.0, seed=2)
    runs = {
        "constant 0.9": run_momentum(hard, "nag", 1.0, 0.9, 400),
        "eq. 5": run_momentum(hard, "nag", 1.0, SutskeverMomentum(0.99, period=10), 400),
    }
    assert (
        runs["eq. 5"].values[-1] < runs["constant 0.9"].values[-1]
    )  # more momentum reaches the flat directions
    figure = convergence_figure(runs)
    assert [t.name for t in figure.data] == list(runs) and len(figure.data[0].y) == 401


@pytest.mark.parametrize("method", ["cm", "nag"])
@pytest.mark.parametrize("lr, mu", [(0.5, 0.8), (1.2, 0.95), (0.1, 0.5), (1.0, 0.99)])
def test_the_simulated_rate_equals_the_closed_form_radius_within_1e_6(method, lr, mu):
    from qnwb.quadratic import observed_rates

    q = Quadratic.from_spectrum([0.02, 0.3, 0.9], seed=6)
    run = run_momentum(q, method, lr=lr, momentum=mu, steps=40)
    torch.testing.assert_close(
        observed_rates(run), spectral_radius(method, lr, mu, q.eigenvalues), rtol=0, atol=1e-6
    )
