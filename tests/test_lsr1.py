"""qnwb.optim.lsr1: L-SR1 (Ramamurthy & Duffy 2017, appendix Algorithms 1 and 2) against dense float64 references,
the thresholds of the radius rules, the skip rule and the pair removal, safety, reproducibility and state."""

import copy
import math

import pytest
import torch
from references import dense_sr1
from roundoff import floor
from torch import nn

from qnwb.core import flat_grads, flat_params, make_generator
from qnwb.losses import matching_loss
from qnwb.models import TanhRNN
from qnwb.optim.lsr1 import LSR1, trust_region_ratio, update_radius
from qnwb.tasks import Addition
from qnwb.trust_region import dense_trust_region

F64 = torch.float64


def closure_for(optimizer, loss_fn, record=None):
    """The closure protocol; `record` (a list) receives (θ, g) of every call."""

    def closure():
        optimizer.zero_grad()
        loss = loss_fn()
        loss.backward()
        if record is not None:
            params = optimizer.param_groups[0]["params"]
            record.append((flat_params(params).clone(), flat_grads(params).clone()))
        return loss

    return closure


def double_well_problem(n=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    C = 0.1 * torch.randn(n, n, generator=gen, dtype=F64)
    C = C @ C.T
    x = (0.3 * torch.randn(n, generator=gen, dtype=F64)).requires_grad_(True)
    return x, lambda: 0.25 * ((x**2 - 1) ** 2).sum() + 0.5 * x @ C @ x + 0.1 * x.sum()


def quadratic_problem(n, seed, low=0.3):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    A = Q @ torch.diag(torch.logspace(low, 1.5, n, dtype=F64)) @ Q.T  # no eigenvalue equal to γ = 1
    return A, torch.randn(n, generator=g, dtype=F64)


def logistic_problem(seed=0, n=300, d=6, dtype=F64):
    g = make_generator(seed)
    X = torch.randn(n, d, generator=g, dtype=F64)
    Y = (
        torch.rand(n, generator=g, dtype=F64)
        < torch.sigmoid(2 * X @ torch.randn(d, generator=g, dtype=F64))
    ).to(F64)
    torch.manual_seed(seed)
    return nn.Linear(d, 1, dtype=dtype), X.to(dtype), Y.to(dtype)


def logistic_loss(model, X, Y):
    return nn.functional.binary_cross_entropy_with_logits(model(X)[:, 0], Y)


# --- the step against dense references ---------------------------------------------------------------------------------


def test_trust_region_step_equals_the_dense_solution_for_the_explicit_sr1_matrix():
    """Every trial step with pairs in memory is the global minimiser of the model with the recursively built SR1 matrix
    (dense eigendecomposition solver, same radius); pred is −q(p); the memory afterwards is what the dense skip rule says."""
    for seed, gamma in [(0, 1.0), (1, 0.5), (2, -0.3)]:
        x, f = double_well_problem(seed=seed)
        optimizer = LSR1([x], memory=4, gamma=gamma)
        record = []
        closure = closure_for(optimizer, f, record)
        compared, lambda_min, kinds = 0, math.inf, set()
        for _ in range(15):
            S, Y = optimizer.memory.pairs()
            record.clear()
            optimizer.step(closure)
            st = optimizer.stats
            (x0, g0), (x1, g1) = record
            s, y = x1 - x0, g1 - g0
            if len(S) == 0:
                assert st["gradient_step"]
                # the realised step (θ − g) − θ: θ − g is rounded to the size of θ and g
                torch.testing.assert_close(s, -g0, rtol=0, atol=floor(x0, g0))
                B = gamma * torch.eye(len(x0), dtype=F64)
            else:
                B = dense_sr1(zip(S, Y), gamma * torch.eye(len(x0), dtype=F64))
                reference = dense_trust_region(g0, B, st["radius"])
                assert (s - reference.p).norm() <= 1e-9 * reference.p.norm()
                assert st["pred"] == pytest.approx(-reference.value, rel=1e-10)
                assert (st["on_boundary"], st["hard_case"]) == (
                    reference.on_boundary,
                    reference.hard_case,
                )
                assert st["lambda_min"] == pytest.approx(reference.lambda_min, rel=1e-9, abs=1e-12)
                lambda_min = min(lambda_min, reference.lambda_min)
                compared += 1
                kinds.add(("boundary" if st["on_boundary"] else "interior", st["accepted"]))
            assert st["rho"] == pytest.approx(
                (st["loss"] - st["trial_loss"]) / st["pred"], rel=1e-12
            )
            w = y - B @ s
            keep = abs(float(s @ w)) >= 1e-8 * float(s.norm() * w.norm())
            assert st["pair_stored"] is keep
            if st["dropped"] == 0:
                expected = list(zip(S, Y)) + ([(s, y)] if keep else [])
                S_after, Y_after = optimizer.memory.pairs()
                assert len(S_after) == len(expected[-4:])
                for (a, b), c, d in zip(expected[-4:], S_after, Y_after):
                    assert torch.equal(a, c) and torch.equal(b, d)
            x_expected = x1 if st["accepted"] else x0
            assert torch.equal(x.detach(), x_expected)
        assert compared >= 10 and lambda_min < 0  # an indefinite SR1 matrix was met
        assert (
            len({kind for kind, _ in kinds}) == 2 or seed > 0
        )  # boundary and interior steps (seed 0)


def test_the_first_step_with_an_empty_memory():
    """'gradient' (Algorithm 1 line 4) takes −g whatever the radius; 'trust_region' solves the subproblem with B = γI."""
    for empty_step, radius, gamma, expected in [
        ("gradient", 0.1, 1.0, lambda g: -g),
        ("trust_region", 0.1, 1.0, lambda g: -0.1 * g / g.norm()),  # Cauchy step on the boundary
        ("trust_region", 100.0, 2.0, lambda g: -g / 2.0),  # interior: −B⁻¹g
        ("trust_region", 0.1, -1.0, lambda g: -0.1 * g / g.norm()),  # B = −I: to the boundary
    ]:
        x = torch.tensor([0.3, -0.4, 1.2], dtype=F64, requires_grad=True)
        optimizer = LSR1([x], radius=radius, gamma=gamma, empty_step=empty_step)
        record = []
        optimizer.step(closure_for(optimizer, lambda: (x**4).sum() + x.sum(), record))
        (x0, g0), (x1, _) = record
        # the step through the subproblem solver (a norm, a solve) against the closed form, realised as (θ + p) − θ:
        # round-off of the size of θ and of p
        torch.testing.assert_close(x1 - x0, expected(g0), rtol=0, atol=floor(x0, x1))
        assert optimizer.stats["gradient_step"] is (empty_step == "gradient")


def test_the_initial_radius_is_the_first_gradient_norm():
    x = torch.tensor([3.0, 4.0], dtype=F64, requires_grad=True)
    optimizer = LSR1([x])
    optimizer.step(closure_for(optimizer, lambda: 0.5 * (x * x).sum()))
    assert optimizer.stats["radius"] == 5.0  # Δ₀ = ‖∇f(x₀)‖
    x.data = torch.zeros(2, dtype=F64)  # a stationary start: Δ₀ = 1
    optimizer = LSR1([x])
    optimizer.step(closure_for(optimizer, lambda: 0.5 * (x * x).sum()))
    assert (
        optimizer.stats["radius"] == 1.0
        and math.isnan(optimizer.stats["rho"])
        and optimizer.stats["radius_after"] == 1.0
    )
    assert (
        torch.equal(x.detach(), torch.zeros(2, dtype=F64)) and optimizer.stats["memory_size"] == 0
    )


def test_line_search_direction_equals_the_dense_inverse_sr1_direction():
    """d = −Hg with H from the dual SR1 update on (y, s) from H₀ = I/γ, or −H₀g when that is not a descent direction;
    the line search never increases f; λ₀ = min(1, 2λₖ₋₁)."""
    for seed, gamma in [(0, 1.0), (3, 2.0)]:
        x, f = double_well_problem(seed=seed)
        optimizer = LSR1([x], memory=4, method="line_search", gamma=gamma)
        record = []
        closure = closure_for(optimizer, f, record)
        fallbacks, checked, previous = 0, 0, None
        for _ in range(15):
            S, Y = optimizer.memory.pairs()
            record.clear()
            optimizer.step(closure)
            st = optimizer.stats
            x0, g0 = record[0]
            d = (x.detach() - x0) / st["step_size"]
            if len(S) == 0:
                expected = -g0
            else:
                H = dense_sr1(
                    zip(Y, S), (1.0 / gamma) * torch.eye(len(x0), dtype=F64)
                )  # self-duality: swap s and y, start from H₀
                expected = -H @ g0
                if float(g0 @ expected) >= 0:
                    expected = -g0 / gamma
                    fallbacks += 1
                    assert st["descent_fallback"] is True
                else:
                    assert st["descent_fallback"] is False
                checked += 1
            torch.testing.assert_close(d, expected, rtol=1e-9, atol=1e-12)
            assert st["loss_after"] <= st["loss"] + 1e-4 * st["step_size"] * float(
                g0 @ expected
            )  # Armijo
            assert st["initial_step_size"] == (1.0 if previous is None else min(1.0, 2 * previous))
            previous = st["step_size"]
        assert checked >= 10 and fallbacks >= 1  # the fallback happened on its own


# --- the radius and acceptance rules at their thresholds -------------------------------------------------------------


def scripted_step(rho, radius, **options):
    """One step from x = (1, 0) on ½‖x‖² (g = (1, 0), s = −g, pred = ½ exactly) whose trial loss is scripted so that
    ared/pred = rho exactly: the loss at x₀ is reported as 0, the trial's as −rho/2."""
    x = torch.tensor([1.0, 0.0], dtype=F64, requires_grad=True)
    optimizer = LSR1([x], radius=radius, **options)
    calls = []

    def closure():
        optimizer.zero_grad()
        loss = 0.5 * (x * x).sum()
        loss.backward()
        calls.append(1)
        return torch.tensor(0.0 if len(calls) == 1 else -rho / 2, dtype=F64)

    optimizer.step(closure)
    return x.detach(), optimizer.stats


ETA = 1e-4
up, down = (lambda v: math.nextafter(v, math.inf)), (lambda v: math.nextafter(v, -math.inf))


@pytest.mark.parametrize(
    "rho, radius, options, accepted, radius_after",
    [
        (ETA, 1.0, {}, False, 0.5),  # ρ = η: rejected (line 13 is strict), and ρ < l: shrunk
        (up(ETA), 1.0, {}, True, 0.5),  # just above η: accepted, still shrunk
        (-2.0, 1.0, {}, False, 0.5),
        (0.1, 1.0, {}, True, 1.0),  # ρ = l: neither shrunk nor grown
        (down(0.1), 1.0, {}, True, 0.5),
        (0.5, 1.0, {}, True, 1.0),
        (0.75, 1.0, {}, True, 1.0),  # ρ = u: not grown
        (up(0.75), 1.0, {}, True, 2.0),  # ‖s‖ = 1 > 0.8Δ: grown
        (0.9, 2.0, dict(near_boundary=0.5), True, 2.0),  # ‖s‖ = 0.5Δ exactly: not near the boundary
        (0.9, down(2.0), dict(near_boundary=0.5), True, 2 * down(2.0)),  # ‖s‖ > 0.5Δ: grown
        (0.9, 1.3, {}, True, 1.3),  # ‖s‖ = 1 < 0.8·1.3: well inside, not grown
        (0.9, 1.2, {}, True, 2.4),  # ‖s‖ = 1 > 0.8·1.2 = 0.96
        (0.9, 1.0, dict(increase=3.0), True, 3.0),
        (0.01, 1.0, dict(decrease=0.25), True, 0.25),
        (0.01, 1.0, dict(bad=0.005), True, 1.0),
        (0.7, 1.0, dict(good=0.6), True, 2.0),
        (0.9, 1.0, dict(max_radius=1.5), True, 1.5),
        (5e-4, 1.0, {}, True, 0.5),
        (5e-4, 1.0, dict(eta=9e-4), False, 0.5),  # a larger η rejects what the default accepts
    ],
)
def test_acceptance_and_radius_fire_exactly_at_the_thresholds(
    rho, radius, options, accepted, radius_after
):
    x, st = scripted_step(rho, radius, **options)
    assert st["pred"] == 0.5 and st["ared"] == rho / 2 and st["rho"] == rho
    assert (
        st["accepted"] is accepted and st["radius"] == radius and st["radius_after"] == radius_after
    )
    assert torch.equal(
        x, torch.zeros(2, dtype=F64) if accepted else torch.tensor([1.0, 0.0], dtype=F64)
    )
    assert st["rejections"] == (0 if accepted else 1)


def test_ratio_and_radius_functions_directly():
    t = lambda v: torch.tensor(v, dtype=F64)  # noqa: E731
    assert float(trust_region_ratio(t(3.0), t(4.0))) == 0.75
    assert math.isnan(float(trust_region_ratio(t(3.0), t(0.0)))) and math.isnan(
        float(trust_region_ratio(t(-3.0), t(-1.0)))
    )
    assert float(trust_region_ratio(t(math.inf), t(1.0))) == -math.inf
    assert float(trust_region_ratio(t(1.0), t(1.0), torch.tensor(False))) == -math.inf
    assert float(update_radius(t(1.0), t(math.nan), t(1.0))) == 1.0
    assert float(update_radius(t(1e-310), t(-1.0), t(1.0))) == torch.finfo(F64).tiny  # never 0
    assert float(update_radius(t(1e308), t(1.0), t(1e308))) == torch.finfo(F64).max  # never ∞
    with pytest.raises(ValueError, match="decrease"):
        update_radius(t(1.0), t(1.0), t(1.0), decrease=1.0)


def test_non_positive_pred_and_non_finite_trials():
    # γ = 3: the gradient step's pred = (1 − γ/2)‖g‖² < 0: ρ is NaN, the trial rejected, the radius kept, the pair stored
    x, st = scripted_step(0.5, 1.0, gamma=3.0)
    assert (
        st["pred"] == -0.5
        and math.isnan(st["rho"])
        and st["accepted"] is False
        and st["radius_after"] == 1.0
    )
    assert st["pair_stored"] is True and st["memory_size"] == 1
    assert torch.equal(x, torch.tensor([1.0, 0.0], dtype=F64))
    # a NaN trial: ρ = −∞, rejected, shrunk, no pair
    x, st = scripted_step(math.nan, 1.0)
    assert st["rho"] == -math.inf and st["accepted"] is False and st["radius_after"] == 0.5
    assert (
        st["pair_stored"] is False
        and st["pair_skipped"] is False
        and st["memory_size"] == 0
        and st["non_finite"] is True
    )
    assert torch.equal(x, torch.tensor([1.0, 0.0], dtype=F64))
    keys = set(st)
    # a non-finite loss at xₖ: no trial at all (the same statistics are published)
    x = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True)
    optimizer = LSR1([x])
    optimizer.step(closure_for(optimizer, lambda: (x * x).sum() * math.inf))
    st = optimizer.stats
    assert st["non_finite"] is True and st["gradient_evaluations"] == 1 and st["accepted"] is False
    assert torch.equal(x.detach(), torch.tensor([1.0, 2.0], dtype=F64)) and set(st) == keys
    optimizer.step(closure_for(optimizer, lambda: (x * x).sum()))
    assert optimizer.stats["radius"] == float(
        torch.tensor([2.0, 4.0], dtype=F64).norm()
    )  # Δ₀ from the first finite gradient


