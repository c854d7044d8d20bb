"""qnwb.diagnostics.spectrum against dense float64 references: Lanczos probes over operators and seeds, stochastic
Lanczos quadrature (exact moments), Hutchinson (exact expectation and variance), the figure builders' traces."""

import itertools
import math
import re

import pytest
import torch
from roundoff import floor

from qnwb.curvature import GGN, EmpiricalFisher, Hessian
from qnwb.diagnostics.spectrum import (
    curvature_operators,
    density_figure,
    describe_operator,
    extremes_figure,
    hutchinson,
    ritz_figure,
    slq,
    spectrum_probe,
    trace_figure,
)
from qnwb.models import TanhRNN

F64 = torch.float64


def symmetric(n=40, seed=0, spectrum=None):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    if spectrum is None:
        spectrum = torch.logspace(-2, 2, n, dtype=F64) * torch.where(
            torch.arange(n) % 4 == 0, -1.0, 1.0
        ).to(F64)
    return Q @ torch.diag(spectrum) @ Q.T


@pytest.fixture(scope="module")
def rnn_problem():
    """A float64 TanhRNN (3 → 5 → 2, 62 parameters) and three batches, units neither linear nor saturated."""
    g = torch.Generator().manual_seed(0)
    model = TanhRNN(3, 5, 2, dtype=F64, generator=g)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=F64) * (0.5 if p.dim() == 2 else 0.3))
    batches = [
        (torch.randn(b, 5, 3, generator=g, dtype=F64), torch.randn(b, 5, 2, generator=g, dtype=F64))
        for b in (8, 8, 12)
    ]
    with torch.no_grad():
        hidden = model(batches[0][0], return_hidden=True)[1]
    assert 0.2 < hidden.abs().mean() < 0.8
    return model, batches


def test_curvature_operators_remember_kind_size_and_batch(rnn_problem):
    model, batches = rnn_problem
    ggns = curvature_operators(model, "squared_error", batches)
    assert [describe_operator(G) for G in ggns] == [
        {"kind": "GGN", "n": 62, "batch_size": b} for b in (8, 8, 12)
    ]
    (h,) = curvature_operators(model, "squared_error", batches[0], kind="hessian")
    assert isinstance(h, Hessian) and describe_operator(h)["batch_size"] == 8
    (f,) = curvature_operators(model, "squared_error", batches[2], kind="fisher")
    assert isinstance(f, EmpiricalFisher) and describe_operator(f)["batch_size"] == 12
    damped = curvature_operators(
        model, "squared_error", batches[:1], structural_distance="tanh", structural_weight=0.5
    )[0]
    assert describe_operator(damped)["structural_weight"] == 0.5
    plain_ggn = GGN(
        model, "squared_error", batches[1]
    )  # built directly: the batch size is read from its outputs
    assert describe_operator(plain_ggn)["batch_size"] == 8
    assert describe_operator(lambda v: v, n=3) == {"kind": "function", "n": 3, "batch_size": None}


@pytest.mark.parametrize("which", ["largest", "smallest", "both"])
def test_probe_agrees_with_eigvalsh_on_dense_matrices(which):
    A = symmetric()
    exact = torch.linalg.eigvalsh(A)
    probe = spectrum_probe(A, k=3, which=which, tolerance=1e-10, iterations=40)
    wanted = {
        "largest": exact.flip(0)[:3],
        "smallest": exact[:3],
        "both": torch.cat([exact[:3], exact.flip(0)[:3]]),
    }[which]
    values = probe.runs[0].values
    assert ((values - wanted).abs() / wanted.abs()).max() < 1e-8
    assert probe.labels[0] == ("largest 1" if which == "largest" else "smallest 1")
    assert probe.runs[0].stop == "converged" and probe.products == probe.runs[0].products < 40


