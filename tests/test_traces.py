"""qnwb.diagnostics.traces: HF traces against the optimizer's stats and dense spectra, quasi-Newton memory traces against
the optimizers' stats and hand computations, memory spectra against the explicit BFGS / SR1 recursions, figures, bad input."""

import copy
import math

import numpy as np
import pytest
import torch
from references import dense_sr1  # the dense SR1 recursion, one copy
from roundoff import floor
from torch import nn

from qnwb.core import flat_params, make_generator
from qnwb.curvature import GGN, Hessian
from qnwb.diagnostics.traces import (
    HFTrace,
    HFTraceRecorder,
    MemoryRecorder,
    MemoryTrace,
    average_memory_figure,
    extreme_eigenvalues,
    hf_trace,
    hf_trace_figure,
    memory_figure,
    memory_spectrum,
    memory_spectrum_figure,
    pair_curvatures,
)
from qnwb.init import esn_init_
from qnwb.models import MLP, TanhRNN
from qnwb.optim import LBFGS, LSR1, SQN, AdaQN, HessianFree
from qnwb.optim.memory import PairMemory, bfgs_compact
from qnwb.tasks import Addition

F64 = torch.float64


# -- problems ---------------------------------------------------------------------------------------------------------


def addition_rnn(seed=0, hidden=4, T=10):
    model = esn_init_(
        TanhRNN(2, hidden, 1, dtype=F64), input_scale=0.1, generator=make_generator(seed)
    )
    task = Addition(T)
    batches = [task.batch(24, make_generator(seed + 10 + k), dtype=F64) for k in range(8)]
    return model, batches


def regression(seed=0, n=120):
    """A small tanh network (units neither linear nor saturated) on a smooth regression problem."""
    g = make_generator(seed)
    X = torch.randn(n, 3, generator=g, dtype=F64)
    T = torch.tanh(X @ torch.randn(3, 2, generator=g, dtype=F64))
    torch.manual_seed(seed)
    return MLP([3, 5, 2], dtype=F64), X, T


def closure_for(optimizer, model, X, T):
    def closure():
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(X), T)
        loss.backward()
        return loss

    return closure


def random_pairs(k=4, n=7, seed=0, positive=True):
    """k pairs (s, y); y = A s for a random symmetric A (positive definite when `positive`), plus a small perturbation."""
    g = make_generator(seed)
    Q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))[0]
    eig = (
        torch.linspace(0.2, 5.0, n, dtype=F64)
        if positive
        else torch.linspace(-2.0, 5.0, n, dtype=F64)
    )
    A = Q @ torch.diag(eig) @ Q.T
    S = torch.randn(k, n, generator=g, dtype=F64)
    Y = S @ A + 0.05 * torch.randn(k, n, generator=g, dtype=F64)
    return S, Y


def memory_of(S, Y):
    memory = PairMemory(S.shape[0], S.shape[1], dtype=F64)
    for s, y in zip(S, Y):
        memory.push(s, y)
    return memory


def recursive_bfgs(S, Y, b0):
    """B by the BFGS recursion B ← B − BssᵀB/(sᵀBs) + yyᵀ/(yᵀs), oldest pair first, from b0·I."""
    B = b0 * torch.eye(S.shape[1], dtype=F64)
    for s, y in zip(S, Y):
        Bs = B @ s
        B = B - torch.outer(Bs, Bs) / (s @ Bs) + torch.outer(y, y) / (y @ s)
    return B


def eigvals(B):
    return torch.linalg.eigvalsh((B + B.T) / 2).numpy()


# -- memory spectra against the explicit recursions ---------------------------------------------------------------


@pytest.mark.parametrize(
    "h0, b0",
    [
        ("identity", lambda S, Y: 1.0),
        ("scaling", lambda S, Y: float(Y[-1] @ Y[-1] / (S[-1] @ Y[-1]))),
        (0.25, lambda S, Y: 4.0),
    ],
)
def test_bfgs_memory_eigenvalues_equal_the_dense_bfgs_recursion(h0, b0):
    S, Y = random_pairs(4, 7, seed=1)
    spectrum = memory_spectrum(memory_of(S, Y), kind="bfgs", h0=h0)
    B = recursive_bfgs(S, Y, b0(S, Y))
    np.testing.assert_allclose(spectrum.eigenvalues(), eigvals(B), rtol=1e-9, atol=1e-10)
    assert (
        spectrum.pairs == 4
        and spectrum.n == 7
        and spectrum.multiplicity == 7 - len(spectrum.values)
    )
    assert spectrum.gamma == pytest.approx(b0(S, Y))


