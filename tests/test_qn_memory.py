"""qnwb.optim.memory against dense float64 references: the ring buffer, the two-loop recursion, safeguards, compact forms."""

import math
from collections import deque

import pytest
import torch
from host_reads import HostRead, no_host_reads
from hypothesis import assume, given
from hypothesis import strategies as st
from references import dense_bfgs_inverse, dense_sr1  # the dense float64 recursions, one copy
from roundoff import floor

from qnwb.optim.memory import (
    CompactForm,
    DiagonalScaling,
    PairMemory,
    bfgs_compact,
    curvature_condition,
    powell_damping,
    sr1_compact,
    sr1_condition,
    two_loop,
)

F64 = torch.float64


def rel(a, b):
    return float((a - b).norm() / b.norm())


def spd(n, g, low=1.0, high=20.0):
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    return Q @ torch.diag(torch.linspace(low, high, n, dtype=F64)) @ Q.T


def symmetric_indefinite(n, g):
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    return Q @ torch.diag(torch.linspace(-5.0, 5.0, n, dtype=F64) + 0.37) @ Q.T


def filled(m, n, pairs):
    memory = PairMemory(m, n, dtype=F64)
    for s, y in pairs:
        memory.push(s, y)
    return memory


def convex_pairs(n, count, g, A=None):
    A = spd(n, g) if A is None else A
    pairs = []
    for _ in range(count):
        s = torch.randn(n, generator=g, dtype=F64)
        pairs.append((s, A @ s))
    return pairs


def h0_matrix(kind, pairs, n, g):
    """(argument for two_loop, the dense H0 it stands for)."""
    if kind == "identity":
        return "identity", torch.eye(n, dtype=F64)
    if kind == "scaling":
        if not pairs:
            return "scaling", torch.eye(n, dtype=F64)
        s, y = pairs[-1]
        return "scaling", float((s @ y) / (y @ y)) * torch.eye(n, dtype=F64)
    if kind == "number":
        return 0.3, 0.3 * torch.eye(n, dtype=F64)
    d = torch.rand(n, generator=g, dtype=F64) + 0.1  # an Adagrad-like positive diagonal
    return d, torch.diag(d)


# --- the ring buffer -------------------------------------------------------------------------------------------------


@given(st.integers(1, 5), st.lists(st.booleans(), max_size=20))
def test_ring_buffer_order_after_wrap_around_matches_a_bounded_deque(m, accepts):
    memory, model = PairMemory(m, 3, dtype=F64), deque(maxlen=m)
    for i, accept in enumerate(accepts):
        s = torch.full((3,), float(i), dtype=F64)
        y = torch.full((3,), float(i) + 0.5, dtype=F64)
        memory.push(s, y, torch.tensor(accept))
        if accept:
            model.append(i)
        S, Y = memory.pairs()
        assert S[:, 0].tolist() == [float(i) for i in model]
        assert Y[:, 1].tolist() == [i + 0.5 for i in model]
        assert len(memory) == len(model)
        slots, held = memory.order()
        assert held.tolist() == [j < len(model) for j in range(m)]
    torch.testing.assert_close(
        memory.sy[memory.order()[0][: len(model)]],
        torch.tensor([3 * i * (i + 0.5) for i in model], dtype=F64),
    )


def test_a_rejected_pair_changes_nothing_bit_for_bit():
    g = torch.Generator().manual_seed(1)
    memory = filled(3, 5, convex_pairs(5, 4, g))
    before = memory.state_dict()
    for s, y in [
        (torch.randn(5, dtype=F64, generator=g), torch.randn(5, dtype=F64, generator=g)),
        (torch.full((5,), math.nan, dtype=F64), torch.full((5,), math.inf, dtype=F64)),
    ]:
        assert memory.push(s, y, torch.tensor(False)).item() is False
        memory.push(s, y, False)
        after = memory.state_dict()
        for key in before:
            assert torch.equal(before[key], after[key]), key
    memory.clear(torch.tensor(False))
    memory.drop_oldest(torch.tensor(0))
    assert all(torch.equal(before[k], v) for k, v in memory.state_dict().items())