def test_probe_on_real_ggn_and_hessian_of_a_tanh_rnn_over_batches_and_seeds(rnn_problem):
    model, batches = rnn_problem
    ggns = curvature_operators(model, "squared_error", batches)
    probe = spectrum_probe(ggns, k=3, seeds=[0, 5], tolerance=1e-10, iterations=62)
    assert [(r.operator, r.seed) for r in probe.runs] == list(itertools.product(range(3), [0, 5]))
    assert (
        probe.seeds == [0, 5]
        and probe.k == 3
        and probe.which == "largest"
        and probe.tolerance == 1e-10
    )
    assert (
        [o["batch_size"] for o in probe.operators] == [8, 8, 12]
        and probe.n == 62
        and probe.dtype == "float64"
    )
    for run in probe.runs:
        top = torch.linalg.eigvalsh(ggns[run.operator].dense()).flip(0)[:3]
        assert ((run.values - top).abs() / top).max() < 1e-8
        assert (run.residuals <= 1e-10 * run.values.abs()).all()
        torch.testing.assert_close(
            torch.linalg.eigvalsh(
                torch.diag(run.alpha) + torch.diag(run.beta, 1) + torch.diag(run.beta, -1)
            ),
            run.history[-1][0],
        )
    # spread per eigenvalue = statistics over the runs, which differ by batch
    e = probe.estimates()
    s = probe.spread()
    torch.testing.assert_close(s["mean"], e.mean(0))
    torch.testing.assert_close(s["std"], e.std(0))
    torch.testing.assert_close(s["min"], e.min(0).values)
    torch.testing.assert_close(s["max"], e.max(0).values)
    assert (s["max"] - s["min"] > 1e-3 * s["mean"]).all(), (
        "different batches give different curvature"
    )
    assert "GGN (n = 62, batch 8/12), 3 operators × 2 seeds" == probe.describe()

    hessian = Hessian(model, "squared_error", batches[0])
    exact = torch.linalg.eigvalsh(hessian.dense())
    assert exact[0] < 0
    both = spectrum_probe(hessian, k=2, which="both", tolerance=1e-10, iterations=62)
    wanted = torch.cat([exact[:2], exact.flip(0)[:2]])
    assert ((both.runs[0].values - wanted).abs() / wanted.abs()).max() < 1e-8


def test_history_residuals_are_true_residuals():
    A = symmetric(30, seed=2)
    probe = spectrum_probe(A, k=2, tolerance=None, iterations=12)
    run = probe.runs[0]
    assert len(run.history) == 12 and run.stop == "iterations"
    # re-run Lanczos for its basis: the j-th history entry's residuals are ‖A y − θ y‖ of the leading j vectors
    from qnwb.lanczos import lanczos

    V = lanczos(A, 12, seed=0).basis
    for j in (3, 7, 12):
        theta, S = torch.linalg.eigh(V[:j] @ A @ V[:j].T)
        Y = V[:j].T @ S
        torch.testing.assert_close(
            run.history[j - 1][1],
            torch.linalg.vector_norm(A @ Y - Y * theta, dim=0),
            rtol=0,
            atol=1e-9,
        )


def test_invariant_subspace_with_fewer_than_k_eigenvalues_pads_with_nan():
    A = symmetric(20, seed=3, spectrum=torch.tensor([1.0, 3.0] * 10, dtype=F64))
    probe = spectrum_probe(A, k=3, tolerance=1e-8)
    run = probe.runs[0]
    assert run.stop == "invariant" and run.products == 2
    torch.testing.assert_close(run.values[:2], torch.tensor([3.0, 1.0], dtype=F64))
    assert math.isnan(run.values[2])
    assert probe.spread()["count"].tolist() == [1, 1, 0]


def test_slq_coordinate_start_vectors_give_exact_moments():
    """With e_1 … e_n as start vectors, mean_i Σ w θ^p = tr(A^p)/n exactly for p ≤ 2m − 1."""
    A = symmetric(25, seed=4) / 50
    n, m = 25, 4
    density = slq(A, iterations=m, start_vectors=torch.eye(n, dtype=F64))
    assert density.probes == n and density.products == n * m and density.distribution == "given"
    for p in range(2 * m):
        exact = torch.linalg.matrix_power(A, p).trace() / n
        assert density.moment(p) == pytest.approx(float(exact), rel=1e-10, abs=1e-14)
    exact = float(torch.linalg.matrix_power(A, 2 * m).trace() / n)
    assert abs(density.moment(2 * m) - exact) > 1e-6 * exact  # degree 2m is beyond Gauss quadrature


def test_slq_single_vector_moments_and_weights(rnn_problem):
    model, batches = rnn_problem
    G = curvature_operators(model, "squared_error", batches[0])[0]
    dense = G.dense()
    density = slq(G, probes=3, iterations=6, seed=7)
    assert (
        density.seeds == [7, 8, 9]
        and density.distribution == "rademacher"
        and density.operators[0]["kind"] == "GGN"
    )
    from qnwb.lanczos import random_unit_vector

    for j, (t, w) in enumerate(zip(density.nodes, density.weights)):
        assert w.sum().item() == pytest.approx(1.0, abs=1e-12) and (w >= 0).all()
        v = random_unit_vector(62, seed=7 + j, kind="rademacher", dtype=F64)
        power = v.clone()
        for p in range(12):  # 2m − 1 = 11
            assert float((w * t**p).sum()) == pytest.approx(float(v @ power), rel=1e-9)
            power = dense @ power