@pytest.mark.parametrize("gamma", [1.0, 0.3, -0.5])
def test_sr1_memory_eigenvalues_equal_the_dense_sr1_recursion_indefinite_included(gamma):
    S, Y = random_pairs(3, 6, seed=2, positive=False)
    spectrum = memory_spectrum(memory_of(S, Y), kind="sr1", gamma=gamma)
    B = dense_sr1(zip(S, Y), gamma * torch.eye(S.shape[1], dtype=F64))
    np.testing.assert_allclose(spectrum.eigenvalues(), eigvals(B), rtol=1e-8, atol=1e-9)
    assert (eigvals(B) < 0).any()  # the test covers an indefinite SR1 matrix


def test_lbfgs_optimizer_spectrum_is_that_of_the_inverse_of_what_two_loop_applies():
    model, X, T = regression(3)
    opt = LBFGS(model, memory=4, line_search="strong_wolfe", full_batch=True)
    for _ in range(6):
        opt.step(closure_for(opt, model, X, T))
    S, Y = opt.memory.pairs()
    spectrum = memory_spectrum(opt)
    B = recursive_bfgs(
        S, Y, float(Y[-1] @ Y[-1] / (S[-1] @ Y[-1]))
    )  # h0="scaling": H0 = sᵀy/yᵀy of the newest pair
    np.testing.assert_allclose(spectrum.eigenvalues(), eigvals(B), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("method", ["trust_region", "line_search"])
def test_lsr1_optimizer_spectrum_is_b_for_both_methods(method):
    """Trust region: the form is B. Line search: the form is H (the inverse SR1 of the swapped pairs, from I/γ); by SR1's
    self-duality H⁻¹ is the SR1 B of the pairs from γI, so the probe's reciprocal eigenvalues must be that B's."""
    model, X, T = regression(4)
    gamma = 2.0
    opt = LSR1(model, memory=3, method=method, gamma=gamma, full_batch=True)
    for _ in range(7):
        opt.step(closure_for(opt, model, X, T))
    assert len(opt.memory) >= 2
    S, Y = opt.memory.pairs()
    spectrum = memory_spectrum(opt)
    B = dense_sr1(zip(S, Y), gamma * torch.eye(S.shape[1], dtype=F64))
    np.testing.assert_allclose(spectrum.eigenvalues(), eigvals(B), rtol=1e-6, atol=1e-8)
    assert spectrum.kind == "sr1" and spectrum.settings["inverse_form"] == (method == "line_search")


def test_a_diagonal_b0_falls_back_on_the_dense_matrix_up_to_dense_limit():
    model, X, T = regression(5)
    opt = AdaQN(model, lr=0.05, L=2, memory=3, fisher_memory=10)
    for _ in range(12):
        opt.step(closure_for(opt, model, X, T), monitor=lambda: nn.functional.mse_loss(model(X), T))
    assert len(opt.memory) > 0
    spectrum = memory_spectrum(opt)
    dense = bfgs_compact(opt.memory, opt.scaling.diagonal()).dense()
    np.testing.assert_allclose(spectrum.eigenvalues(), eigvals(dense), rtol=1e-9, atol=1e-12)
    assert (
        spectrum.multiplicity == 0
        and math.isnan(spectrum.gamma)
        and len(spectrum.values) == dense.shape[0]
    )
    with pytest.raises(ValueError, match="dense_limit"):
        memory_spectrum(opt, dense_limit=10)


def test_true_curvature_ritz_values_and_rayleigh_quotients_against_dense_float64():
    model, X, T = regression(6)
    opt = SQN(model, "squared_error", lr=0.1, L=2, memory=3, curvature="ggn")
    for _ in range(10):
        opt.step(closure_for(opt, model, X, T), curvature_batch=(X, T))
    G = GGN(model, "squared_error", (X, T))
    A = G.dense()
    spectrum = memory_spectrum(
        opt, G, lanczos_iterations=G.n
    )  # a full Lanczos run: every eigenvalue
    np.testing.assert_allclose(
        spectrum.curvature_values[[0, -1]], eigvals(A)[[0, -1]], rtol=1e-7, atol=1e-9
    )
    form = bfgs_compact(opt.memory, "scaling")
    values, vectors = form.eigh()
    np.testing.assert_allclose(
        spectrum.curvature_along,
        torch.einsum("ni,nm,mi->i", vectors, A, vectors).numpy(),
        rtol=1e-9,
        atol=1e-12,
    )
    np.testing.assert_allclose(spectrum.values, values.numpy(), rtol=1e-12)
    # a square matrix and a function work as the true curvature too
    again = memory_spectrum(opt, A, lanczos_iterations=G.n)
    np.testing.assert_allclose(
        again.curvature_along, spectrum.curvature_along, rtol=1e-9, atol=1e-12
    )
    function = memory_spectrum(opt, lambda v: A @ v, lanczos_iterations=G.n)
    np.testing.assert_allclose(
        function.curvature_values, again.curvature_values, rtol=1e-9, atol=1e-12
    )


def test_memory_spectrum_bad_input():
    S, Y = random_pairs(3, 5)
    memory = memory_of(S, Y)
    with pytest.raises(ValueError, match="kind"):
        memory_spectrum(memory)
    with pytest.raises(TypeError, match="source"):
        memory_spectrum(torch.eye(5))
    with pytest.raises(ValueError, match="curvature: the operator has dimension 4"):
        memory_spectrum(memory, torch.eye(4), kind="bfgs")
    with pytest.raises(ValueError, match="lanczos_iterations"):
        memory_spectrum(memory, kind="bfgs", lanczos_iterations=0)


# -- HF traces -----------------------------------------------------------------------------------------------------


def test_recorded_hf_trace_equals_the_optimizer_stats_step_by_step():
    model, batches = addition_rnn()
    hf = HessianFree(
        model, "squared_error", damping=2.0, structural_damping=0.2, cg_max_iterations=8
    )
    recorder = HFTraceRecorder(hf)
    published = []
    for batch in batches[:5]:
        hf.step(batch)
        published.append(dict(hf.stats))
        recorder.after_step(batch)
    trace = recorder.trace()
    assert len(trace) == 5
    for name in (
        "step",
        "loss",
        "loss_after",
        "rho",
        "damping",
        "next_damping",
        "structural_weight",
        "cg_iterations",
        "chosen_iterate",
        "step_size",
        "line_search_tries",
        "model_reduction_undamped",
        "curvature_products",
    ):
        assert getattr(trace, name).tolist() == [s[name] for s in published], name
    assert trace.cg_stop.tolist() == [s["cg_stop"] for s in published]
    assert trace.batch_size.tolist() == [24] * 5 and trace.curvature_batch_size.tolist() == [24] * 5
    np.testing.assert_allclose(trace.structural_weight, trace.damping * 0.2, rtol=1e-12)
    # the Levenberg–Marquardt chain: each step's λ is the previous step's next λ
    assert trace.damping[1:].tolist() == trace.next_damping[:-1].tolist()
    assert trace.spectrum_step.size == 0 and trace.settings["structural_damping"] == 0.2


def test_spectrum_is_the_curvature_batch_ggn_at_the_step_s_starting_point_against_dense():
    model, batches = addition_rnn(1)
    twin = copy.deepcopy(model)
    curvature_batches = [(x[:12], t[:12]) for x, t in batches]
    n = sum(p.numel() for p in model.parameters())
    hf = HessianFree(model, "squared_error", damping=1.0, cg_max_iterations=6)
    trace = hf_trace(
        hf,
        batches,
        5,
        curvature_batches=curvature_batches,
        spectrum_every=2,
        lanczos_iterations=n,
        seed=7,
    )
    assert trace.spectrum_step.tolist() == [1, 3, 5]
    assert trace.curvature_batch_size.tolist() == [12] * 5 and trace.batch_size.tolist() == [24] * 5
    # replay on the twin: the dense GGN on the curvature batch at θ_{k−1}, before step k
    hf2 = HessianFree(twin, "squared_error", damping=1.0, cg_max_iterations=6)
    expected = {}
    for k in range(5):
        if k % 2 == 0:
            values = eigvals(GGN(twin, "squared_error", curvature_batches[k]).dense())
            expected[k + 1] = (values[0], values[-1])
        hf2.step(batches[k], curvature_batches[k])
    assert torch.equal(flat_params(twin), flat_params(model))  # the probe does not disturb the run
    np.testing.assert_allclose(trace.lambda_max, [expected[k][1] for k in (1, 3, 5)], rtol=1e-8)
    np.testing.assert_allclose(
        trace.lambda_min, [expected[k][0] for k in (1, 3, 5)], rtol=1e-5, atol=1e-9
    )
    assert trace.settings["lanczos_seed"] == 7 and trace.lanczos_products.tolist() == [n] * 3


def test_hessian_curvature_spectrum_uses_the_hessian():
    model, batches = addition_rnn(2)
    n = sum(p.numel() for p in model.parameters())
    H = Hessian(model, "squared_error", batches[0]).dense()
    hf = HessianFree(model, "squared_error", curvature="hessian", cg_max_iterations=4)
    trace = hf_trace(hf, batches[0], 1, spectrum_every=1, lanczos_iterations=n)
    np.testing.assert_allclose(
        [trace.lambda_min[0], trace.lambda_max[0]], eigvals(H)[[0, -1]], rtol=1e-6, atol=1e-9
    )


def test_extreme_eigenvalues_of_a_known_matrix():
    e = extreme_eigenvalues(torch.diag(torch.tensor([-1.0, 0.5, 3.0], dtype=F64)), 3)
    assert (
        e["lambda_min"] == pytest.approx(-1.0)
        and e["lambda_max"] == pytest.approx(3.0)
        and e["lambda_max_residual"] < 1e-10
    )


def test_hf_recorder_bad_input():
    model, batches = addition_rnn()
    hf = HessianFree(model, "squared_error", cg_max_iterations=3)
    with pytest.raises(TypeError, match="optimizer"):
        HFTraceRecorder(LBFGS(model))
    with pytest.raises(ValueError, match="spectrum_every"):
        HFTraceRecorder(hf, spectrum_every=0)
    with pytest.raises(ValueError, match="lanczos_iterations"):
        HFTraceRecorder(hf, lanczos_iterations=0)
    recorder = HFTraceRecorder(hf)
    with pytest.raises(ValueError, match="no stats yet"):
        recorder.after_step()
    recorder.step(batches[0])
    with pytest.raises(ValueError, match="recorded already"):
        recorder.after_step()
    with pytest.raises(ValueError, match="steps"):
        hf_trace(hf, lambda k: batches[0])
    with pytest.raises(ValueError, match="steps"):
        hf_trace(hf, batches, 0)
    with pytest.raises(ValueError, match="ran out after 2 batches"):
        hf_trace(hf, iter(batches[:2]), 3)
    with pytest.raises(TypeError, match="batches"):
        hf_trace(hf, 3, 1)


# -- quasi-Newton memory traces ------------------------------------------------------------------------------------


def test_lbfgs_memory_trace_equals_stats_and_forgetting_zeroes_the_memory_used():
    model, X, T = regression(7)
    opt = LBFGS(model, memory=3, line_search="armijo", forget_every=4)
    recorder = MemoryRecorder(opt, steps_per_epoch=3)
    published, held = [], []
    for _ in range(10):
        recorder.step(closure_for(opt, model, X, T))
        published.append(dict(opt.stats))
        held.append(pair_curvatures(opt.memory))
    trace = recorder.trace()
    for name in (
        "step",
        "loss",
        "memory_size",
        "pair_stored",
        "pair_skipped",
        "pairs_stored",
        "pairs_skipped",
        "step_size",
        "forgot",
    ):
        assert getattr(trace, name).tolist() == [s[name] for s in published], name
    assert trace.epoch.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]
    # memory used: what was held after the previous step, none at the start and none where the memory was forgotten
    expected = [0] + trace.memory_size[:-1].tolist()
    expected = [0 if f else m for m, f in zip(expected, trace.forgot)]
    assert (
        trace.memory_used.tolist() == expected
        and trace.forgot.tolist()[4]
        and trace.forgot.tolist()[8]
    )
    # the held pairs' curvature, NaN-padded to the capacity; the new pair is the newest one held
    for row, h in zip(trace.held_curvature, held):
        np.testing.assert_array_equal(row[: len(h)], h)
        assert np.isnan(row[len(h) :]).all()
    stored = trace.pair_stored
    np.testing.assert_array_equal(
        trace.new_pair_curvature[stored], [h[-1] for h, s in zip(held, stored) if s]
    )
    assert (
        np.isnan(trace.new_pair_curvature[~stored]).all()
        and (trace.new_pair_curvature[stored] > 0).all()
    )
    assert trace.capacity == 3 and trace.settings["forget_every"] == 4