def test_clear_and_drop_oldest():
    g = torch.Generator().manual_seed(2)
    pairs = convex_pairs(4, 5, g)
    memory = filled(4, 4, pairs)
    memory.drop_oldest(1)
    assert torch.equal(memory.pairs()[0], torch.stack([s for s, _ in pairs[2:]]))
    memory.drop_oldest(torch.tensor(10))
    assert len(memory) == 0 and memory.pairs()[0].shape == (0, 4)
    memory = filled(4, 4, pairs)
    memory.clear(torch.tensor(True))
    assert len(memory) == 0
    memory.push(*pairs[0])
    assert torch.equal(memory.pairs()[1][0], pairs[0][1]) and len(memory) == 1
    memory.clear()
    assert len(memory) == 0


def test_state_dict_round_trip_and_identical_continuation():
    g = torch.Generator().manual_seed(3)
    pairs = convex_pairs(6, 9, g)
    memory = filled(4, 6, pairs[:5])
    saved = memory.state_dict()
    restored = PairMemory(4, 6, dtype=F64)
    restored.load_state_dict(saved)
    for s, y in pairs[5:]:
        memory.push(s, y)
        restored.push(s, y)
    v = torch.randn(6, generator=g, dtype=F64)
    assert torch.equal(two_loop(memory, v), two_loop(restored, v))
    assert all(
        torch.equal(a, b)
        for a, b in zip(memory.state_dict().values(), restored.state_dict().values())
    )
    with pytest.raises(ValueError, match=r"state\['S'\]"):
        PairMemory(3, 6, dtype=F64).load_state_dict(saved)
    with pytest.raises(ValueError, match="'count'"):
        PairMemory(4, 6, dtype=F64).load_state_dict(
            {k: v for k, v in saved.items() if k != "count"}
        )
    bad = dict(saved, count=torch.tensor(7))
    with pytest.raises(ValueError, match="count"):
        PairMemory(4, 6, dtype=F64).load_state_dict(bad)


@pytest.mark.parametrize("size, n", [(0, 3), (-1, 3), (2.0, 3), (2, 0), (True, 3)])
def test_bad_sizes_name_the_parameter(size, n):
    with pytest.raises(ValueError, match="size" if n == 3 else "n:"):
        PairMemory(size, n)


def test_bad_vectors_and_flags_name_the_parameter():
    memory = PairMemory(2, 3, dtype=F64)
    with pytest.raises(ValueError, match="s: expected a 1-D tensor of 3"):
        memory.push(torch.zeros(4, dtype=F64), torch.zeros(3, dtype=F64))
    with pytest.raises(ValueError, match="y: expected"):
        memory.push(torch.zeros(3, dtype=F64), torch.zeros(3, 1, dtype=F64))
    with pytest.raises(TypeError, match="s: is torch.float32"):
        memory.push(torch.zeros(3), torch.zeros(3, dtype=F64))
    with pytest.raises(TypeError, match="accept"):
        memory.push(torch.zeros(3, dtype=F64), torch.zeros(3, dtype=F64), torch.tensor([True]))
    with pytest.raises(ValueError, match="k: must be an int"):
        memory.drop_oldest(-1)
    with pytest.raises(TypeError, match="dtype"):
        PairMemory(2, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="v: expected a 1-D tensor of 3"):
        two_loop(memory, torch.zeros(2, dtype=F64))


# --- the two-loop recursion ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["identity", "scaling", "number", "diagonal"])
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 10),
    m=st.integers(1, 6),
    count=st.integers(0, 10),
)
def test_two_loop_equals_the_dense_bfgs_inverse(kind, seed, n, m, count):
    g = torch.Generator().manual_seed(seed)
    pairs = convex_pairs(n, count, g)
    memory = filled(m, n, pairs)
    kept = pairs[-m:] if pairs else []
    h0, H0 = h0_matrix(kind, kept, n, g)
    H = dense_bfgs_inverse(kept, H0)
    v = torch.randn(n, generator=g, dtype=F64)
    assert rel(two_loop(memory, v, h0), H @ v) < 1e-10
    if kept:  # the secant equation for the newest pair
        s, y = kept[-1]
        assert rel(two_loop(memory, y, h0), s) < 1e-10