def test_slq_density_integrates_to_one_and_its_moments_match_the_spectrum():
    A = symmetric(60, seed=5, spectrum=torch.linspace(-1.0, 4.0, 60, dtype=F64))
    density = slq(A, probes=40, iterations=20, seed=0)
    grid, phi = density.density()
    assert (phi >= 0).all()
    assert torch.trapezoid(phi, grid).item() == pytest.approx(
        1.0, abs=1e-8
    )  # the default grid spans the nodes ± 6σ
    sigma = density.sigma()
    # the smoothed density's mean is the quadrature mean (Gaussians are symmetric), its variance adds σ²
    mean = torch.trapezoid(phi * grid, grid).item()
    assert mean == pytest.approx(density.moment(1), abs=1e-8)
    second = torch.trapezoid(phi * grid**2, grid).item()
    assert second == pytest.approx(density.moment(2) + sigma**2, rel=1e-8)
    # and the quadrature moments estimate the spectrum's (40 Rademacher probes: a few per cent)
    eig = torch.linalg.eigvalsh(A)
    assert density.moment(1) == pytest.approx(float(eig.mean()), rel=0.1)
    assert density.moment(2) == pytest.approx(float((eig**2).mean()), rel=0.1)
    # a grid and a width given by the caller
    grid2, phi2 = density.density(grid=torch.linspace(-3, 6, 2001, dtype=F64), sigma=0.2)
    assert torch.trapezoid(phi2, grid2).item() == pytest.approx(1.0, abs=1e-6)


def test_slq_over_several_operators_draws_probes_for_each(rnn_problem):
    model, batches = rnn_problem
    ggns = curvature_operators(model, "squared_error", batches)
    density = slq(ggns, probes=2, iterations=5)
    assert (
        density.operator == [0, 0, 1, 1, 2, 2]
        and density.seeds == [0, 1] * 3
        and density.products == 30
    )


def test_hutchinson_exact_expectation_and_variance_over_all_sign_vectors():
    A = symmetric(7, seed=6)
    signs = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=7)), dtype=F64)
    est = hutchinson(A, vectors=signs)
    assert est.probes == 128 and est.distribution == "given" and est.seeds == [None] * 128
    # a mean of 128 estimates of size up to Σ|aᵢⱼ| ≈ 600: round-off of that size, not of the trace's
    assert est.mean == pytest.approx(float(A.trace()), abs=floor(est.estimates))
    off = A - torch.diag(A.diagonal())
    assert float(est.estimates.var(unbiased=False)) == pytest.approx(
        float(2 * (off**2).sum()), rel=1e-12
    )


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased_within_a_few_standard_errors(distribution, rnn_problem):
    model, batches = rnn_problem
    G = curvature_operators(model, "squared_error", batches[2])[0]
    trace = float(G.dense().trace())
    est = hutchinson(G, probes=400, seed=1, distribution=distribution)
    assert (
        est.probes == 400 and est.seeds == list(range(1, 401)) and est.distribution == distribution
    )
    assert abs(est.mean - trace) < 4 * est.stderr
    assert est.stderr == pytest.approx(float(est.estimates.std()) / 20)
    if distribution == "rademacher":  # Rademacher probes are exactly ±1
        from qnwb.lanczos import random_vector

        assert set(random_vector(10, seed=0, kind="rademacher", dtype=F64).tolist()) <= {-1.0, 1.0}


def test_hutchinson_over_many_seeds_has_the_right_spread():
    """Mean over independent estimates ≈ trace; the standard errors predict the spread of the means."""
    A = symmetric(15, seed=8)
    means = torch.tensor(
        [hutchinson(A, probes=20, seed=1000 * s).mean for s in range(60)], dtype=F64
    )
    off = A - torch.diag(A.diagonal())
    predicted_sd = math.sqrt(2 * float((off**2).sum()) / 20)
    assert abs(float(means.mean()) - float(A.trace())) < 4 * predicted_sd / math.sqrt(60)
    assert 0.6 < float(means.std()) / predicted_sd < 1.5


def test_running_mean_and_stderr():
    est = hutchinson(symmetric(10, seed=9), probes=30, seed=3)
    mean, se = est.running()
    e = est.estimates
    for j in (2, 10, 30):
        assert float(mean[j - 1]) == pytest.approx(float(e[:j].mean()), rel=1e-12)
        assert float(se[j - 1]) == pytest.approx(float(e[:j].std() / math.sqrt(j)), rel=1e-9)
    assert math.isnan(se[0]) and float(mean[0]) == float(e[0])