def test_a_memory_resized_during_the_recording_pads_the_held_curvatures_to_the_largest_size():
    model, X, T = regression(7)
    opt = LBFGS(model, memory=3, line_search="armijo")
    recorder = MemoryRecorder(opt)
    sizes = []
    for k in range(9):
        if k in (3, 6):
            opt.param_groups[0]["memory"] = {3: 1, 6: 4}[
                k
            ]  # steered between steps, as a dashboard does
        recorder.step(closure_for(opt, model, X, T))
        sizes.append(opt.stats["memory_size"])
    trace = recorder.trace()
    assert trace.capacity == 4 and trace.held_curvature.shape == (9, 4)
    assert np.isfinite(trace.held_curvature).sum(1).tolist() == sizes == trace.memory_size.tolist()
    assert max(sizes[3:6]) == 1


def test_average_memory_per_epoch_is_the_mean_of_the_pairs_each_step_used_by_hand():
    model, X, T = regression(8)
    opt = LBFGS(model, memory=2, line_search="armijo")
    recorder = MemoryRecorder(opt, steps_per_epoch=4)
    sizes = []
    for _ in range(10):
        sizes.append(len(opt.memory))  # the pairs the coming step's direction will use
        recorder.step(closure_for(opt, model, X, T))
    epochs, averages = recorder.trace().average_memory()
    assert epochs.tolist() == [0, 1, 2]
    hand = [sum(sizes[0:4]) / 4, sum(sizes[4:8]) / 4, sum(sizes[8:10]) / 2]
    assert averages.tolist() == pytest.approx(hand, abs=0) and sizes[:3] == [0, 1, 2]