# --- memory: skip rule and removal ------------------------------------------------------------------------------------


def test_skip_rule():
    # y = B₀s: the update would be 0/0, the pair is skipped
    x = torch.tensor([0.7, -1.1], dtype=F64, requires_grad=True)
    optimizer = LSR1([x])
    optimizer.step(closure_for(optimizer, lambda: 0.5 * (x * x).sum()))
    st = optimizer.stats
    assert (
        st["accepted"] is True
        and st["pair_skipped"] is True
        and st["memory_size"] == 0
        and st["pairs_skipped"] == 1
    )
    # A = diag(2, 3) from (1, 1): s = (−2, −3), y − s = (−2, −6), |sᵀ(y − Bs)| / (‖s‖‖y − Bs‖) = 22/√520 ≈ 0.96476
    for r, stored in [(0.964, True), (0.965, False)]:
        x = torch.tensor([1.0, 1.0], dtype=F64, requires_grad=True)
        optimizer = LSR1([x], r=r, radius=10.0)
        optimizer.step(closure_for(optimizer, lambda: x[0] ** 2 + 1.5 * x[1] ** 2))
        st = optimizer.stats
        assert (
            st["pair_stored"] is stored
            and st["pair_skipped"] is not stored
            and st["memory_size"] == int(stored)
        )
        assert st["sr1_denominator"] == 22.0