def test_two_loop_ignores_stale_slots_after_clear_and_drop():
    g = torch.Generator().manual_seed(4)
    pairs = convex_pairs(5, 6, g)
    memory = filled(3, 5, pairs)
    v = torch.randn(5, generator=g, dtype=F64)
    memory.drop_oldest(2)
    assert (
        rel(
            two_loop(memory, v, "identity"),
            dense_bfgs_inverse(pairs[-1:], torch.eye(5, dtype=F64)) @ v,
        )
        < 1e-12
    )
    memory.clear()
    assert torch.equal(two_loop(memory, v, "scaling"), v)  # empty: "scaling" falls back to H0 = I
    d = torch.rand(5, generator=g, dtype=F64) + 0.5
    assert torch.equal(two_loop(memory, v, d), d * v)


def test_two_loop_in_float32_keeps_the_pairs_dtype():
    g = torch.Generator().manual_seed(5)
    pairs = convex_pairs(8, 3, g)
    memory = PairMemory(3, 8)
    for s, y in pairs:
        memory.push(s.float(), y.float())
    v = torch.randn(8, generator=g, dtype=F64)
    out = two_loop(memory, v.float(), "scaling")
    assert out.dtype == torch.float32
    s, y = pairs[-1]
    H = dense_bfgs_inverse(pairs, float((s @ y) / (y @ y)) * torch.eye(8, dtype=F64))
    assert rel(out.double(), H @ v) < 1e-5


@pytest.mark.parametrize(
    "h0, match", [("adagrad", "h0"), (-1.0, "h0"), (0.0, "h0"), (math.inf, "h0"), (True, "h0")]
)
def test_bad_initial_matrices(h0, match):
    with pytest.raises(ValueError, match=match):
        two_loop(PairMemory(2, 3, dtype=F64), torch.ones(3, dtype=F64), h0)


@pytest.mark.parametrize(
    "diagonal",
    [
        torch.tensor([1.0, 0.0, 2.0]),
        torch.tensor([1.0, -1.0, 2.0]),
        torch.tensor([1.0, math.nan, 2.0]),
        torch.ones(4),
        torch.ones(3, 3),
    ],
)
def test_non_positive_or_misshapen_diagonals_are_refused(diagonal):
    with pytest.raises(ValueError, match="h0"):
        two_loop(PairMemory(2, 3, dtype=F64), torch.ones(3, dtype=F64), diagonal.to(F64))


def test_the_hot_path_never_reads_a_tensor_on_the_host():
    g = torch.Generator().manual_seed(6)
    pairs = convex_pairs(7, 5, g)
    memory = PairMemory(3, 7, dtype=F64)
    scaling = DiagonalScaling(7, dtype=F64)
    v = torch.randn(7, generator=g, dtype=F64)
    with no_host_reads():
        for s, y in pairs:
            y_hat, damped = powell_damping(s, y, 2.0 * s)
            accept = curvature_condition(s, y_hat, 1e-8) & ~damped
            memory.push(s, y_hat, accept)
            scaling.update(y, torch.isfinite(y).all())
            for h0 in ("identity", "scaling", 0.5):
                two_loop(memory, v, h0)
            two_loop(memory, v, scaling.diagonal(), check=False)
            memory.clear(accept & False)
            memory.drop_oldest(accept.long() * 0)
            sr1_condition(s, y, 2.0 * s)
        memory.newest_scaling()
    with pytest.raises(HostRead):  # the guard itself works
        with no_host_reads():
            bool(torch.tensor(True))


# --- safeguards ------------------------------------------------------------------------------------------------------


def nextafter(x, toward):
    return math.nextafter(x, toward)