def test_average_memory_per_epoch_equals_adaqn_s_own_running_mean():
    model, X, T = regression(9)
    opt = AdaQN(model, lr=0.05, L=2, memory=3, fisher_memory=10)
    recorder = MemoryRecorder(opt)
    own, published = [], []
    for _ in range(3):
        opt.new_epoch()
        recorder.new_epoch()
        for b in range(6):
            rows = slice(20 * b, 20 * b + 20)
            recorder.step(
                closure_for(opt, model, X[rows], T[rows]),
                monitor=lambda: nn.functional.mse_loss(model(X), T),
            )
            published.append(dict(opt.stats))
        own.append(opt.stats["memory_average"])
    trace = recorder.trace()
    np.testing.assert_allclose(trace.average_memory()[1], own, rtol=1e-15)
    assert (
        trace.pairs_stored[-1] > 0
        and trace.pair_formed.sum() == trace.pairs_stored[-1] + trace.pairs_skipped[-1]
    )
    assert trace.rejections.tolist() == [
        s["rejections"] for s in published
    ]  # adaQN's own cumulative counter
    assert trace.rejected.tolist() == [bool(s["rejected"]) for s in published]
    assert trace.pair_formed.tolist() == [bool(s["pair_formed"]) for s in published]


def test_lsr1_trace_has_radius_rho_rejections_and_the_skipped_ratio():
    model, X, T = regression(10)
    opt = LSR1(model, memory=3, full_batch=True, radius=0.5)
    recorder = MemoryRecorder(opt)
    published = []
    for _ in range(8):
        recorder.step(closure_for(opt, model, X, T))
        published.append(dict(opt.stats))
    trace = recorder.trace()
    for name in ("radius", "radius_after", "rho", "pairs_dropped", "pairs_stored", "pairs_skipped"):
        assert getattr(trace, name).tolist() == pytest.approx(
            [s[name] for s in published], nan_ok=True
        ), name
    assert trace.rejected.tolist() == [not s["accepted"] for s in published]
    assert trace.radius[0] == 0.5 and trace.radius[1:].tolist() == trace.radius_after[:-1].tolist()
    offered = trace.pairs_stored + trace.pairs_skipped
    np.testing.assert_allclose(trace.skipped_ratio(), trace.pairs_skipped / offered)