def test_skip_rule_uses_the_current_matrix_not_the_initial_one():
    """With the pair (e₁, 2e₁) in memory, B = diag(2, 1) on f = ½xᵀdiag(2, 3)x from (1, 1): the interior step is
    s = −B⁻¹g = (−1, −3), y − Bs = (0, −6), and |sᵀ(y − Bs)| / (‖s‖‖y − Bs‖) = 3/√10 ≈ 0.9487 (with B₀ = I instead it
    would be 19/√370 ≈ 0.9878). Dually, the line search (H = diag(½, 1), λ = ½ after one halving) gets s = (−½, −3/2),
    y = (−1, −9/2), s − Hy = (0, 3) and |yᵀ(s − Hy)| / (‖y‖‖s − Hy‖) = 4.5/‖y‖ ≈ 0.9762 (with H₀: ≈ 0.9985)."""
    e = torch.eye(2, dtype=F64)
    for method, r, stored, denominator in [
        ("trust_region", 0.94, True, 18.0),
        ("trust_region", 0.96, False, 18.0),
        ("line_search", 0.97, True, -13.5),
        ("line_search", 0.99, False, -13.5),
    ]:
        x = torch.tensor([1.0, 1.0], dtype=F64, requires_grad=True)
        optimizer = LSR1([x], r=r, radius=10.0, method=method)
        optimizer.memory.push(e[0], 2 * e[0])
        optimizer.step(closure_for(optimizer, lambda: x[0] ** 2 + 1.5 * x[1] ** 2))
        st = optimizer.stats
        assert st["pair_stored"] is stored and st["memory_size"] == 1 + int(stored)
        assert st["sr1_denominator"] == pytest.approx(denominator, rel=1e-14)
        if method == "line_search":
            assert st["step_size"] == 0.5 and st["descent_fallback"] is False
        else:
            assert (
                st["on_boundary"] is False and st["accepted"] is False
            )  # f: 2.5 → 6, but the pair is judged all the same