def test_curvature_skip_rules_fire_exactly_at_their_thresholds():
    s, y = (
        torch.ones(4, dtype=F64),
        torch.tensor([1.0, 0, 0, 0], dtype=F64),
    )  # sᵀy = 1, ‖s‖ = 2, ‖y‖ = 1, sᵀs = 4
    assert not curvature_condition(s, y, 0.5)  # sᵀy = ε‖s‖‖y‖: skipped (strict)
    assert curvature_condition(s, y, nextafter(0.5, 0))
    assert not curvature_condition(s, y, 0.25, rule="adaqn")  # sᵀy = ε sᵀs
    assert curvature_condition(s, y, nextafter(0.25, 0), rule="adaqn")
    assert not curvature_condition(7 * s, 3 * y, 0.5) and curvature_condition(
        7 * s, 3 * y, nextafter(0.5, 0)
    )  # scale-invariant
    assert curvature_condition(7 * s, 3 * y, 0.02, rule="adaqn") and not curvature_condition(
        7 * s, 3 * y, 0.12, rule="adaqn"
    )
    for eps in (0.0, 1e-8):
        for rule in ("cosine", "adaqn"):
            assert not curvature_condition(s, -y, eps, rule)  # negative curvature: never
            assert not curvature_condition(
                s, torch.zeros(4, dtype=F64), eps, rule
            )  # sᵀy = 0: never
            assert not curvature_condition(
                s, torch.tensor([math.inf, 0, 0, 0], dtype=F64), eps, rule
            )
            assert not curvature_condition(
                s, torch.tensor([math.nan, 1, 0, 0], dtype=F64), eps, rule
            )


def test_sr1_skip_rule_fires_exactly_at_its_threshold():
    s = torch.ones(4, dtype=F64)
    Bs = s.clone()  # B = I
    y = s + torch.tensor([1.0, 0, 0, 0], dtype=F64)  # w = y − Bs = e₁: |sᵀw| = 1, ‖s‖ = 2, ‖w‖ = 1
    assert sr1_condition(s, y, Bs, 0.5)  # equality is accepted (≥, Algorithm 1 line 26)
    assert not sr1_condition(s, y, Bs, nextafter(0.5, 1))
    assert not sr1_condition(s, Bs, Bs, 0.5)  # y = Bs: the update would be 0/0
    assert not sr1_condition(s, y, torch.full((4,), math.nan, dtype=F64))
    assert sr1_condition(s, 2 * s, Bs)  # negative or positive curvature alike: SR1 keeps it
    assert sr1_condition(s, -s, Bs)


@given(seed=st.integers(0, 2**31 - 1), n=st.integers(2, 8), scale=st.floats(-3.0, 3.0))
def test_powell_damping_makes_the_curvature_at_least_a_fifth_of_the_model_curvature(seed, n, scale):
    g = torch.Generator().manual_seed(seed)
    B = spd(n, g, 0.5, 5.0)
    s = torch.randn(n, generator=g, dtype=F64)
    y = scale * (B @ s) + 0.3 * torch.randn(n, generator=g, dtype=F64)
    y_hat, damped = powell_damping(s, y, B @ s)
    sBs = float(s @ B @ s)
    if float(s @ y) >= 0.2 * sBs:
        assert not damped and torch.equal(y_hat, y)
    else:
        assert damped
        assert float(s @ y_hat) >= 0.2 * sBs * (1 - 1e-12)
        assert float(s @ y_hat) == pytest.approx(0.2 * sBs, rel=1e-12)
        assert curvature_condition(s, y_hat, 0.0)


def test_powell_damping_on_the_boundary_and_with_errors():
    s, B = torch.ones(3, dtype=F64), torch.eye(3, dtype=F64)
    y = 0.2 * s  # sᵀy = 0.2 sᵀBs exactly: no damping needed
    y_hat, damped = powell_damping(s, y, B @ s)
    assert not damped and torch.equal(y_hat, y)
    with pytest.raises(ValueError, match="threshold"):
        powell_damping(s, y, s, threshold=1.0)
    with pytest.raises(ValueError, match="Bs"):
        powell_damping(s, y, torch.ones(4, dtype=F64))
    with pytest.raises(ValueError, match="epsilon"):
        curvature_condition(s, y, -1e-3)
    with pytest.raises(ValueError, match="rule"):
        curvature_condition(s, y, rule="angle")
    with pytest.raises(ValueError, match="r:"):
        sr1_condition(s, y, s, r=0.0)


# --- compact forms ---------------------------------------------------------------------------------------------------