def synthetic_memory_trace(optimizer="LSR1"):
    T = 4
    return MemoryTrace(
        optimizer=optimizer,
        capacity=2,
        step=np.arange(1, T + 1),
        epoch=np.array([0, 0, 1, 1]),
        loss=np.ones(T),
        memory_used=np.array([0, 1, 2, 2]),
        memory_size=np.array([1, 2, 2, 1]),
        pair_formed=np.array([True, True, True, True]),
        pair_stored=np.array([True, True, False, True]),
        pair_skipped=np.array([False, False, True, False]),
        pairs_stored=np.array([1, 2, 2, 3]),
        pairs_skipped=np.array([0, 0, 1, 1]),
        pairs_dropped=np.array([0, 0, 0, 1]),
        rejected=np.array([False, True, False, False]),
        rejections=np.array([0, 1, 1, 1]),
        forgot=np.zeros(T, dtype=bool),
        sy=np.array([1.0, 2.0, -1.0, 0.5]),
        new_pair_curvature=np.array([1.0, 2.0, np.nan, 0.5]),
        held_curvature=np.array([[1.0, np.nan], [1.0, 2.0], [1.0, 2.0], [0.5, np.nan]]),
        step_size=np.ones(T),
        radius=np.array([1.0, 2.0, 1.0, 0.5]),
        radius_after=np.array([2.0, 1.0, 0.5, 0.5]),
        rho=np.array([0.9, -np.inf, 0.05, 0.5]),
    )


