"""qnwb.lanczos against dense float64 references (torch.linalg.eigvalsh / eigh), on random symmetric matrices and on
the GGN and Hessian of small tanh networks whose units are neither linear nor saturated."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from qnwb.curvature import GGN, Hessian
from qnwb.lanczos import (
    lanczos,
    matvec,
    operator_size,
    power_iteration,
    random_unit_vector,
    relative_residuals,
)
from qnwb.models import MLP, TanhRNN

F64 = torch.float64


def symmetric(n=50, seed=0, spectrum=None):
    """Q diag(spectrum) Qᵀ with a random orthogonal Q; default spectrum: indefinite, spread over decades."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    if spectrum is None:
        magnitudes = torch.logspace(-2, 2, n, dtype=F64)
        spectrum = magnitudes * torch.where(torch.arange(n) % 3 == 0, -1.0, 1.0).to(F64)
    return Q @ torch.diag(spectrum) @ Q.T


def tiny_network(kind, seed=0):
    """A float64 TanhRNN or MLP with weights scaled so that its tanh units are neither linear nor saturated."""
    g = torch.Generator().manual_seed(seed)
    model = TanhRNN(3, 4, 2, dtype=F64, generator=g) if kind == "rnn" else MLP([3, 6, 2], dtype=F64)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=F64) * (0.7 if p.dim() == 2 else 0.3))
    x = torch.randn((5, 4, 3) if kind == "rnn" else (8, 3), generator=g, dtype=F64)
    y = torch.randn((5, 4, 2) if kind == "rnn" else (8, 2), generator=g, dtype=F64)
    if kind == "rnn":
        _, hidden = model(x, return_hidden=True)
    else:
        hidden = torch.tanh(model[0](x))
    assert 0.1 < hidden.abs().mean() < 0.9, "units should be neither linear nor saturated"
    return model, (x, y)


def relative_error(estimate, exact):
    return ((estimate - exact).abs() / exact.abs()).max().item()


@pytest.mark.parametrize("which", ["largest", "smallest", "both"])
def test_extreme_eigenvalues_agree_with_eigvalsh(which):
    A = symmetric()
    exact = torch.linalg.eigvalsh(A)
    k = 3
    r = lanczos(A, 50, k=k, which=which, tolerance=1e-10)
    assert r.stop == "converged" and r.products == r.steps < 50
    values = r.ritz()[0]
    if which in ("largest", "both"):
        assert relative_error(values[-k:], exact[-k:]) < 1e-8
    if which in ("smallest", "both"):
        assert relative_error(values[:k], exact[:k]) < 1e-8


def test_run_to_the_dimension_finds_every_eigenvalue():
    A = symmetric(40, seed=3)
    r = lanczos(A, 40)
    assert r.steps == 40
    torch.testing.assert_close(r.ritz()[0], torch.linalg.eigvalsh(A), rtol=0, atol=1e-10 * 100)


@pytest.mark.parametrize("kind", ["rnn", "mlp"])
def test_top_and_bottom_of_a_real_hessian_and_ggn(kind):
    model, batch = tiny_network(kind)
    hessian = Hessian(model, "squared_error", batch)
    exact = torch.linalg.eigvalsh(hessian.dense())
    assert exact[0] < 0 < exact[-1], "the Hessian of a tanh network here is indefinite"
    r = lanczos(hessian, hessian.n, k=2, which="both", tolerance=1e-11)
    values = r.ritz()[0]
    assert (
        relative_error(values[-2:], exact[-2:]) < 1e-8
        and relative_error(values[:2], exact[:2]) < 1e-8
    )

    ggn = GGN(model, "squared_error", batch)
    G = ggn.dense()
    exact = torch.linalg.eigvalsh(G)
    assert exact[0] > -1e-10 * exact[-1], "the GGN is positive semi-definite"
    r = lanczos(ggn, ggn.n, k=3, tolerance=1e-11)
    assert r.stop in ("converged", "invariant")
    assert relative_error(r.ritz()[0][-3:], exact[-3:]) < 1e-8
    # run to exhaustion: the GGN of 2 outputs × few cases has low rank, so the Krylov space closes early
    full = lanczos(ggn, ggn.n)
    rank = int((exact > 1e-10 * exact[-1]).sum())
    assert full.stop == "invariant" and full.steps <= rank + 1
    nonzero = full.ritz()[0][full.ritz()[0] > 1e-8 * exact[-1]]
    torch.testing.assert_close(nonzero, exact[-nonzero.numel() :], rtol=1e-8, atol=0)