def test_more_pairs_than_dimensions_are_removed_oldest_first():
    """ΨᵀΨ of k > n pairs is singular (Algorithm 1 line 34): the oldest pairs go, the newest stays."""
    x = torch.tensor([1.5], dtype=F64, requires_grad=True)
    optimizer = LSR1([x], memory=3)
    record = []
    closure = closure_for(optimizer, lambda: (0.25 * x**4 - 0.5 * x**2 + 0.3 * x).sum(), record)
    dropped = 0
    for _ in range(10):
        record.clear()
        optimizer.step(closure)
        st = optimizer.stats
        assert st["memory_size"] <= 1
        dropped += st["dropped"]
        if st["pair_stored"]:
            (x0, g0), (x1, g1) = record
            S, Y = optimizer.memory.pairs()
            assert torch.equal(S[0], x1 - x0) and torch.equal(Y[0], g1 - g0)
    assert dropped >= 3 and optimizer.stats["pairs_dropped"] == dropped


def test_a_singular_middle_matrix_drops_the_oldest_pair():
    """Pairs with M⁻¹ = [[1, 1], [1, 1]] (singular) but Ψ of full rank: the oldest goes, and the step is the dense
    trust-region step of the SR1 matrix of the newest pair alone."""
    x = torch.tensor([0.5, -0.2, 0.3], dtype=F64, requires_grad=True)
    optimizer = LSR1([x], radius=0.3)
    e = torch.eye(3, dtype=F64)
    optimizer.memory.push(e[0], 2 * e[0] + e[1])  # ψ₁ = e₁ + e₂, s₁ᵀy₁ − s₁ᵀs₁ = 1
    optimizer.memory.push(
        e[1], 2 * e[1] + 0.5 * e[2]
    )  # ψ₂ = e₂ + ½e₃, M⁻¹₂₁ = s₂ᵀy₁ − s₂ᵀs₁ = 1, M⁻¹₂₂ = 1
    record = []
    optimizer.step(closure_for(optimizer, lambda: 0.5 * (x * x).sum() + x[0] * x[1], record))
    st = optimizer.stats
    assert st["dropped"] >= 1 and st["pairs_dropped"] == st["dropped"]
    (x0, g0), (x1, _) = record
    reference = dense_trust_region(
        g0, dense_sr1([(e[1], 2 * e[1] + 0.5 * e[2])], torch.eye(3, dtype=F64)), 0.3
    )
    torch.testing.assert_close(x1 - x0, reference.p, rtol=1e-10, atol=1e-14)


