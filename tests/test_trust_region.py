"""qnwb.trust_region: the compact (OBS) L-SR1 trust-region solver against N&W Theorem 4.1 and the dense reference, in float64."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from roundoff import floor

from qnwb.trust_region import TrustRegionStep, dense_trust_region, solve_trust_region_compact

F64 = torch.float64


def instance(n, k, gamma, seed, *, kind="indefinite", rank=None, device="cpu"):
    """A random compact matrix B = γI + ΨMΨᵀ (returned explicitly too) and a gradient.

    kind: "indefinite" (M symmetric with both signs) or "definite" (M ≻ 0); rank < k makes Ψ rank-deficient."""
    gen = torch.Generator().manual_seed(seed)
    Psi = torch.randn(n, k, generator=gen, dtype=F64)
    if rank is not None and rank < k:
        Psi = Psi[:, :rank] @ torch.randn(
            rank, k, generator=gen, dtype=F64
        )  # every column a combination of `rank` vectors
    A = torch.randn(k, k, generator=gen, dtype=F64)
    M = A @ A.T + 0.1 * torch.eye(k, dtype=F64) if kind == "definite" else 0.5 * (A + A.T)
    g = torch.randn(n, generator=gen, dtype=F64)
    B = gamma * torch.eye(n, dtype=F64) + Psi @ M @ Psi.T
    return g.to(device), Psi.to(device), M.to(device), B.to(device)


def q_of(B, g, p):
    return (g @ p + 0.5 * p @ (B @ p)).item()


def assert_kkt(B, g, radius, step, tol=1e-9):
    """N&W Theorem 4.1 at step.p: ‖p‖ ≤ Δ, (B + σI)p = −g, σ ≥ 0, σ(Δ − ‖p‖) = 0, B + σI ⪰ 0; and the reported numbers."""
    B, g, p = B.cpu(), g.cpu(), step.p.cpu()
    n = g.numel()
    scale = torch.linalg.matrix_norm(B, 2).item() + step.sigma + 1.0
    norm = p.norm().item()
    assert step.sigma >= 0
    assert norm <= radius * (1 + 1e-10)
    residual = ((B + step.sigma * torch.eye(n, dtype=F64)) @ p + g).norm().item()
    assert residual <= tol * (scale * max(norm, 1.0) + g.norm().item()), residual
    assert step.sigma * abs(radius - norm) <= tol * scale * radius
    assert (
        torch.linalg.eigvalsh(B + step.sigma * torch.eye(n, dtype=F64)).min().item() >= -tol * scale
    )
    if step.on_boundary:
        assert abs(norm - radius) <= 1e-10 * radius
    else:
        assert step.sigma == 0.0 and not step.hard_case
    assert abs(step.step_norm - norm) <= 1e-10 * max(radius, 1.0)
    q = q_of(B, g, p)
    assert abs(step.value - q) <= tol * (abs(q) + scale * radius**2 + 1.0), (step.value, q)


def assert_same_solution(step, reference, B, tol=1e-8):
    """The compact and dense steps agree (the solution is unique outside the hard case)."""
    size = max(reference.p.norm().item(), 1.0)
    assert (step.p.cpu() - reference.p.cpu()).norm().item() <= tol * size
    assert abs(step.value - reference.value) <= tol * (abs(reference.value) + 1.0)
    assert abs(step.sigma - reference.sigma) <= tol * (
        abs(reference.sigma) + torch.linalg.matrix_norm(B.cpu(), 2).item()
    )
    assert (step.on_boundary, step.hard_case) == (reference.on_boundary, reference.hard_case)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6])
@pytest.mark.parametrize("n", [8, 50])
@pytest.mark.parametrize(
    "gamma, kind",
    [
        (1.0, "definite"),
        (1.0, "indefinite"),
        (0.0, "indefinite"),
        (-0.5, "indefinite"),
        (-2.0, "definite"),
    ],
)
@pytest.mark.parametrize("radius", [0.05, 1.0, 1e3])
def test_kkt_and_agreement_with_the_dense_solver(n, k, gamma, kind, radius):
    g, Psi, M, B = instance(n, k, gamma, seed=1000 * n + 10 * k + int(10 * gamma) % 7, kind=kind)
    step = solve_trust_region_compact(g, gamma, Psi, M, radius)
    reference = dense_trust_region(g, B, radius)
    assert isinstance(step, TrustRegionStep) and step.converged and step.iterations <= 30
    assert_kkt(B, g, radius, step)
    assert_kkt(B, g, radius, reference)
    assert_same_solution(step, reference, B)
    assert step.rank == k
    spectrum = torch.cat([step.eigenvalues, torch.full((n - k,), gamma, dtype=F64)]).sort().values
    torch.testing.assert_close(spectrum, torch.linalg.eigvalsh(B), rtol=1e-10, atol=1e-10)
    assert abs(step.lambda_min - reference.lambda_min) <= 1e-10 * (1 + abs(reference.lambda_min))


def test_positive_definite_model_with_a_large_radius_takes_the_newton_step():
    g, Psi, M, B = instance(30, 4, 0.5, seed=1, kind="definite")
    step = solve_trust_region_compact(g, 0.5, Psi, M, 1e6)
    torch.testing.assert_close(step.p, -torch.linalg.solve(B, g), rtol=1e-10, atol=1e-12)
    assert (step.sigma, step.on_boundary, step.hard_case, step.iterations) == (0.0, False, False, 0)
    assert step.lambda_min > 0


def test_positive_definite_model_with_a_small_radius_stops_on_the_boundary():
    g, Psi, M, B = instance(30, 4, 0.5, seed=2, kind="definite")
    newton = torch.linalg.solve(B, g).norm().item()
    step = solve_trust_region_compact(g, 0.5, Psi, M, 0.5 * newton)
    assert step.on_boundary and step.sigma > 0 and not step.hard_case
    assert_kkt(B, g, 0.5 * newton, step)


@pytest.mark.parametrize("newton_norm", [0.01, 0.3, 3.0, 100.0])
def test_the_switch_from_interior_to_boundary_is_at_newton_step_length_equal_to_the_radius(
    newton_norm,
):
    g, Psi, M, B = instance(15, 3, 0.4, seed=3, kind="definite")
    g = g * newton_norm / torch.linalg.solve(B, g).norm()  # now ‖B⁻¹g‖ = newton_norm
    inside = solve_trust_region_compact(g, 0.4, Psi, M, newton_norm * (1 + 1e-6))
    outside = solve_trust_region_compact(g, 0.4, Psi, M, newton_norm * (1 - 1e-6))
    assert not inside.on_boundary and inside.sigma == 0.0
    assert outside.on_boundary and 0 < outside.sigma < 1e-4
    assert_kkt(B, g, newton_norm * (1 + 1e-6), inside)
    assert_kkt(B, g, newton_norm * (1 - 1e-6), outside)


def bottom_eigenvector(B):
    w, V = torch.linalg.eigh(B)
    assert w[1] - w[0] > 1e-3  # a simple eigenvalue: its eigenvector is unique up to sign
    return w[0].item(), V[:, 0]


@pytest.mark.parametrize("n, k, gamma", [(10, 1, 1.0), (20, 3, 0.5), (50, 6, 2.0), (12, 5, 0.0)])
def test_hard_case_in_the_range_of_psi(n, k, gamma):
    """g ⟂ the bottom eigenvector, which lies in range Ψ (γ above it); the radius is large enough for the hard case."""
    g, Psi, M, B = instance(n, k, gamma, seed=n + k, kind="indefinite")
    M = M - (torch.linalg.eigvalsh(M)[0] + 1.0) * torch.eye(
        k, dtype=F64
    )  # λ̂_min(M) = −1: negative curvature inside range Ψ
    B = gamma * torch.eye(n, dtype=F64) + Psi @ M @ Psi.T
    lam_min, z = bottom_eigenvector(B)
    assert lam_min < min(gamma, 0.0)  # the bottom eigenvalue is one of range Ψ's
    g = g - (z @ g) * z
    w, V = torch.linalg.eigh(B)
    p_bottom = -(V[:, 1:] @ ((V[:, 1:].T @ g) / (w[1:] - lam_min)))  # p(−λ_min)
    radius = 2.0 * p_bottom.norm().item() + 1.0
    step = solve_trust_region_compact(g, gamma, Psi, M, radius)
    reference = dense_trust_region(g, B, radius)
    assert step.hard_case and reference.hard_case and step.on_boundary
    assert abs(step.sigma + lam_min) <= 1e-10 * (1 + abs(lam_min))
    assert_kkt(B, g, radius, step)
    assert_kkt(B, g, radius, reference)
    # unique up to the sign of τ: the part orthogonal to z is p(−λ_min), the part along z has length τ
    p = step.p
    torch.testing.assert_close(p - (z @ p) * z, p_bottom, rtol=1e-9, atol=1e-9 * radius)
    tau = math.sqrt(radius**2 - p_bottom.norm().item() ** 2)
    assert abs(abs((z @ p).item()) - tau) <= 1e-9 * radius
    assert abs(step.value - reference.value) <= 1e-9 * abs(reference.value)


@pytest.mark.parametrize(
    "n, k, rank", [(10, 2, None), (30, 5, None), (50, 6, None), (20, 4, 2), (5, 6, 4)]
)
def test_hard_case_on_the_complement_of_range_psi(n, k, rank):
    """γ < 0 is the smallest eigenvalue (M ≻ 0 and Ψ's range has eigenvalues above γ) and g ∈ range Ψ.

    With full-rank Ψ and k < n, z comes from (I − QQᵀ)eⱼ; with rank-deficient Ψ from a dropped direction of Q."""
    gamma = -0.75
    g, Psi, M, B = instance(n, k, gamma, seed=7 * n + k, kind="definite", rank=rank)
    coefficients = torch.randn(k, generator=torch.Generator().manual_seed(3), dtype=F64)
    g = Psi @ coefficients
    lam_min = torch.linalg.eigvalsh(B)[0].item()
    assert abs(lam_min - gamma) <= 1e-10
    projector = Psi @ torch.linalg.pinv(Psi, rtol=1e-10)  # onto range Ψ
    p_range = (
        -torch.linalg.pinv(Psi @ M @ Psi.T, rtol=1e-10, hermitian=True) @ g
    )  # p(−γ) = −(B − γI)⁺g, inside range Ψ
    radius = 3.0 * p_range.norm().item() + 0.5
    step = solve_trust_region_compact(g, gamma, Psi, M, radius)
    reference = dense_trust_region(g, B, radius)
    assert step.hard_case and reference.hard_case and step.rank == (rank or k)
    assert step.sigma == pytest.approx(-gamma, abs=1e-12)
    assert_kkt(B, g, radius, step)
    assert_kkt(B, g, radius, reference)
    # the range-Ψ part is unique; the rest is a vector of length τ in the complement (not unique when n − rank > 1)
    torch.testing.assert_close(projector @ step.p, p_range, rtol=1e-8, atol=1e-8 * radius)
    outside = step.p - projector @ step.p
    assert (
        abs(outside.norm().item() - math.sqrt(radius**2 - p_range.norm().item() ** 2))
        <= 1e-8 * radius
    )
    assert abs(step.value - reference.value) <= 1e-9 * (abs(reference.value) + 1)


def test_orthogonal_gradient_with_a_small_radius_is_not_the_hard_case():
    """g ⟂ the bottom eigenvector but ‖p(−λ_min)‖ > Δ: the secular equation still has a root right of −λ_min."""
    g, Psi, M, B = instance(25, 4, 1.0, seed=11)
    lam_min, z = bottom_eigenvector(B)
    g = g - (z @ g) * z
    step = solve_trust_region_compact(g, 1.0, Psi, M, 1e-3)
    reference = dense_trust_region(g, B, 1e-3)
    assert not step.hard_case and step.on_boundary and step.sigma > -lam_min
    assert_kkt(B, g, 1e-3, step)
    assert_same_solution(step, reference, B)


@pytest.mark.parametrize("component", [1e-6, 1e-9, 1e-12])
def test_nearly_hard_case_keeps_its_accuracy(component):
    """A tiny component of g along the bottom eigenvector: σ is within ~component of −λ_min, and the KKT residual stays at round-off."""
    g, Psi, M, B = instance(30, 5, 0.5, seed=13)
    lam_min, z = bottom_eigenvector(B)
    g = g - (z @ g) * z + component * z
    radius = 1e3
    step = solve_trust_region_compact(g, 0.5, Psi, M, radius)
    reference = dense_trust_region(g, B, radius)
    assert not step.hard_case and step.converged
    # δ* = σ* + λ_min = component/τ with τ = √(Δ² − ‖p(−λ_min)‖²) ≈ Δ, plus round-off: σ ≈ 32 is held to an ulp of its own
    # size and λ_min comes from eigh, each a few ε‖B‖ off (6e-14 on some CPUs); the floor is 100 ε‖B‖ ≈ 2e-12, below
    # the δ* of the larger components but far above the 1e-15 of 1e-12, which then checks σ = −λ_min to round-off
    scale = torch.linalg.matrix_norm(B, 2).item()
    assert (
        step.sigma + step.lambda_min >= 0
    )  # right of the pole in the solver's own numbers (δ ≥ 0 by construction)
    assert -floor(scale) <= step.sigma + lam_min <= 10 * component / radius + floor(scale)
    assert_kkt(B, g, radius, step, tol=1e-10)
    assert_same_solution(step, reference, B, tol=1e-7)


def test_gamma_zero_with_a_gradient_outside_the_range_starts_newton_at_the_pole():
    """B = ΨMΨᵀ ⪰ 0 is singular (γ = 0 on the complement) and g has a part there: ‖p‖ = ∞ at σ = 0, OBS's first step."""
    g, Psi, M, B = instance(20, 3, 0.0, seed=17, kind="definite")
    step = solve_trust_region_compact(g, 0.0, Psi, M, 0.5)
    assert step.lambda_min == 0.0 and step.sigma > 0 and step.iterations >= 1 and not step.hard_case
    assert_kkt(B, g, 0.5, step)
    assert_same_solution(step, dense_trust_region(g, B, 0.5), B)


@pytest.mark.parametrize("n, k, rank", [(15, 4, 2), (15, 6, 1), (40, 5, 3), (4, 6, 3), (6, 6, 6)])
@pytest.mark.parametrize("gamma", [0.8, -0.3])
def test_rank_deficient_psi(n, k, rank, gamma):
    g, Psi, M, B = instance(n, k, gamma, seed=19 + n + k + rank, rank=rank)
    for radius in (0.1, 10.0):
        step = solve_trust_region_compact(g, gamma, Psi, M, radius)
        assert step.rank == rank and step.eigenvalues.shape == (rank,)
        assert_kkt(B, g, radius, step)
        assert_same_solution(step, dense_trust_region(g, B, radius), B)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_gradient_inside_range_psi_with_a_small_gamma_gives_a_consistent_step(seed):
    """κ(B) ≈ 10⁸ and g ∈ range Ψ: the round-off part of g outside range Ψ is scaled by 1/γ; it must not leak back into range Ψ
    (the assembled p has the norm and value the eigen-coordinates say, and is backward stable)."""
    g, Psi, M, B = instance(75, 7, 0.1, seed=seed, kind="definite", rank=3)
    M = 1e3 * M
    g = 1e6 * Psi @ torch.randn(7, generator=torch.Generator().manual_seed(seed), dtype=F64)
    B = 0.1 * torch.eye(75, dtype=F64) + Psi @ M @ Psi.T
    step = solve_trust_region_compact(g, 0.1, Psi, M, 1e4)
    assert not step.on_boundary and step.rank == 3
    assert abs(step.p.norm().item() - step.step_norm) <= 1e-13 * step.step_norm
    assert_kkt(B, g, 1e4, step)


def test_duplicate_and_zero_columns_and_an_all_zero_psi():
    g, Psi, M, B = instance(12, 4, 1.5, seed=23)
    Psi = Psi.clone()
    Psi[:, 2], Psi[:, 3] = Psi[:, 0], 0.0
    B = 1.5 * torch.eye(12, dtype=F64) + Psi @ M @ Psi.T
    step = solve_trust_region_compact(g, 1.5, Psi, M, 0.3)
    assert step.rank == 2
    assert_same_solution(step, dense_trust_region(g, B, 0.3), B)
    nothing = solve_trust_region_compact(g, 1.5, torch.zeros(12, 3, dtype=F64), M[:3, :3], 100.0)
    assert nothing.rank == 0 and not nothing.on_boundary
    torch.testing.assert_close(nothing.p, -g / 1.5)


def test_an_empty_memory_is_a_scaled_identity():
    """k = 0 (no pairs yet): B = γI; with γ < 0 every direction is negative curvature, p = −Δ g/‖g‖."""
    g = torch.randn(9, generator=torch.Generator().manual_seed(29), dtype=F64)
    empty, none = torch.zeros(9, 0, dtype=F64), torch.zeros(0, 0, dtype=F64)
    step = solve_trust_region_compact(g, -1.0, empty, none, 2.0)
    torch.testing.assert_close(step.p, -2.0 * g / g.norm())
    assert step.on_boundary and not step.hard_case and step.rank == 0
    assert (
        step.iterations == 1 and step.converged
    )  # one term: OBS's first step from the pole, δ = ‖g‖/Δ, is the root
    assert_kkt(-torch.eye(9, dtype=F64), g, 2.0, step)
    zero_gradient = solve_trust_region_compact(torch.zeros(9, dtype=F64), -1.0, empty, none, 2.0)
    assert (
        zero_gradient.hard_case
        and abs(zero_gradient.p.norm().item() - 2.0) < 1e-12
        and zero_gradient.value == pytest.approx(-2.0)
    )


def test_float32_inputs_give_a_float32_step_close_to_float64():
    g, Psi, M, B = instance(40, 5, 0.3, seed=31)
    exact = solve_trust_region_compact(g, 0.3, Psi, M, 0.7)
    single = solve_trust_region_compact(
        g.float(), torch.tensor(0.3), Psi.float(), M.float(), torch.tensor(0.7)
    )
    assert single.p.dtype == torch.float32
    assert (single.p.double() - exact.p).norm() <= 1e-4 * exact.p.norm()
    assert abs(single.value - exact.value) <= 1e-4 * abs(exact.value)


def test_the_device_of_the_step_is_the_device_of_g(device):
    g, Psi, M, B = instance(30, 4, -0.2, seed=37, device=device)
    step = solve_trust_region_compact(g, -0.2, Psi, M, 0.4)
    assert step.p.device.type == device.type and step.eigenvalues.device.type == "cpu"
    assert_kkt(B, g, 0.4, step)
    assert_same_solution(step, dense_trust_region(g, B, 0.4), B)


@given(
    n=st.integers(2, 30),
    k=st.integers(1, 6),
    gamma=st.floats(-2.0, 2.0),
    log_radius=st.floats(-2.0, 2.0),
    seed=st.integers(0, 2**31 - 1),
    rank_drop=st.integers(0, 2),
)
def test_global_optimality_against_random_feasible_points(n, k, gamma, log_radius, seed, rank_drop):
    radius = 10.0**log_radius
    g, Psi, M, B = instance(n, k, gamma, seed=seed, rank=max(k - rank_drop, 1))
    step = solve_trust_region_compact(g, gamma, Psi, M, radius)
    assert_kkt(B, g, radius, step, tol=1e-8)
    reference = dense_trust_region(g, B, radius)
    assert abs(step.value - reference.value) <= 1e-8 * (abs(reference.value) + 1.0)
    gen = torch.Generator().manual_seed(seed + 1)
    directions = torch.randn(64, n, generator=gen, dtype=F64)
    lengths = radius * torch.rand(64, 1, generator=gen, dtype=F64) ** (1.0 / n)
    points = directions / directions.norm(dim=1, keepdim=True) * lengths
    points[:16] = (
        directions[:16] / directions[:16].norm(dim=1, keepdim=True) * radius
    )  # on the boundary
    points = torch.cat(
        [points, -points[:1], step.p[None] * (1 - 1e-3), torch.linalg.eigh(B)[1][:, :1].T * radius]
    )
    values = points @ g + 0.5 * ((points @ B) * points).sum(1)
    assert step.value <= values.min().item() + 1e-9 * (abs(step.value) + 1.0)


@pytest.mark.parametrize(
    "change, error, words",
    [
        (dict(radius=0.0), ValueError, "radius: must be a positive number"),
        (dict(radius=-1.0), ValueError, "radius: must be a positive number"),
        (dict(radius=float("inf")), ValueError, "radius: must be finite"),
        (dict(radius=True), TypeError, "radius: expected a real number"),
        (dict(radius=torch.ones(2)), TypeError, "radius: expected a real number or a 0-d"),
        (dict(gamma=float("nan")), ValueError, "gamma: must be finite"),
        (dict(gamma="1"), TypeError, "gamma: expected a real number"),
        (dict(g=torch.ones(6, 2, dtype=F64)), ValueError, "g: expected a non-empty 1-D"),
        (dict(g=torch.ones(6, dtype=torch.int64)), TypeError, "g: expected a 1-D floating-point"),
        (dict(g=[1.0] * 6), TypeError, "g: expected"),
        (
            dict(g=torch.tensor([1.0, float("nan"), 0, 0, 0, 0], dtype=F64)),
            ValueError,
            "g: has non-finite",
        ),
        (
            dict(Psi=torch.ones(5, 2, dtype=F64)),
            ValueError,
            r"Psi: expected shape \(n, k\) = \(6, k\)",
        ),
        (dict(Psi=torch.ones(6, 2, dtype=torch.float32)), TypeError, "Psi: is torch.float32"),
        (dict(Psi=torch.full((6, 2), float("inf"), dtype=F64)), ValueError, "Psi: has non-finite"),
        (dict(M=torch.ones(3, 3, dtype=F64)), ValueError, r"M: expected shape \(2, 2\)"),
        (
            dict(M=torch.tensor([[1.0, 1.0], [0.0, 1.0]], dtype=F64)),
            ValueError,
            "M: must be symmetric",
        ),
        (
            dict(M=torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]], dtype=F64)),
            ValueError,
            "M: has non-finite",
        ),
        (dict(M=[[1.0, 0.0], [0.0, 1.0]]), TypeError, "M: expected a floating-point"),
        (dict(max_iterations=0), ValueError, "max_iterations"),
        (dict(rank_tolerance=-0.1), ValueError, "rank_tolerance"),
    ],
)
def test_bad_arguments_get_clear_errors(change, error, words):
    arguments = dict(
        g=torch.ones(6, dtype=F64),
        gamma=1.0,
        Psi=torch.eye(6, 2, dtype=F64),
        M=torch.eye(2, dtype=F64),
        radius=1.0,
    )
    arguments.update(change)
    options = {
        key: arguments.pop(key) for key in ("max_iterations", "rank_tolerance") if key in arguments
    }
    with pytest.raises(error, match=words):
        solve_trust_region_compact(
            arguments["g"],
            arguments["gamma"],
            arguments["Psi"],
            arguments["M"],
            arguments["radius"],
            **options,
        )