def test_ritz_residual_formula_is_the_true_residual():
    A = symmetric(60, seed=1)
    r = lanczos(A, 25)
    values, residuals, Y = r.ritz(vectors=True)
    torch.testing.assert_close(
        torch.linalg.vector_norm(A @ Y - Y * values, dim=0), residuals, rtol=0, atol=1e-10
    )
    # and the history: at iteration j the residuals are those of the leading j Lanczos vectors
    for j in (1, 5, 12):
        V = r.basis[:j]
        hist_values, hist_residuals = r.history[j - 1]
        theta, S = torch.linalg.eigh(V @ A @ V.T)
        Yj = V.T @ S
        torch.testing.assert_close(hist_values, theta, rtol=0, atol=1e-10)
        torch.testing.assert_close(
            hist_residuals, torch.linalg.vector_norm(A @ Yj - Yj * theta, dim=0), rtol=0, atol=1e-9
        )


def test_basis_is_orthonormal_and_tridiagonalises():
    A = symmetric(80, seed=2)
    r = lanczos(A, 60)
    V = r.basis
    torch.testing.assert_close(V @ V.T, torch.eye(60, dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(V @ A @ V.T, r.tridiagonal(), rtol=0, atol=1e-10)
    assert len(r.history) == r.steps and all(
        values.numel() == j + 1 for j, (values, _) in enumerate(r.history)
    )


@pytest.mark.parametrize("distinct, expected", [([1.0, 2.0, 5.0], 3), ([-4.0, 0.5], 2), ([3.0], 1)])
def test_invariant_subspace_stops_with_exact_eigenvalues(distinct, expected):
    spectrum = torch.tensor(distinct * (30 // len(distinct)), dtype=F64)
    A = symmetric(spectrum.numel(), seed=4, spectrum=spectrum)
    r = lanczos(A, 20)
    assert (r.stop, r.steps) == ("invariant", expected)
    assert (
        r.products == 20
    )  # without a tolerance the loop reads nothing from the device: it finds the breakdown afterwards
    assert r.beta_last == 0
    torch.testing.assert_close(
        r.ritz()[0], torch.tensor(sorted(distinct), dtype=F64), rtol=0, atol=1e-10
    )


def test_start_vector_in_an_eigenspace_stops_at_its_dimension():
    spectrum = torch.linspace(1, 10, 30, dtype=F64)
    A = symmetric(30, seed=5, spectrum=spectrum)
    _, U = torch.linalg.eigh(A)
    r = lanczos(A, 20, start=U[:, 3] + 2 * U[:, 17])
    assert (r.stop, r.steps, r.start_seed) == ("invariant", 2, None)
    torch.testing.assert_close(r.ritz()[0], spectrum[[3, 17]], rtol=0, atol=1e-12)


def test_tolerance_needs_k_ritz_values_even_from_a_start_near_an_eigenvector():
    spectrum = torch.linspace(1, 10, 40, dtype=F64)
    A = symmetric(40, seed=6, spectrum=spectrum)
    _, U = torch.linalg.eigh(A)
    near = U[:, -1] + 1e-6 * torch.randn(40, generator=torch.Generator().manual_seed(0), dtype=F64)
    for which, k in (("largest", 3), ("both", 2)):
        r = lanczos(A, 40, start=near, k=k, which=which, tolerance=1e-4)
        assert r.stop == "converged" and r.steps >= (2 * k if which == "both" else k)
        values, residuals = r.ritz()
        assert (residuals[-k:] <= 1e-4 * values[-k:].abs()).all()


def test_invariant_subspace_smaller_than_k_stops_at_once_with_a_tolerance():
    A = symmetric(30, seed=4, spectrum=torch.tensor([1.0, 2.0, 5.0] * 10, dtype=F64))
    r = lanczos(A, 25, k=5, tolerance=1e-8)
    assert (r.stop, r.products) == ("invariant", 3)


def test_check_every_only_delays_the_stop():
    A = symmetric(60, seed=7)
    every = lanczos(A, 60, k=2, tolerance=1e-8)
    sparse = lanczos(A, 60, k=2, tolerance=1e-8, check_every=5)
    assert sparse.steps % 5 == 0 and every.steps <= sparse.steps < every.steps + 5
    torch.testing.assert_close(sparse.alpha[: every.steps], every.alpha)


def test_seeded_start_is_reproducible_and_recorded():
    A = symmetric(30, seed=8)
    a, b, c = lanczos(A, 10, seed=3), lanczos(A, 10, seed=3), lanczos(A, 10, seed=4)
    assert a.start_seed == 3 and torch.equal(a.alpha, b.alpha) and not torch.equal(a.alpha, c.alpha)
    torch.testing.assert_close(a.basis[0], random_unit_vector(30, seed=3, dtype=F64))


def test_quadrature_reproduces_the_moments_of_the_start_vector():
    """Gauss quadrature with m nodes is exact for degree ≤ 2m − 1: Σ w θ^p = vᵀ A^p v."""
    A = symmetric(50, seed=9) / 100
    v = random_unit_vector(50, seed=1, dtype=F64)
    m = 6
    nodes, weights = lanczos(A, m, start=v).quadrature()
    assert nodes.numel() == m
    torch.testing.assert_close(weights.sum(), torch.tensor(1.0, dtype=F64), rtol=0, atol=1e-13)
    power = v.clone()
    for p in range(2 * m):
        torch.testing.assert_close((weights * nodes**p).sum(), v @ power, rtol=1e-9, atol=1e-13)
        power = A @ power
    assert (
        abs(float((weights * nodes ** (2 * m)).sum() - v @ power)) > 1e-9
    )  # degree 2m is not exact


def test_function_operator_and_float32_operator_in_a_float64_basis():
    A = symmetric(30, seed=10)
    exact = torch.linalg.eigvalsh(A)
    r = lanczos(
        lambda v: A @ v, 30, n=30, dtype=F64
    )  # a function has no dtype: the default one unless told
    torch.testing.assert_close(r.ritz()[0], exact, rtol=0, atol=1e-9)

    class Float32Operator:
        n, dtype, device = 30, torch.float32, torch.device("cpu")

        def mv(self, v):
            assert v.dtype == torch.float32
            return A.float() @ v

    r = lanczos(Float32Operator(), 30, k=2, tolerance=1e-4, dtype=F64)
    assert r.alpha.dtype == F64
    assert relative_error(r.ritz()[0][-2:], exact[-2:]) < 1e-5


def test_power_iteration_converges_to_the_top_eigenvalues():
    spectrum = torch.cat(
        [torch.tensor([10.0, 8.0, 6.0], dtype=F64), torch.linspace(0.1, 3.0, 37, dtype=F64)]
    )
    A = symmetric(40, seed=11, spectrum=spectrum)
    p = power_iteration(A, 500, k=3, tolerance=1e-10)
    assert p.stop == "converged" and p.products == 3 * len(p.history)
    torch.testing.assert_close(
        p.values, torch.tensor([6.0, 8.0, 10.0], dtype=F64), rtol=1e-9, atol=0
    )
    torch.testing.assert_close(
        torch.linalg.vector_norm(A @ p.vectors - p.vectors * p.values, dim=0),
        p.residuals,
        rtol=0,
        atol=1e-12,
    )
    assert (p.residuals <= 1e-10 * p.values.abs()).all()
    # the rate is (λ_{k+1}/λ_k) per iteration: with a gap 6 → 3 the error falls about 2× (4× for the values) per step
    errors = [
        (values - torch.tensor([6.0, 8.0, 10.0], dtype=F64)).abs().max().item()
        for values, _ in p.history[:8]
    ]
    assert errors[-1] < errors[0] / 100
    # Lanczos needs fewer products for the same residual
    assert lanczos(A, 40, k=3, tolerance=1e-10).products < p.products


def test_power_iteration_without_tolerance_runs_every_iteration():
    A = symmetric(20, seed=12)
    p = power_iteration(A, 7, k=2)
    assert (p.stop, p.products, len(p.history)) == ("iterations", 14, 7)


@given(n=st.integers(1, 25), seed=st.integers(0, 2**16))
def test_full_lanczos_equals_eigvalsh_on_random_symmetric_matrices(n, seed):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(n, n, generator=g, dtype=F64)
    A = (M + M.T) / 2
    r = lanczos(A, n, seed=seed)
    exact = torch.linalg.eigvalsh(A)
    scale = exact.abs().max().clamp_min(1e-300)
    if (
        r.stop == "invariant"
    ):  # a start vector orthogonal to some eigenvectors: only the ones it sees
        values = r.ritz()[0]
        assert all(((exact - v).abs().min() <= 1e-9 * scale) for v in values)
    else:
        torch.testing.assert_close(r.ritz()[0], exact, rtol=0, atol=1e-9 * float(scale))


def test_lanczos_on_the_device(device):
    A = symmetric(30, seed=13).to(device)
    r = lanczos(A, 30, k=2, tolerance=1e-10)
    assert r.alpha.device.type == device.type and r.basis.device.type == device.type
    exact = torch.linalg.eigvalsh(A.cpu())
    assert relative_error(r.ritz()[0][-2:].cpu(), exact[-2:]) < 1e-8
    p = power_iteration(A, 300, k=1, tolerance=1e-8)
    assert p.values.device.type == device.type


@pytest.mark.parametrize(
    "call, error, message",
    [
        (
            lambda A: lanczos(A, 5, k=11, tolerance=1e-3),
            ValueError,
            "k: 11 eigenvalues exceed the dimension 10",
        ),
        (
            lambda A: lanczos(A, 5, k=6, which="both", tolerance=1e-3),
            ValueError,
            "at each end exceed the dimension 10",
        ),
        (lambda A: lanczos(A, 5, which="middle"), ValueError, "which: expected one of"),
        (
            lambda A: lanczos(A, 5, tolerance=1.5),
            ValueError,
            "tolerance: must be None or in (0, 1)",
        ),
        (lambda A: lanczos(A, 0), ValueError, "iterations"),
        (lambda A: lanczos(A, 5, k=0), ValueError, "k"),
        (lambda A: lanczos(A, 5, check_every=0), ValueError, "check_every"),
        (lambda A: lanczos(A, 5, n=12), ValueError, "n: the operator has dimension 10, not 12"),
        (
            lambda A: lanczos(A, 5, start=torch.ones(9, dtype=F64)),
            ValueError,
            "start: has 9 entries, the operator has dimension 10",
        ),
        (
            lambda A: lanczos(A, 5, start=torch.zeros(10, dtype=F64)),
            ValueError,
            "start: must be finite and non-zero",
        ),
        (
            lambda A: lanczos(A, 5, start=[1.0] * 10),
            TypeError,
            "start: expected a 1-D floating-point tensor",
        ),
        (lambda A: lanczos(lambda v: A @ v, 5), ValueError, "n: give the dimension"),
        (lambda A: lanczos(lambda v: v[:-1], 5, n=10), ValueError, "expected shape (10,)"),
        (lambda A: lanczos(A[:, :9], 5, n=10), ValueError, "must be square"),
        (lambda A: lanczos("A", 5, n=10), TypeError, "A: expected an object with .mv"),
        (
            lambda A: power_iteration(A, 5, k=11),
            ValueError,
            "k: 11 eigenvalues exceed the dimension 10",
        ),
        (lambda A: power_iteration(A, 0), ValueError, "iterations"),
        (lambda A: power_iteration(A, 5, tolerance=0), ValueError, "tolerance"),
        (
            lambda A: random_unit_vector(5, kind="uniform"),
            ValueError,
            "kind: expected 'gaussian' or 'rademacher'",
        ),
    ],
)
def test_bad_input_is_a_clear_error(call, error, message):
    with pytest.raises(error, match=pytest.importorskip("re").escape(message)):
        call(symmetric(10))


def test_operator_helpers():
    assert operator_size(torch.eye(4)) == 4 and operator_size(lambda v: v, 7) == 7
    v = torch.arange(3.0, dtype=F64)
    assert torch.equal(matvec(2 * torch.eye(3, dtype=F64))(v), 2 * v)
    r = random_unit_vector(16, seed=0, kind="rademacher", dtype=F64)
    torch.testing.assert_close(r.abs(), torch.full((16,), 0.25, dtype=F64))


def test_float32_ill_conditioned_operator_is_not_cut_short_as_invariant():
    # A GGN-like float32 spectrum: a few large eigenvalues over a cluster 1e4 times smaller. β of order 1e-4 ‖A‖ is real
    # progress into the cluster, not rounding (float32's eps is 1.2e-7): Lanczos must go on and find the cluster's ends.
    values = torch.cat([torch.tensor([1e4, 1e3, 1e2]), torch.linspace(1.0, 3.0, 200)]).to(
        torch.float32
    )
    result = lanczos(torch.diag(values), 40, seed=3)
    assert result.stop == "iterations" and result.steps == 40
    ritz = result.ritz()[0].double()
    assert abs(float(ritz[0]) - 1.0) < 0.05 and abs(float(ritz[-1]) - 1e4) < 1e4 * 1e-5


def test_zero_eigenvalues_of_a_singular_operator_converge_under_a_tolerance():
    # a GGN-like singular matrix: its zero Ritz values' residuals are rounding (eps·‖A‖); measured against |θ| ≈ 0 they never
    # pass a tolerance, so relative residuals floor |θ| at √eps·‖A‖
    g = torch.Generator().manual_seed(2)
    B = torch.randn(60, 8, generator=g, dtype=torch.float64)
    A = B @ B.T  # rank 8
    result = lanczos(A, 60, k=2, which="smallest", tolerance=1e-6)
    assert result.stop in ("converged", "invariant") and result.steps < 60
    assert (
        abs(float(result.ritz()[0][0])) < 1e-10
    )  # the null space shows as one Ritz value at 0 (Krylov sees one direction of it)


def test_relative_residuals_floor_small_values_at_the_working_precision():
    values = torch.tensor([1e-18, 0.5, 2.0], dtype=torch.float64)
    residuals = torch.tensor([1e-15, 1e-3, 1e-3], dtype=torch.float64)
    relative = relative_residuals(values, residuals)
    torch.testing.assert_close(
        relative, torch.tensor([1e-15 / (2.0 * 2**-26), 2e-3, 5e-4], dtype=torch.float64)
    )