def test_forgetting_clears_the_memory_every_k_steps():
    model, X, Y = logistic_problem(6)
    optimizer = LSR1(model.parameters(), memory=10, forget_every=3)
    closure = closure_for(optimizer, lambda: logistic_loss(model, X, Y))
    sizes, forgot = [], []
    for _ in range(8):
        optimizer.step(closure)
        sizes.append(optimizer.stats["memory_size"])
        forgot.append(optimizer.stats["forgot"])
    assert sizes == [1, 2, 3, 1, 2, 3, 1, 2]
    assert forgot == [0, 0, 0, 1, 0, 0, 1, 0] and optimizer.stats["resets"] == 2


# --- safety -------------------------------------------------------------------------------------------------------------


def test_a_rejected_trial_restores_the_parameters_bit_for_bit_and_still_updates_the_memory():
    model, X, Y = logistic_problem(3)
    optimizer = LSR1(model.parameters(), memory=5)
    good = closure_for(optimizer, lambda: logistic_loss(model, X, Y))
    for _ in range(3):
        optimizer.step(good)
    before, size = flat_params(model).clone(), optimizer.stats["memory_size"]
    record = []

    def bad_trial():  # the true gradient everywhere, but a terrible loss away from the starting point
        optimizer.zero_grad()
        loss = logistic_loss(model, X, Y)
        loss.backward()
        theta = flat_params(model).clone()
        record.append((theta, flat_grads(model).clone()))
        return loss if torch.equal(theta, before) else loss + 1e3

    optimizer.step(bad_trial)
    st = optimizer.stats
    assert st["accepted"] is False and st["rho"] < 0 and st["radius_after"] == 0.5 * st["radius"]
    assert torch.equal(flat_params(model), before)
    assert (
        st["pair_stored"] is True and st["memory_size"] == size + 1
    )  # Algorithm 1 stores the rejected trial's pair
    (x0, g0), (x1, g1) = record
    S, Yp = optimizer.memory.pairs()
    assert torch.equal(S[-1], x1 - x0) and torch.equal(Yp[-1], g1 - g0)


def test_a_failed_line_search_restores_the_parameters_bit_for_bit_and_clears_the_memory():
    model, X, Y = logistic_problem(3)
    optimizer = LSR1(model.parameters(), method="line_search", max_evaluations=5)
    good = closure_for(optimizer, lambda: logistic_loss(model, X, Y))
    for _ in range(3):
        optimizer.step(good)
    assert optimizer.stats["memory_size"] == 3
    before = flat_params(model).clone()
    trials = []

    def poisoned():
        loss = logistic_loss(model, X, Y)
        moved = not torch.equal(flat_params(model), before)
        trials.append(moved)
        optimizer.zero_grad()
        loss.backward()
        return loss * math.nan if moved else loss

    optimizer.step(poisoned)
    st = optimizer.stats
    assert torch.equal(flat_params(model), before)
    assert trials.count(True) == 5 and st["line_search_stop"] == "failed" and st["step_size"] == 0.0
    assert st["memory_size"] == 0 and st["pair_stored"] is False and st["resets"] == 1
    optimizer.step(good)
    assert optimizer.stats["initial_step_size"] == 1.0  # λ₀ restarts at 1


def test_the_descent_fallback_of_the_line_search():
    """H = diag(−1, 1) from the pair s = e₁, y = −e₁ (H₀ = I/γ, γ = 1 here); at g = (1, 0.1) −Hg points uphill:
    the step goes along −H₀g = −g/γ instead, and the memory is kept. With γ = 2 the fallback is −g/2."""
    for gamma in (1.0, 2.0):
        w = torch.tensor([1.0, 0.1], dtype=F64, requires_grad=True)
        optimizer = LSR1([w], method="line_search", gamma=gamma)
        optimizer.memory.push(
            torch.tensor([1.0, 0.0], dtype=F64), torch.tensor([-1.0, 0.0], dtype=F64)
        )
        H = optimizer.compact_form().dense()
        g = torch.tensor([1.0, 0.1], dtype=F64)
        assert float(g @ (-H @ g)) > 0  # −Hg is not a descent direction
        optimizer.step(closure_for(optimizer, lambda: 0.5 * (w**2).sum()))
        st = optimizer.stats
        assert (
            st["descent_fallback"] is True
            and st["descent_fallbacks"] == 1
            and st["line_search_stop"] == "armijo"
        )
        torch.testing.assert_close(w.detach(), g - st["step_size"] * g / gamma, rtol=0, atol=1e-15)
        assert st["loss_after"] < st["loss"] and st["memory_size"] >= 1
    # a descent direction from an indefinite H is used as it is
    w = torch.tensor([0.1, 1.0], dtype=F64, requires_grad=True)
    optimizer = LSR1([w], method="line_search")
    optimizer.memory.push(torch.tensor([1.0, 0.0], dtype=F64), torch.tensor([-1.0, 0.0], dtype=F64))
    optimizer.step(closure_for(optimizer, lambda: 0.5 * (w**2).sum()))
    assert optimizer.stats["descent_fallback"] is False


def test_a_saddle_point_is_left_along_negative_curvature():
    """At a stationary saddle (g = 0) with the curvature −1 along e₂ in memory the subproblem is the hard case:
    p = Δ·z along the negative-curvature direction, pred = ½Δ², and f decreases."""
    x = torch.zeros(2, dtype=F64, requires_grad=True)
    optimizer = LSR1([x], radius=1.0)
    optimizer.memory.push(
        torch.tensor([0.0, 1.0], dtype=F64), torch.tensor([0.0, -1.0], dtype=F64)
    )  # B = diag(1, −1)
    optimizer.step(closure_for(optimizer, lambda: 0.5 * (x[0] ** 2 - x[1] ** 2) + 0.25 * x[1] ** 4))
    st = optimizer.stats
    assert (
        st["hard_case"] is True and st["on_boundary"] is True and st["sigma"] == pytest.approx(1.0)
    )
    assert (
        st["pred"] == pytest.approx(0.5)
        and st["trial_loss"] == pytest.approx(-0.25)
        and st["accepted"] is True
    )
    assert abs(float(x.detach()[1])) == pytest.approx(1.0) and float(x.detach()[0]) == 0.0