def test_figures_draw_the_probe_data(rnn_problem):
    model, batches = rnn_problem
    ggns = curvature_operators(model, "squared_error", batches)
    probe = spectrum_probe(ggns, k=2, seeds=[0, 1], tolerance=1e-8, iterations=62)
    exact = torch.linalg.eigvalsh(ggns[1].dense())

    fig = ritz_figure(probe, run=2, exact=exact)  # operator 1, seed 0
    assert [t.name for t in fig.data] == [
        "largest 1",
        "largest 1 residual",
        "largest 1 exact",
        "largest 2",
        "largest 2 residual",
        "largest 2 exact",
    ]
    run = probe.runs[2]
    steps = len(run.history)
    assert list(fig.data[0].x) == list(range(1, steps + 1)) and list(fig.data[3].x) == list(
        range(2, steps + 1)
    )
    assert list(fig.data[0].y) == [float(v[-1]) for v, _ in run.history]
    assert list(fig.data[3].y) == [float(v[-2]) for v, _ in run.history[1:]]
    assert list(fig.data[0].customdata) == [float(r[-1]) for _, r in run.history]
    assert fig.data[1].y[-1] == pytest.approx(float(run.residuals[0] / run.values[0]))
    assert fig.data[2].y[0] == pytest.approx(float(exact[-1])) and fig.data[5].y[
        0
    ] == pytest.approx(float(exact[-2]))
    assert (
        fig.layout.yaxis2.type == "log"
        and "seed 0" in fig.layout.title.text
        and "batch 8" in fig.layout.title.text
    )
    assert "residual" in fig.data[0].hovertemplate

    fig = extremes_figure(probe, band="std", log_y=True)
    assert [t.name for t in fig.data] == ["runs", "mean (±1 sd)"]
    e, s = probe.estimates(), probe.spread()
    assert (
        list(fig.data[0].y) == e.flatten().tolist()
        and list(fig.data[0].x) == ["largest 1", "largest 2"] * 6
    )
    assert "operator 2 (batch 12), seed 1" in fig.data[0].text[-1]
    assert (
        list(fig.data[1].y) == s["mean"].tolist()
        and list(fig.data[1].error_y.array) == s["std"].tolist()
    )
    assert fig.layout.yaxis.type == "log" and "3 operators × 2 seeds" in fig.layout.title.text

    density = slq(ggns[0], probes=4, iterations=8)
    fig = density_figure(density, log_y=False, sigma=0.5, points=300)
    grid, phi = density.density(sigma=0.5, points=300)
    assert [t.name for t in fig.data] == ["density", "nodes (weight / probes)"]
    assert list(fig.data[0].x) == grid.tolist() and list(fig.data[0].y) == phi.tolist()
    assert list(fig.data[1].x) == torch.cat(density.nodes).tolist()
    assert sum(fig.data[1].y) == pytest.approx(1.0)
    assert (
        fig.layout.yaxis.type == "linear"
        and "σ = 0.5" in fig.layout.title.text
        and "4 rademacher probes" in fig.layout.title.text
    )
    assert density_figure(density).layout.yaxis.type == "log"

    est = hutchinson(ggns[0], probes=25)
    fig = trace_figure(est, exact=float(ggns[0].dense().trace()), z=1.0)
    mean, se = est.running()
    assert [t.name for t in fig.data] == [
        "per-probe zᵀAz",
        "mean + 1 se",
        "mean − 1 se",
        "running mean",
        "exact trace",
    ]
    assert list(fig.data[0].y) == est.estimates.tolist() and list(fig.data[3].y) == mean.tolist()
    assert (
        list(fig.data[1].y) == (mean + se)[1:].tolist()
        and list(fig.data[2].y) == (mean - se)[1:].tolist()
    )
    assert len(fig.data[1].x) == 24 and fig.data[2].fill == "tonexty"
    assert len(trace_figure(est).data) == 4