def test_round_off_asymmetry_in_m_is_accepted_and_the_dense_solver_checks_its_arguments():
    g, Psi, M, B = instance(10, 3, 1.0, seed=41)
    nudged = M.clone()
    nudged[0, 1] += 1e-12 * M.abs().max()
    assert_same_solution(
        solve_trust_region_compact(g, 1.0, Psi, nudged, 0.5),
        solve_trust_region_compact(g, 1.0, Psi, M, 0.5),
        B,
    )
    with pytest.raises(ValueError, match=r"B: expected shape \(10, 10\)"):
        dense_trust_region(g, B[:9, :9], 1.0)
    with pytest.raises(ValueError, match="B: must be symmetric"):
        dense_trust_region(g, B + torch.triu(torch.ones(10, 10, dtype=F64), 1), 1.0)
    with pytest.raises(ValueError, match="radius: must be a positive number"):
        dense_trust_region(g, B, -2.0)


def test_running_out_of_newton_steps_is_reported_and_the_step_stays_feasible():
    g, Psi, M, B = instance(20, 4, -1.0, seed=43)
    full = solve_trust_region_compact(g, -1.0, Psi, M, 0.3)
    short = solve_trust_region_compact(g, -1.0, Psi, M, 0.3, max_iterations=1)
    assert full.converged and full.iterations > 1
    assert (
        not short.converged and short.iterations == 1 and short.p.norm().item() <= 0.3 * (1 + 1e-12)
    )