# --- convergence ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, seed", [(4, 0), (6, 1), (8, 2)])
def test_strictly_convex_quadratic_secant_conditions_and_convergence(n, seed):
    """y = As for every pair: the SR1 matrix satisfies Bsᵢ = yᵢ for all stored pairs after every step (hereditary
    property), equals A once n pairs are held, and the method reaches the minimiser."""
    A, b = quadratic_problem(n, seed)
    x = torch.zeros(n, dtype=F64, requires_grad=True)
    optimizer = LSR1([x], memory=n, full_batch=True)
    closure = closure_for(optimizer, lambda: 0.5 * x @ A @ x - b @ x)
    full = False
    for step in range(1, 61):  # noqa: B007  (the count is read after the loop)
        optimizer.step(closure)
        S, Y = optimizer.memory.pairs()
        B = optimizer.compact_form().dense()
        if len(S):
            torch.testing.assert_close(B @ S.T, Y.T, rtol=1e-8, atol=1e-10)
        if len(S) == n:
            torch.testing.assert_close(B, A, rtol=1e-7, atol=1e-8)
            full = True
        if (A @ x.detach() - b).norm() <= 1e-10 * b.norm():
            break
    assert (A @ x.detach() - b).norm() <= 1e-10 * b.norm() and step <= 3 * n and full


def test_full_batch_logistic_regression_reaches_the_minimiser_with_both_methods():
    for method in ("trust_region", "line_search"):
        model, X, Y = logistic_problem()
        optimizer = LSR1(model.parameters(), method=method, memory=5, full_batch=True)
        closure = closure_for(optimizer, lambda: logistic_loss(model, X, Y))
        losses = []
        for _ in range(40):
            optimizer.step(closure)
            losses.append(optimizer.stats["loss_after"])
        closure()
        assert flat_grads(model).norm() < 1e-6, method
        assert all(b <= a for a, b in zip(losses, losses[1:]))  # both only move downhill


@pytest.mark.parametrize("method", ["trust_region", "line_search"])
def test_stochastic_lsr1_reduces_a_logistic_regression_loss(method):
    model, X, Y = logistic_problem(1)
    optimizer = LSR1(model.parameters(), memory=5, method=method)
    generator = make_generator(2)
    start = float(logistic_loss(model, X, Y).detach())
    for _ in range(30):
        rows = torch.randperm(len(X), generator=generator)[:60]
        optimizer.step(closure_for(optimizer, lambda: logistic_loss(model, X[rows], Y[rows])))
        if method == "trust_region":
            assert (
                optimizer.stats["gradient_evaluations"] == 2
            )  # both gradients of a pair on the same batch
    assert float(logistic_loss(model, X, Y).detach()) < 0.6 * start
    assert optimizer.stats["pairs_stored"] > 15


@pytest.mark.parametrize("method", ["trust_region", "line_search"])
def test_lsr1_reduces_the_loss_of_a_small_tanh_rnn(method):
    model = TanhRNN(2, 6, 1, dtype=F64, generator=make_generator(0))
    X, Y = Addition(10).batch(60, make_generator(1), dtype=F64)
    loss = matching_loss("squared_error")
    optimizer = LSR1(model.parameters(), method=method, memory=5, full_batch=True)
    closure = closure_for(optimizer, lambda: loss(model(X), Y))
    start = float(closure().detach())
    for _ in range(25):
        optimizer.step(closure)
    assert float(closure().detach()) < 0.2 * start


# --- evaluations, reproducibility and state ---------------------------------------------------------------------------


def test_evaluation_counts():
    model, X, Y = logistic_problem(8)
    optimizer = LSR1(model.parameters(), full_batch=True)
    closure = closure_for(optimizer, lambda: logistic_loss(model, X, Y))
    counts = []
    for _ in range(3):
        optimizer.step(closure)
        counts.append(optimizer.stats["gradient_evaluations"])
    with torch.no_grad():
        model.bias.add_(0.1)  # a change from outside: the cache must not be used
    optimizer.step(closure)
    counts.append(optimizer.stats["gradient_evaluations"])
    assert counts == [2, 1, 1, 2] and optimizer.stats["total_gradient_evaluations"] == 6
    assert optimizer.stats["total_gradient_evaluations"] == 6
    optimizer = LSR1(model.parameters(), method="line_search")
    optimizer.step(closure)
    st = optimizer.stats
    assert (
        st["gradient_evaluations"]
        == 1 + st["line_search_evaluations"]
        == st["gradient_evaluations"]
    )


def stochastic_run(model, optimizer, X, Y, steps, generator, full_batch=False):
    trajectory = []
    for _ in range(steps):
        rows = (
            torch.arange(len(X)) if full_batch else torch.randperm(len(X), generator=generator)[:40]
        )
        optimizer.step(closure_for(optimizer, lambda: logistic_loss(model, X[rows], Y[rows])))
        trajectory.append((flat_params(model).clone(), dict(optimizer.stats)))
    return trajectory