def test_skipped_ratio_and_average_memory_by_hand_on_a_synthetic_trace():
    trace = synthetic_memory_trace()
    np.testing.assert_allclose(trace.skipped_ratio(), [0, 0, 1 / 3, 1 / 4])
    assert trace.average_memory()[1].tolist() == [0.5, 2.0]


def test_memory_recorder_bad_input():
    model, X, T = regression()
    with pytest.raises(TypeError, match="optimizer"):
        MemoryRecorder(HessianFree(model, "squared_error"))
    opt = LBFGS(model)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        MemoryRecorder(opt, steps_per_epoch=0)
    recorder = MemoryRecorder(opt)
    with pytest.raises(ValueError, match="no stats yet"):
        recorder.observe()
    recorder.step(closure_for(opt, model, X, T))
    with pytest.raises(ValueError, match="recorded already"):
        recorder.observe()
    with pytest.raises(TypeError, match="memory"):
        pair_curvatures(opt)


# -- figures -------------------------------------------------------------------------------------------------------


def synthetic_hf_trace():
    T = 4
    ints = lambda *v: np.array(v, dtype=np.int64)
    return HFTrace(
        step=ints(1, 2, 3, 4),
        loss=np.array([2.0, 1.5, 1.4, 1.0]),
        loss_after=np.array([1.5, 1.4, 1.4, 0.9]),
        rho=np.array([0.9, 0.5, -np.inf, np.nan]),
        damping=np.array([1.0, 2 / 3, 2 / 3, 1.0]),
        next_damping=np.array([2 / 3, 2 / 3, 1.0, 1.5]),
        structural_weight=np.array([0.1, 0.2 / 3, 0.2 / 3, 0.1]),
        lr=np.ones(T),
        cg_iterations=ints(10, 20, 20, 5),
        cg_stop=np.array(["progress", "max_iterations", "max_iterations", "negative_curvature"]),
        chosen_iterate=ints(10, 13, 20, 5),
        step_size=np.array([1.0, 1.0, 0.0, 0.8]),
        line_search_tries=ints(0, 0, 60, 1),
        model_reduction_undamped=-np.ones(T),
        model_reduction_damped=-np.ones(T),
        curvature_products=ints(11, 21, 21, 6),
        batch_size=ints(8, 8, 8, 8),
        curvature_batch_size=ints(4, 4, 4, 4),
        spectrum_step=ints(1, 3),
        lambda_max=np.array([30.0, 40.0]),
        lambda_min=np.array([1e-3, -1e-4]),
        lambda_max_residual=np.zeros(2),
        lambda_min_residual=np.zeros(2),
        lanczos_products=ints(5, 5),
    )