@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(2, 9),
    k=st.integers(1, 5),
    gamma=st.sampled_from([0.5, 1.0, 3.0, -1.0]),
)
def test_compact_sr1_equals_the_recursive_update_for_general_pairs(seed, n, k, gamma):
    g = torch.Generator().manual_seed(seed)
    A = symmetric_indefinite(n, g)
    pairs = []
    for _ in range(k):  # general pairs: SᵀY is not symmetric
        s = torch.randn(n, generator=g, dtype=F64)
        pairs.append((s, A @ s + 0.5 * torch.randn(n, generator=g, dtype=F64)))
    B = gamma * torch.eye(n, dtype=F64)
    for s, y in pairs:  # every recursive update well defined
        w = y - B @ s
        assume(abs(float(w @ s)) > 1e-2 * float(w.norm() * s.norm()))
        B = B + torch.outer(w, w) / (w @ s)
    memory = filled(k, n, pairs)
    form = sr1_compact(memory, gamma, drop_singular=False) if k <= n else None
    assume(form is not None)
    assert rel(form.dense(), B) < 1e-9
    v = torch.randn(n, generator=g, dtype=F64)
    assert rel(form.mv(v), B @ v) < 1e-9
    s, y = pairs[-1]
    assert rel(form.mv(s), y) < 1e-9  # the secant equation for the newest pair


@given(seed=st.integers(0, 2**31 - 1), n=st.integers(3, 9), k=st.integers(1, 3))
def test_compact_sr1_satisfies_every_secant_equation_for_pairs_from_a_quadratic(seed, n, k):
    g = torch.Generator().manual_seed(seed)
    A = symmetric_indefinite(n, g)
    pairs = [(s, A @ s) for s in torch.randn(k, n, generator=g, dtype=F64)]
    try:
        form = sr1_compact(filled(k, n, pairs), 1.0, drop_singular=False)
    except (
        ValueError
    ):  # a (near-)singular middle matrix: the SR1 update of these pairs is not defined
        assume(False)
    assume(form.M_inv.abs().max() < 1e6 and torch.linalg.cond(form.M_inv) < 1e6)
    for s, y in pairs:
        assert rel(form.mv(s), y) < 1e-8
    torch.testing.assert_close(
        form.dense(), dense_sr1(pairs, torch.eye(n, dtype=F64)), rtol=1e-8, atol=1e-8
    )


def test_inverse_sr1_form_is_the_inverse_of_the_direct_form():
    g = torch.Generator().manual_seed(7)
    n, A = 7, symmetric_indefinite(7, g)
    pairs = [
        (s, A @ s + 0.2 * torch.randn(7, generator=g, dtype=F64))
        for s in torch.randn(3, n, generator=g, dtype=F64)
    ]
    B = sr1_compact(filled(3, n, pairs), 2.0)
    H = sr1_compact(filled(3, n, pairs), 0.5, inverse=True)
    torch.testing.assert_close(B.dense() @ H.dense(), torch.eye(n, dtype=F64), rtol=0, atol=1e-9)
    H_recursive = dense_sr1(
        [(y, s) for s, y in pairs], 0.5 * torch.eye(n, dtype=F64)
    )  # the dual update on (y, s)
    torch.testing.assert_close(H.dense(), H_recursive, rtol=1e-9, atol=1e-9)


def test_singular_middle_matrix_drops_the_oldest_pairs():
    g = torch.Generator().manual_seed(8)
    n, A = 6, symmetric_indefinite(6, g)
    pairs = [(s, A @ s) for s in torch.randn(3, n, generator=g, dtype=F64)]
    memory = filled(4, n, pairs + [pairs[0]])  # the oldest pair twice
    with pytest.raises(ValueError, match="singular"):
        sr1_compact(memory, 1.0, drop_singular=False)
    assert len(memory) == 4  # raising leaves the memory alone
    form = sr1_compact(memory, 1.0)
    assert form.dropped == 1 and len(memory) == 3 and form.k == 3
    expected = sr1_compact(filled(3, n, pairs[1:] + [pairs[0]]), 1.0)
    torch.testing.assert_close(form.dense(), expected.dense(), rtol=1e-10, atol=1e-10)
    # a pair in the span of the newer ones that makes M⁻¹ singular: y − γs = 0 gives a zero column of Ψ
    memory = filled(3, n, [(pairs[0][0], pairs[0][0])] + pairs[1:])
    form = sr1_compact(memory, 1.0)
    assert form.dropped == 1 and form.k == 2