def same(a, b):
    "Stats equal, NaN equal to NaN."
    return a.keys() == b.keys() and all(
        a[k] == b[k] or (isinstance(a[k], float) and math.isnan(a[k]) and math.isnan(b[k]))
        for k in a
    )


@pytest.mark.parametrize("method", ["trust_region", "line_search"])
def test_same_seed_same_trajectory(method):
    runs = []
    for _ in range(2):
        model, X, Y = logistic_problem(9)
        optimizer = LSR1(model.parameters(), memory=4, method=method)
        runs.append(stochastic_run(model, optimizer, X, Y, 10, make_generator(10)))
    for (a, stats_a), (b, stats_b) in zip(*runs):
        assert torch.equal(a, b) and same(stats_a, stats_b)


CONFIGURATIONS = [
    dict(memory=3),
    dict(memory=4, full_batch=True, forget_every=4, empty_step="trust_region", gamma=0.5),
    dict(memory=3, method="line_search"),
    dict(memory=5, method="line_search", line_search="strong_wolfe", full_batch=True),
    dict(memory=3, dtype=torch.float32),
]


@pytest.mark.parametrize("options", CONFIGURATIONS)
def test_state_dict_mid_run_continues_identically(options):
    options = dict(options)
    dtype = options.pop("dtype", F64)
    full = options.get("full_batch", False)
    model, X, Y = logistic_problem(11, dtype=dtype)
    optimizer = LSR1(model.parameters(), **options)
    generator = make_generator(12)
    stochastic_run(model, optimizer, X, Y, 5, generator, full)
    saved_model, saved_optimizer = (
        copy.deepcopy(model.state_dict()),
        copy.deepcopy(optimizer.state_dict()),
    )
    saved_generator = generator.get_state()
    expected = stochastic_run(model, optimizer, X, Y, 7, generator, full)

    resumed_model, _, _ = logistic_problem(0, dtype=dtype)
    resumed_model.load_state_dict(saved_model)
    resumed = LSR1(resumed_model.parameters(), **{**options, "eta": 5e-4, "radius": 123.0})
    resumed.load_state_dict(saved_optimizer)
    assert resumed.param_groups[0]["eta"] == options.get("eta", 1e-4)
    state = resumed.state[next(resumed_model.parameters())]
    if options.get("method", "trust_region") == "trust_region":
        assert state["radius"].dtype == F64  # not cast to the parameters' dtype
    assert state["pairs_stored"].dtype == torch.int64
    generator.set_state(saved_generator)
    got = stochastic_run(resumed_model, resumed, X, Y, 7, generator, full)
    for (a, stats_a), (b, stats_b) in zip(expected, got):
        assert torch.equal(a, b) and same(stats_a, stats_b)


def test_loading_a_mismatched_state_is_refused():
    model, X, Y = logistic_problem(13)
    optimizer = LSR1(model.parameters(), memory=3)
    optimizer.step(closure_for(optimizer, lambda: logistic_loss(model, X, Y)))
    state = optimizer.state_dict()
    for options, name in [
        (dict(memory=3, method="line_search"), "method"),
        (dict(memory=3, gamma=2.0), "gamma"),
    ]:
        with pytest.raises(ValueError, match=name):
            LSR1(model.parameters(), **options).load_state_dict(state)
    other = LSR1(model.parameters(), memory=4)
    other.load_state_dict(
        state
    )  # a memory size is no longer fixed at construction: the saved one is taken
    assert other.memory.size == other.param_groups[0]["memory"] == 3
    with pytest.raises(ValueError, match="memory"):
        LSR1(model.parameters(), memory=3).load_state_dict(
            {k: v for k, v in state.items() if k != "memory"}
        )


# --- hyperparameters --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, error, name",
    [
        (dict(memory=0), ValueError, "memory"),
        (dict(memory=2.5), ValueError, "memory"),
        (dict(method="newton"), ValueError, "method"),
        (dict(gamma=0.0), ValueError, "gamma"),
        (dict(gamma=math.nan), ValueError, "gamma"),
        (dict(gamma=-1.0, method="line_search"), ValueError, "gamma"),
        (dict(radius=0.0), ValueError, "radius"),
        (dict(radius=-1.0), ValueError, "radius"),
        (dict(radius=math.inf), ValueError, "radius"),
        (dict(eta=0.0), ValueError, "eta"),
        (dict(eta=1e-3), ValueError, "eta"),
        (dict(eta=0.5), ValueError, "eta"),
        (dict(r=0.0), ValueError, "r:"),
        (dict(r=1.0), ValueError, "r:"),
        (dict(increase=1.0), ValueError, "increase"),
        (dict(decrease=0.0), ValueError, "decrease"),
        (dict(decrease=1.0), ValueError, "decrease"),
        (dict(good=1.0), ValueError, "good"),
        (dict(bad=0.8), ValueError, "bad"),
        (dict(bad=1e-4), ValueError, "bad"),
        (dict(near_boundary=0.0), ValueError, "near_boundary"),
        (dict(near_boundary=1.0), ValueError, "near_boundary"),
        (dict(max_radius=0.0), ValueError, "max_radius"),
        (dict(radius=2.0, max_radius=1.0), ValueError, "max_radius"),
        (dict(forget_every=0), ValueError, "forget_every"),
        (dict(empty_step="cauchy"), ValueError, "empty_step"),
        (dict(line_search="wolfe"), ValueError, "line_search"),
        (dict(armijo=0.0), ValueError, "armijo"),
        (dict(armijo=0.5, wolfe=0.4), ValueError, "wolfe"),
        (dict(backtrack=1.0), ValueError, "backtrack"),
        (dict(max_evaluations=0), ValueError, "max_evaluations"),
        (dict(rcond=1.0), ValueError, "rcond"),
        (dict(full_batch="yes"), TypeError, "full_batch"),
    ],
)
def test_bad_hyperparameters_name_the_parameter(options, error, name):
    x = torch.zeros(3, requires_grad=True)
    with pytest.raises(error, match=name):
        LSR1([x], **options)