def test_hf_trace_figure_draws_every_series_with_gaps_for_what_a_log_axis_cannot_show():
    figure = hf_trace_figure(synthetic_hf_trace())
    by_name = {t.name: t for t in figure.data}
    assert list(by_name["ρ"].y) == [0.9, 0.5, None, None]
    assert list(by_name["λ"].y) == pytest.approx([1.0, 2 / 3, 2 / 3, 1.0])
    assert list(by_name["λμ"].y) == pytest.approx([0.1, 0.2 / 3, 0.2 / 3, 0.1])
    assert list(by_name["λ_max estimate"].x) == [1, 3] and list(by_name["λ_max estimate"].y) == [
        30.0,
        40.0,
    ]
    assert (
        list(by_name["λ_min estimate"].y) == [1e-3, None]
        and list(by_name["λ_min estimate"].customdata)[1] == "-0.0001"
    )
    assert (list(by_name["CG: progress"].x), list(by_name["CG: progress"].y)) == ([1], [10])
    assert (list(by_name["CG: max_iterations"].x), list(by_name["CG: max_iterations"].y)) == (
        [2, 3],
        [20, 20],
    )
    assert list(by_name["CG: negative_curvature"].y) == [5]
    assert list(by_name["chosen iterate"].y) == [10, 13, 20, 5] and list(
        by_name["last CG iterate"].y
    ) == [10, 20, 20, 5]
    assert figure.layout.yaxis3.type == "log" and figure.layout.xaxis5.title.text == "HF step k"
    assert all(t.hovertemplate for t in figure.data)
    no_structural = synthetic_hf_trace()
    no_structural.structural_weight[:] = 0
    assert "λμ" not in {t.name for t in hf_trace_figure(no_structural).data}


def test_memory_figure_traces_for_lsr1_and_lbfgs():
    trace = synthetic_memory_trace("LSR1")
    figure = memory_figure(trace)
    by_name = {t.name: t for t in figure.data}
    assert list(by_name) == [
        "pairs used by the step",
        "pairs held after",
        "pairs stored",
        "pairs skipped",
        "pairs rejected",
        "pairs dropped",
        "pairs held",
        "new pair",
        "skipped fraction",
        "Δ",
    ]
    assert list(by_name["pairs held"].x) == [1, 2, 2, 3, 3, 4] and list(
        by_name["pairs held"].y
    ) == [1.0, 1.0, 2.0, 1.0, 2.0, 0.5]
    assert list(by_name["pairs held"].customdata) == [0, 0, 1, 0, 1, 0]
    assert list(by_name["new pair"].x) == [1, 2, 4] and list(by_name["new pair"].y) == [
        1.0,
        2.0,
        0.5,
    ]
    assert list(by_name["skipped fraction"].y) == pytest.approx([0, 0, 1 / 3, 1 / 4])
    assert list(by_name["Δ"].y) == [1.0, 2.0, 1.0, 0.5]
    lbfgs = synthetic_memory_trace("LBFGS")
    lbfgs.radius[:] = np.nan
    lbfgs.rejections[:] = 0
    lbfgs.pairs_dropped[:] = 0
    names = [t.name for t in memory_figure(lbfgs).data]
    assert names == [
        "pairs used by the step",
        "pairs held after",
        "pairs stored",
        "pairs skipped",
        "pairs held",
        "new pair",
    ]