@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(2, 9),
    k=st.integers(0, 4),
    gamma=st.sampled_from([0.7, 2.0, -1.5]),
)
def test_compact_spectrum_matches_a_dense_symmetric_eigensolver(seed, n, k, gamma):
    g = torch.Generator().manual_seed(seed)
    A = symmetric_indefinite(n, g)
    pairs = [
        (s, A @ s + 0.3 * torch.randn(n, generator=g, dtype=F64))
        for s in torch.randn(k, n, generator=g, dtype=F64)
    ]
    form = sr1_compact(filled(max(k, 1), n, pairs), gamma)
    B = form.dense()
    torch.testing.assert_close(
        form.eigenvalues(), torch.linalg.eigvalsh(B), rtol=1e-9, atol=1e-9 * float(B.abs().max())
    )
    values, P = form.eigh()
    assert P.shape == (n, form.k if form.k <= n else n)
    torch.testing.assert_close(P.T @ P, torch.eye(P.shape[1], dtype=F64), rtol=0, atol=1e-10)
    torch.testing.assert_close(B @ P, P * values, rtol=0, atol=1e-9 * float(B.abs().max()))


@pytest.mark.parametrize("kind", ["identity", "scaling", "number", "diagonal"])
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 8),
    m=st.integers(1, 4),
    count=st.integers(0, 6),
)
def test_compact_bfgs_is_the_inverse_of_the_two_loop_matrix(kind, seed, n, m, count):
    g = torch.Generator().manual_seed(seed)
    pairs = convex_pairs(n, count, g)
    memory = filled(m, n, pairs)
    kept = pairs[-m:] if pairs else []
    h0, H0 = h0_matrix(kind, kept, n, g)
    form = bfgs_compact(memory, h0)
    H = dense_bfgs_inverse(kept, H0)
    torch.testing.assert_close(form.dense() @ H, torch.eye(n, dtype=F64), rtol=0, atol=1e-9)
    v = torch.randn(n, generator=g, dtype=F64)
    assert rel(form.mv(two_loop(memory, v, h0)), v) < 1e-9
    if kept:
        s, y = kept[-1]
        assert rel(form.mv(s), y) < 1e-10  # B sₖ = yₖ
    if kind != "diagonal":
        torch.testing.assert_close(
            form.eigenvalues(), torch.linalg.eigvalsh(form.dense()), rtol=1e-9, atol=1e-9
        )
        assert bool((form.eigenvalues() > 0).all())  # BFGS stays positive definite


def test_compact_forms_with_an_empty_memory_and_bad_arguments():
    memory = PairMemory(3, 4, dtype=F64)
    v = torch.arange(4, dtype=F64)
    form = sr1_compact(memory, 2.5)
    assert (
        isinstance(form, CompactForm)
        and form.k == 0
        and form.Psi.shape == (4, 0)
        and form.M.shape == (0, 0)
    )
    assert torch.equal(form.mv(v), 2.5 * v)
    assert form.eigh()[0].numel() == 0 and torch.equal(
        form.eigenvalues(), torch.full((4,), 2.5, dtype=F64)
    )
    assert torch.equal(bfgs_compact(memory, "scaling").mv(v), v)
    with pytest.raises(ValueError, match="gamma"):
        sr1_compact(memory, 0.0)
    with pytest.raises(ValueError, match="gamma"):
        sr1_compact(memory, math.nan)
    with pytest.raises(ValueError, match="rcond"):
        sr1_compact(memory, 1.0, rcond=1.0)
    d = torch.rand(4, dtype=F64) + 0.5
    with pytest.raises(ValueError, match="gamma: the spectrum needs a scalar"):
        bfgs_compact(memory, d).eigh()


# --- the adaQN diagonal ----------------------------------------------------------------------------------------------