def test_bad_params_and_closures():
    x, y = torch.zeros(3, requires_grad=True), torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="one parameter group"):
        LSR1([{"params": [x]}, {"params": [y], "eta": 1e-5}])
    optimizer = LSR1([x])
    with pytest.raises(TypeError, match="closure"):
        optimizer.step(None)


# --- a memory size set between steps (the dashboard steers param_groups[0]["memory"]) ---------------------------------

from resizing import generator_copy, optimizer_state, twin  # noqa: E402
from resizing import same as same_state  # noqa: E402


@pytest.mark.parametrize(
    "options",
    [dict(), dict(method="line_search"), dict(full_batch=True, empty_step="trust_region")],
)
def test_a_memory_set_in_the_group_resizes_at_the_next_step_like_a_fresh_memory_of_the_newest_pairs(
    options,
):
    model, X, Y = logistic_problem(50)
    optimizer = LSR1(model.parameters(), memory=5, **options)
    generator, full = make_generator(51), options.get("full_batch", False)
    stochastic_run(model, optimizer, X, Y, 9, generator, full)
    assert optimizer.stats["memory_capacity"] == 5 and optimizer.stats["memory_size"] >= 3
    build = lambda m, memory: LSR1(m.parameters(), memory=memory, **options)  # noqa: E731
    for size in (2, 4, 1):  # shrink, grow, shrink to one pair
        copy_model, reference = twin(model, optimizer, build, memory=size)
        optimizer.param_groups[0]["memory"] = size
        copy_generator = generator_copy(generator)
        got = stochastic_run(model, optimizer, X, Y, 5, generator, full)
        assert (
            optimizer.memory.size == got[0][1]["memory_capacity"] == size
            and got[0][1]["memory_size"] <= size
        )
        for (a, stats_a), (b, stats_b) in zip(
            got, stochastic_run(copy_model, reference, X, Y, 5, copy_generator, full)
        ):
            assert torch.equal(a, b) and same(stats_a, stats_b)


def test_the_first_step_after_a_shrink_uses_the_sr1_matrix_of_the_kept_pairs():
    model, X, Y = logistic_problem(52)
    optimizer = LSR1(model.parameters(), memory=4, method="line_search")
    stochastic_run(model, optimizer, X, Y, 6, make_generator(53))
    S, Y_ = optimizer.memory.pairs()
    optimizer.param_groups[0]["memory"] = 2
    record = []
    optimizer.step(closure_for(optimizer, lambda: logistic_loss(model, X, Y), record))
    theta, g = record[0]
    assert (
        optimizer.stats["step_size"] > 0
        and not optimizer.stats["descent_fallback"]
        and optimizer.stats["memory_capacity"] == 2
    )
    H = dense_sr1(
        zip(Y_[-2:], S[-2:]), torch.eye(len(theta), dtype=F64)
    )  # the inverse form: s and y swap roles (self-duality), H₀ = I
    direction = -H @ g
    torch.testing.assert_close(
        flat_params(model) - theta, optimizer.stats["step_size"] * direction, rtol=1e-9, atol=1e-12
    )


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_a_bad_memory_set_in_the_group_is_refused_at_the_step_with_nothing_changed(bad):
    model, X, Y = logistic_problem(54)
    optimizer = LSR1(model.parameters(), memory=3)
    stochastic_run(model, optimizer, X, Y, 5, make_generator(55))
    theta, state = flat_params(model).clone(), optimizer_state(optimizer)
    calls = []
    optimizer.param_groups[0]["memory"] = bad
    with pytest.raises(
        ValueError, match=r"memory: must be a positive int.*param_groups\[0\]\['memory'\]"
    ):
        optimizer.step(lambda: calls.append(1))
    assert (
        calls == []
        and torch.equal(flat_params(model), theta)
        and same_state(optimizer_state(optimizer), state)
    )
    assert optimizer.memory.size == 3


@pytest.mark.parametrize("between", [False, True])
def test_a_checkpoint_after_a_resize_resumes_in_an_optimizer_built_with_the_constructor_sizes(
    between,
):
    model, X, Y = logistic_problem(56)
    optimizer = LSR1(model.parameters())  # memory: the default 10
    generator = make_generator(57)
    stochastic_run(model, optimizer, X, Y, 12, generator)
    optimizer.param_groups[0]["memory"] = 3
    if not between:
        stochastic_run(model, optimizer, X, Y, 2, generator)
    saved_model, saved = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    saved_generator = generator.get_state()
    expected = stochastic_run(model, optimizer, X, Y, 6, generator)

    resumed_model, _, _ = logistic_problem(0)
    resumed_model.load_state_dict(saved_model)
    resumed = LSR1(resumed_model.parameters())
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["memory"] == 3 and resumed.memory.size == (10 if between else 3)
    generator.set_state(saved_generator)
    for (a, stats_a), (b, stats_b) in zip(
        expected, stochastic_run(resumed_model, resumed, X, Y, 6, generator)
    ):
        assert torch.equal(a, b) and same(stats_a, stats_b)