def test_average_memory_figure_one_line_per_run():
    figure = average_memory_figure(
        {"a": synthetic_memory_trace(), "b": synthetic_memory_trace("LBFGS")}
    )
    assert [t.name for t in figure.data] == ["a", "b"]
    assert list(figure.data[0].x) == [1, 2] and list(figure.data[0].y) == [0.5, 2.0]
    assert figure.layout.xaxis.title.text == "epoch"
    with pytest.raises(ValueError, match="traces"):
        average_memory_figure({})


def test_memory_spectrum_figure_traces_and_log_axis_checks():
    S, Y = random_pairs(3, 8, seed=3)
    A = torch.diag(torch.linspace(0.5, 4.0, 8, dtype=F64))
    spectrum = memory_spectrum(memory_of(S, Y), A, kind="bfgs", lanczos_iterations=8)
    assert spectrum.multiplicity == 2
    figure = memory_spectrum_figure(spectrum)
    by_name = {t.name: t for t in figure.data}
    assert list(by_name["memory B"].x) == spectrum.values.tolist()
    assert list(by_name[f"γ (× {spectrum.multiplicity})"].x) == [spectrum.gamma]
    np.testing.assert_allclose(
        list(by_name["true curvature (Ritz values)"].x), np.linspace(0.5, 4.0, 8), rtol=1e-10
    )
    assert list(by_name["uᵢᵀAuᵢ vs B's eigenvalue"].y) == spectrum.curvature_along.tolist()
    assert figure.layout.xaxis.type == "log"
    sr1 = memory_spectrum(
        memory_of(*random_pairs(3, 6, seed=2, positive=False)), kind="sr1", gamma=-0.5
    )
    assert memory_spectrum_figure(sr1).layout.xaxis.type == "linear"
    with pytest.raises(ValueError, match="log"):
        memory_spectrum_figure(sr1, log=True)
    with pytest.raises(TypeError, match="spectrum"):
        memory_spectrum_figure(synthetic_memory_trace())


def test_figures_refuse_empty_or_wrong_traces():
    empty = MemoryRecorder(LBFGS(regression()[0])).trace()
    with pytest.raises(ValueError, match="no steps"):
        memory_figure(empty)
    with pytest.raises(TypeError, match="trace"):
        hf_trace_figure(synthetic_memory_trace())
    model, _ = addition_rnn()
    with pytest.raises(ValueError, match="no steps"):
        hf_trace_figure(HFTraceRecorder(HessianFree(model, "squared_error")).trace())


def test_pair_curvatures_are_s_y_over_s_s_of_the_pairs_held_oldest_first_after_wrapping():
    S, Y = random_pairs(5, 6, seed=4)
    memory = PairMemory(3, 6, dtype=F64)
    for s, y in zip(S, Y):
        memory.push(s, y)
    held_S, held_Y = S[2:], Y[2:]  # the ring kept the three newest
    expected = [float(s @ y / (s @ s)) for s, y in zip(held_S, held_Y)]
    # sᵀy summed in two orders (a row reduction and a dot product): round-off of Σ|sᵢyᵢ|/sᵀs, even where sᵀy cancels
    scale = (held_S.abs() * held_Y.abs()).sum(1) / (held_S * held_S).sum(1)
    np.testing.assert_allclose(pair_curvatures(memory), expected, rtol=0, atol=floor(scale))


def test_skipped_pairs_count_as_offered_and_enter_the_skipped_ratio():
    model, X, T = regression(11)
    opt = LBFGS(
        model, memory=3, line_search="armijo", curvature_skip=0.9
    )  # cosine rule: most pairs fail sᵀy > 0.9‖s‖‖y‖
    recorder = MemoryRecorder(opt)
    for _ in range(8):
        recorder.step(closure_for(opt, model, X, T))
    trace = recorder.trace()
    assert trace.pair_skipped.any() and trace.pair_stored.any()
    assert trace.pair_formed.tolist() == (trace.pair_stored | trace.pair_skipped).tolist()
    assert trace.skipped_ratio()[-1] == pytest.approx(
        trace.pair_skipped.sum() / trace.pair_formed.sum()
    )
    assert np.isnan(trace.new_pair_curvature[trace.pair_skipped]).all()