def test_adagrad_diagonal_accumulates_every_gradient_and_rmsprop_averages():
    g = torch.Generator().manual_seed(9)
    grads = torch.randn(5, 6, generator=g, dtype=F64)
    adagrad, rmsprop = (
        DiagonalScaling(6, dtype=F64, epsilon=1e-6),
        DiagonalScaling(6, "rmsprop", decay=0.9, dtype=F64),
    )
    average = torch.zeros(6, dtype=F64)
    for row in grads:
        adagrad.update(row)
        rmsprop.update(row)
        average = 0.9 * average + 0.1 * row**2
    # positive sums of 5 squares in two orders, a root and a reciprocal: a few ε relative, whatever the CPU's kernels
    torch.testing.assert_close(
        adagrad.diagonal(), 1 / torch.sqrt((grads**2).sum(0) + 1e-6), rtol=floor(1), atol=0
    )
    torch.testing.assert_close(
        rmsprop.diagonal(), 1 / torch.sqrt(average + 1e-8), rtol=floor(1), atol=0
    )
    adagrad.update(
        torch.full((6,), math.nan, dtype=F64), torch.tensor(False)
    )  # a skipped gradient leaves it alone
    torch.testing.assert_close(
        adagrad.diagonal(), 1 / torch.sqrt((grads**2).sum(0) + 1e-6), rtol=floor(1), atol=0
    )
    copy = DiagonalScaling(6, dtype=F64, epsilon=1e-6)
    copy.load_state_dict(adagrad.state_dict())
    assert torch.equal(copy.diagonal(), adagrad.diagonal())
    with pytest.raises(ValueError, match="kind"):
        DiagonalScaling(6, "adam")
    with pytest.raises(ValueError, match="epsilon"):
        DiagonalScaling(6, epsilon=0.0)
    with pytest.raises(ValueError, match="decay"):
        DiagonalScaling(6, "rmsprop", decay=1.0)
    with pytest.raises(ValueError, match="g: expected"):
        adagrad.update(torch.zeros(5, dtype=F64))


# --- resizing (a memory size steered between steps) ------------------------------------------------------------------


def indefinite_pairs(n, count, g):
    A = symmetric_indefinite(n, g)
    return [(s, A @ s) for s in torch.randn(count, n, generator=g, dtype=F64)]


@pytest.mark.parametrize("kind", ["identity", "scaling", "number", "diagonal"])
@given(
    seed=st.integers(0, 2**31 - 1),
    m=st.integers(1, 6),
    count=st.integers(0, 12),
    size=st.integers(1, 7),
)
def test_resize_keeps_the_newest_pairs_as_a_memory_built_from_them(kind, seed, m, count, size):
    n = 6
    g = torch.Generator().manual_seed(seed)
    pairs = convex_pairs(n, count, g)
    memory = filled(m, n, pairs)  # wrapped around when count > m
    memory.resize(size)
    kept = pairs[-min(m, size) :] if pairs else []
    fresh = filled(size, n, kept)
    assert (
        memory.size == size
        and len(memory) == len(kept)
        and memory.S.shape == (size, n)
        and memory.sy.shape == (size,)
    )
    S, Y = memory.pairs()
    assert torch.equal(S, fresh.pairs()[0]) and torch.equal(Y, fresh.pairs()[1])
    if (
        size != m
    ):  # reallocated: slots 0 … count−1 hold the kept pairs oldest first, exactly as in the fresh memory
        assert int(memory.head) == len(kept) % size
        assert all(
            torch.equal(a, b)
            for a, b in zip(memory.state_dict().values(), fresh.state_dict().values())
        )
    h0, H0 = h0_matrix(kind, kept, n, g)
    v = torch.randn(n, generator=g, dtype=F64)
    assert torch.equal(two_loop(memory, v, h0), two_loop(fresh, v, h0))  # bit for bit
    assert (
        rel(two_loop(memory, v, h0), dense_bfgs_inverse(kept, H0) @ v) < 1e-10
    )  # the float64 reference
    assert torch.equal(bfgs_compact(memory, h0).dense(), bfgs_compact(fresh, h0).dense())


@given(
    seed=st.integers(0, 2**31 - 1),
    m=st.integers(1, 5),
    count=st.integers(1, 9),
    size=st.integers(1, 4),
)
def test_resize_keeps_the_compact_sr1_form_of_the_newest_pairs(seed, m, count, size):
    n = 7  # more dimensions than pairs: M⁻¹ of generic pairs is nonsingular, nothing is dropped
    g = torch.Generator().manual_seed(seed)
    pairs = indefinite_pairs(n, count, g)
    memory = filled(m, n, pairs)
    memory.resize(size)
    kept = pairs[-min(m, size) :]
    form, fresh = sr1_compact(memory, 1.5), sr1_compact(filled(size, n, kept), 1.5)
    assert form.dropped == fresh.dropped == 0
    assert torch.equal(form.dense(), fresh.dense())
    B = dense_sr1(kept, 1.5 * torch.eye(n, dtype=F64))
    assert rel(form.dense(), B) < 1e-9