def test_probes_on_the_device(device, rnn_problem):
    model, batches = rnn_problem
    moved = TanhRNN(3, 5, 2, dtype=F64).to(device)
    moved.load_state_dict(model.state_dict())
    ggns = curvature_operators(
        moved, "squared_error", [tuple(t.to(device) for t in b) for b in batches[:1]]
    )
    probe = spectrum_probe(ggns, k=2, tolerance=1e-8)
    assert probe.device.startswith(device.type)
    top = torch.linalg.eigvalsh(ggns[0].dense().cpu()).flip(0)[:2]
    assert ((probe.runs[0].values - top).abs() / top).max() < 1e-6
    assert slq(ggns, probes=2, iterations=5).nodes[0].device.type == "cpu"
    assert hutchinson(ggns, probes=3).estimates.device.type == "cpu"


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda A: spectrum_probe(A, k=21), "k: 21 eigenvalues exceed the dimension 20"),
        (
            lambda A: spectrum_probe(A, k=11, which="both"),
            "k: 11 eigenvalues at each end exceed the dimension 20",
        ),
        (lambda A: spectrum_probe(A, k=2, which="top"), "which: expected one of"),
        (lambda A: spectrum_probe(A, k=0), "k: must be a positive int"),
        (
            lambda A: spectrum_probe(A, k=3, iterations=2),
            "iterations: 2 steps give fewer than the 3 wanted",
        ),
        (lambda A: spectrum_probe(A, seeds=[]), "seeds: expected an int or a non-empty list"),
        (lambda A: spectrum_probe(A, seeds=1.5), "seeds:"),
        (lambda A: spectrum_probe(A, tolerance=2.0), "tolerance: must be None or in (0, 1)"),
        (lambda A: spectrum_probe([]), "operators: need at least one operator"),
        (
            lambda A: spectrum_probe([A, torch.eye(5, dtype=F64)]),
            "operators: all must have the same dimension, got [5, 20]",
        ),
        (
            lambda A: spectrum_probe(lambda v: (A @ v)[:-1], k=1, n=20, dtype=F64),
            "expected shape (20,)",
        ),
        (lambda A: spectrum_probe(A[:, :19]), "must be square"),
        (lambda A: slq(A, probes=0), "probes: must be a positive int"),
        (lambda A: slq(A, iterations=0), "iterations: must be a positive int"),
        (
            lambda A: slq(A, distribution="uniform"),
            "distribution: expected 'rademacher' or 'gaussian'",
        ),
        (
            lambda A: slq(A, start_vectors=torch.ones(3, 19, dtype=F64)),
            "start_vectors: expected a (probes, 20) tensor",
        ),
        (
            lambda A: slq(A, start_vectors=torch.ones(0, 20, dtype=F64)),
            "start_vectors: need at least one probe vector",
        ),
        (lambda A: slq(lambda v: (A @ v)[:-1], n=20, dtype=F64), "expected shape (20,)"),
        (lambda A: slq(A).density(sigma=0.0), "sigma: must be in (0.0"),
        (lambda A: hutchinson(A, probes=0), "probes: must be a positive int"),
        (
            lambda A: hutchinson(A, vectors=torch.ones(0, 20, dtype=F64)),
            "vectors: need at least one probe vector",
        ),
        (
            lambda A: hutchinson(A, vectors=torch.ones(4, 21, dtype=F64)),
            "vectors: expected a (probes, 20) tensor",
        ),
        (lambda A: hutchinson(A, distribution="sphere"), "distribution: expected"),
        (lambda A: hutchinson(lambda v: v[:-1], n=20, dtype=F64), "expected shape (20,)"),
        (
            lambda A: extremes_figure(spectrum_probe(A, k=2), band="iqr"),
            "band: expected 'range' or 'std'",
        ),
        (lambda A: ritz_figure(spectrum_probe(A, k=2), run=1), "run: must be in [0, 1)"),
        (lambda A: trace_figure(hutchinson(A, probes=3), z=0), "z: must be in (0.0"),
        (
            lambda A: curvature_operators(None, "squared_error", [], kind="ggn"),
            "batches: need at least one",
        ),
        (
            lambda A: curvature_operators(None, "squared_error", [], kind="gauss"),
            "kind: expected one of",
        ),
    ],
)
def test_bad_input_is_a_clear_error(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call(symmetric(20, seed=10))


@pytest.mark.parametrize(
    "eigenvalues, axis",
    [
        (
            [1e5, 3.0, 2.0, 1.0],
            "log",
        ),  # a positive spectrum over five decades: the small values would draw as 0
        ([2.0, 1.5, 1.2, 1.0], "linear"),  # within a decade
        ([1e5, 3.0, 2.0, -1.0], "linear"),  # a negative value has no place on a log axis
    ],
)
def test_the_extremes_figure_takes_a_log_axis_when_the_values_span_decades(eigenvalues, axis):
    A = torch.diag(torch.tensor(eigenvalues, dtype=torch.float64))
    probe = spectrum_probe(A, k=2, which="both", seeds=[0])
    assert extremes_figure(probe).layout.yaxis.type == axis
    assert (
        extremes_figure(probe, log_y=False).layout.yaxis.type == "linear"
    )  # the caller's choice stands