def test_grow_then_push_fills_the_new_slots_and_shrink_to_one_keeps_the_newest():
    g = torch.Generator().manual_seed(11)
    pairs = convex_pairs(4, 9, g)
    memory = filled(3, 4, pairs[:5])  # holds pairs 2, 3, 4, wrapped around (head = 2)
    assert int(memory.head) == 2
    memory.resize(5)
    assert torch.equal(memory.pairs()[0], torch.stack([s for s, _ in pairs[2:5]]))
    for s, y in pairs[5:7]:  # the two new slots
        memory.push(s, y)
    assert len(memory) == 5 and torch.equal(
        memory.pairs()[0], torch.stack([s for s, _ in pairs[2:7]])
    )
    memory.push(*pairs[7])  # full again: the oldest goes
    assert torch.equal(memory.pairs()[0], torch.stack([s for s, _ in pairs[3:8]]))
    memory.resize(1)
    (s,), (y,) = memory.pairs()
    assert torch.equal(s, pairs[7][0]) and torch.equal(y, pairs[7][1]) and int(memory.head) == 0
    memory.push(*pairs[8])
    assert torch.equal(memory.pairs()[0][0], pairs[8][0]) and len(memory) == 1
    v = torch.randn(4, generator=g, dtype=F64)
    assert torch.equal(two_loop(memory, v), two_loop(filled(1, 4, pairs[8:]), v))
    memory.clear()
    memory.resize(3)  # an empty memory stays empty
    assert len(memory) == 0 and torch.equal(memory.S, torch.zeros(3, 4, dtype=F64))


def test_resize_to_the_same_size_is_a_no_op_and_bad_sizes_change_nothing():
    g = torch.Generator().manual_seed(12)
    memory = filled(3, 4, convex_pairs(4, 5, g))
    buffers = (memory.S, memory.Y, memory.sy, memory.yy)
    before = memory.state_dict()
    memory.resize(3)
    assert all(
        a is b for a, b in zip(buffers, (memory.S, memory.Y, memory.sy, memory.yy))
    )  # not even reallocated
    assert all(torch.equal(before[k], v) for k, v in memory.state_dict().items())
    for size in (0, -3, 2.5, True, None):
        with pytest.raises(ValueError, match="size"):
            memory.resize(size)
    assert memory.size == 3 and all(
        torch.equal(before[k], v) for k, v in memory.state_dict().items()
    )


def test_resize_keeps_dtype_and_device_and_reads_nothing_on_the_host(device):
    g = torch.Generator().manual_seed(13)
    memory = PairMemory(4, 5, device=device)  # float32
    with no_host_reads():
        for s, y in convex_pairs(5, 6, g):
            memory.push(
                s.float().to(device), y.float().to(device), torch.tensor(True, device=device)
            )
        memory.resize(2)
        memory.resize(6)
        memory.push(torch.ones(5, device=device), torch.ones(5, device=device))
    assert memory.S.dtype == memory.Y.dtype == torch.float32 and memory.sy.dtype == torch.float64
    assert {
        t.device.type for t in (memory.S, memory.Y, memory.sy, memory.yy, memory.head, memory.count)
    } == {device.type}
    assert len(memory) == 3 and memory.size == 6


def test_a_state_saved_at_another_size_loads_after_a_resize_to_it():
    g = torch.Generator().manual_seed(14)
    memory = filled(5, 4, convex_pairs(4, 7, g))
    memory.resize(2)
    saved = memory.state_dict()
    restored = PairMemory(5, 4, dtype=F64)
    assert restored.saved_size(saved) == 2
    with pytest.raises(ValueError, match=r"state\['S'\]"):
        restored.load_state_dict(saved)  # loading itself never changes the size
    restored.resize(restored.saved_size(saved))
    restored.load_state_dict(saved)
    assert all(
        torch.equal(a, b)
        for a, b in zip(memory.state_dict().values(), restored.state_dict().values())
    )
    with pytest.raises(ValueError, match=r"state\['S'\]"):
        restored.saved_size({"S": torch.zeros(0, 4)})
