"""qnwb.optim.adaqn.SQN: pairs from averaged iterates, y from the curvature engine at the average, schedule, state, safety."""
import copy

import pytest
import torch
from host_reads import no_host_reads
from torch import nn

from qnwb.core import flat_grads, flat_params, make_generator
from qnwb.curvature import GGN
from qnwb.init import esn_init_
from qnwb.models import MLP, TanhRNN
from qnwb.optim.adaqn import SQN
from qnwb.optim.memory import two_loop
from qnwb.tasks import Addition

F64 = torch.float64


def regression(seed=0, n=300, d=5, model=None):
    g = make_generator(seed)
    X = torch.randn(n, d, generator=g, dtype=F64)
    Y = torch.tanh(X @ torch.randn(d, 2, generator=g, dtype=F64)) + 0.05 * torch.randn(n, 2, generator=g, dtype=F64)
    torch.manual_seed(seed)
    return (model or nn.Linear(d, 2, dtype=F64)), X, Y


def closure_for(optimizer, model, X, Y):
    def closure():
        optimizer.zero_grad()
        value = optimizer.loss(model(X), Y)
        value.backward()
        return value
    return closure


def run(optimizer, model, X, Y, steps, generator, curvature_rows=100, record=None, batch=25):
    """Mini-batches of `batch` cases; the curvature batch is the first `curvature_rows` cases."""
    for _ in range(steps):
        rows = torch.randperm(len(X), generator=generator)[:batch]
        if record is not None:
            record.append(flat_params(model).clone())
        optimizer.step(closure_for(optimizer, model, X[rows], Y[rows]), (X[:curvature_rows], Y[:curvature_rows]))


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_pairs_come_from_averaged_iterates_and_y_is_the_exact_curvature_product(curvature):
    model, X, Y = regression(1)
    L = 3
    sqn = SQN(model, "squared_error", lr=0.05, memory=10, L=L, curvature=curvature)
    iterates = []
    run(sqn, model, X, Y, 5 * L, make_generator(2), record=iterates)
    averages = [torch.stack(iterates[c * L : (c + 1) * L]).mean(0) for c in range(5)]
    S, Ys = sqn.memory.pairs()
    expected_s = torch.stack([b - a for a, b in zip(averages, averages[1:])])
    torch.testing.assert_close(S, expected_s, rtol=1e-12, atol=1e-14)
    design = X[:100]  # ½‖Wx + b − t‖² averaged over the curvature batch: H is the same for the Hessian and the GGN
    for s, y in zip(S, Ys):
        weight_s, bias_s = s[:10].view(2, 5), s[10:]  # the weight (2 × 5, row-major), then the bias
        expected = torch.cat([(weight_s @ design.T @ design / 100 + bias_s[:, None] * design.mean(0)).reshape(-1),
                              weight_s @ design.mean(0) + bias_s])
        torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-12)


def test_y_matches_a_finite_difference_of_gradients_at_the_average():
    model, X, Y = regression(3, model=MLP([5, 6, 2], dtype=F64))
    L = 4
    sqn = SQN(model, "squared_error", lr=0.1, memory=5, L=L)
    iterates = []
    run(sqn, model, X, Y, 2 * L, make_generator(4), record=iterates)
    average = torch.stack(iterates[L:]).mean(0)
    (s,), (y,) = sqn.memory.pairs()
    probe = copy.deepcopy(model)

    def gradient_at(w):
        torch.nn.utils.vector_to_parameters(w, probe.parameters())
        probe.zero_grad()
        sqn.loss(probe(X[:100]), Y[:100]).backward()
        return flat_grads(probe).clone()

    h = 1e-4 / float(s.norm())
    difference = (gradient_at(average + h * s) - gradient_at(average - h * s)) / (2 * h)
    assert float((y - difference).norm() / difference.norm()) < 1e-6
    at_the_current_point = GGN(model, "squared_error", (X[:100], Y[:100])).mv(s)  # not where y is measured
    assert float((y - at_the_current_point).norm() / y.norm()) > 1e-3


def test_the_curvature_product_leaves_the_step_bit_for_bit():
    model, X, Y = regression(5)
    sqn = SQN(model, "squared_error", lr=0.05, memory=4, L=2)
    generator = make_generator(6)
    run(sqn, model, X, Y, 5, generator)
    assert sqn.stats["memory_size"] == 1
    memory = copy.deepcopy(sqn.memory)
    rows = torch.randperm(len(X), generator=generator)[:25]
    theta = flat_params(model).clone()
    closure = closure_for(sqn, model, X[rows], Y[rows])
    closure()
    expected = torch.add(theta, two_loop(memory, flat_grads(model).clone(), "scaling"), alpha=-0.05)
    sqn.step(closure, (X[:100], Y[:100]))  # step 6 forms a pair
    assert sqn.stats["pair_formed"] == 1 and sqn.stats["memory_size"] == 2
    assert torch.equal(flat_params(model), expected)


def test_a_pair_every_L_steps_and_sgd_steps_until_the_first():
    model, X, Y = regression(7)
    sqn = SQN(model, "squared_error", lr=0.05, memory=2, L=3)
    generator, sizes, formed = make_generator(8), [], []
    for k in range(12):
        rows = torch.randperm(len(X), generator=generator)[:25]
        theta = flat_params(model).clone()
        closure = closure_for(sqn, model, X[rows], Y[rows])
        if k < 6:  # no pair before the end of the second cycle (step 2L): plain SGD steps
            closure()
            sgd = theta - 0.05 * flat_grads(model)
        sqn.step(closure, (X[:100], Y[:100]))
        if k < 6:
            torch.testing.assert_close(flat_params(model), sgd, rtol=0, atol=1e-15)
        sizes.append(sqn.stats["memory_size"])
        formed.append(sqn.stats["pair_formed"])
    assert formed == [0, 0, 0, 0, 0, 1, 0, 0, 1, 0, 0, 1]
    assert sizes == [0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2]  # m = 2: the third pair replaces the first
    assert sqn.stats["cycles"] == 4 and sqn.stats["total_curvature_products"] == 3
    assert sqn.stats["total_function_evaluations"] == 12


def test_a_skipped_pair_still_advances_the_previous_average():
    model, X, Y = regression(9)
    sqn = SQN(model, "squared_error", lr=0.05, L=2, curvature_skip=1.0)  # cos(s, y) > 1 never holds: every pair skipped
    iterates = []
    run(sqn, model, X, Y, 6, make_generator(10), record=iterates)
    assert sqn.stats["pairs_skipped"] == 2 and sqn.stats["memory_size"] == 0 and sqn.stats["pair_skipped"] is True
    state = sqn.state[model.weight]
    torch.testing.assert_close(state["previous_average"], torch.stack(iterates[4:6]).mean(0), rtol=1e-14, atol=0)


def test_curvature_batch_is_needed_only_when_a_pair_is_formed_and_drawn_only_then():
    model, X, Y = regression(11)
    sqn = SQN(model, "squared_error", lr=0.05, L=2)
    draws = []

    def draw():
        draws.append(len(draws))
        return X[:50], Y[:50]

    closure = closure_for(sqn, model, X[:25], Y[:25])
    for _ in range(3):
        sqn.step(closure, draw)
    assert draws == []  # steps 1–3 form no pair
    with pytest.raises(ValueError, match="curvature_batch"):
        sqn.step(closure)  # step 4 does
    assert sqn.state[model.weight]["step"] == 3
    sqn.step(closure, draw)
    assert draws == [0] and sqn.stats["pair_formed"] == 1


def test_steps_between_pairs_never_read_a_tensor_on_the_host():
    model, X, Y = regression(12)
    sqn = SQN(model, "squared_error", lr=0.05, L=3)
    generator = make_generator(13)
    run(sqn, model, X, Y, 6, generator)  # memory holds a pair now
    closure = closure_for(sqn, model, X[:25], Y[:25])
    with no_host_reads():
        sqn.step(closure)  # steps 7 and 8 form no pair
        sqn.step(closure)
    assert sqn.stats["step"] == 8


def test_a_non_finite_gradient_never_reaches_the_parameters():
    model, X, Y = regression(14)
    sqn = SQN(model, "squared_error", lr=0.05, L=5)
    before = flat_params(model).clone()

    def bad():
        sqn.zero_grad()
        value = sqn.loss(model(X[:10]), Y[:10]) * float("inf")
        value.backward()
        return value

    sqn.step(bad)
    assert torch.equal(flat_params(model), before) and sqn.stats["non_finite"] is True and sqn.stats["step_size"] == 0.0


def test_sqn_reduces_a_logistic_regression_loss():
    g = make_generator(15)
    X = torch.randn(400, 6, generator=g, dtype=F64)
    Y = (torch.rand(400, 1, generator=g, dtype=F64) < torch.sigmoid(2 * X @ torch.randn(6, 1, generator=g, dtype=F64))).to(F64)
    torch.manual_seed(15)
    model = nn.Linear(6, 1, dtype=F64)
    sqn = SQN(model, "sigmoid_cross_entropy", lr=0.2, memory=5, L=5)
    start = float(sqn.loss(model(X), Y).detach())
    run(sqn, model, X, Y, 60, make_generator(16), curvature_rows=200)
    assert float(sqn.loss(model(X), Y).detach()) < 0.5 * start
    assert sqn.stats["pairs_stored"] >= 9


def test_sqn_with_the_ggn_reduces_a_small_tanh_rnn_loss():
    model = esn_init_(TanhRNN(2, 6, 1, dtype=F64), input_scale=0.1, generator=make_generator(17))
    X, Y = Addition(10).batch(200, make_generator(18), dtype=F64)
    sqn = SQN(model, "squared_error", lr=0.3, memory=5, L=4, curvature="ggn")
    start = float(sqn.loss(model(X), Y).detach())
    run(sqn, model, X, Y, 24, make_generator(19), curvature_rows=50, batch=50)
    assert float(sqn.loss(model(X), Y).detach()) < 0.5 * start
    assert sqn.stats["pairs_stored"] >= 5


def test_state_dict_mid_run_continues_identically():
    model, X, Y = regression(20)
    sqn = SQN(model, "squared_error", lr=0.05, memory=3, L=3)
    generator = make_generator(21)
    run(sqn, model, X, Y, 7, generator)  # mid-cycle, with pairs and a partial running sum
    saved_model, saved_optimizer, saved_generator = copy.deepcopy(model.state_dict()), copy.deepcopy(sqn.state_dict()), generator.get_state()
    run(sqn, model, X, Y, 8, generator)
    expected, expected_stats = flat_params(model).clone(), dict(sqn.stats)

    resumed_model, _, _ = regression(0)
    resumed_model.load_state_dict(saved_model)
    resumed = SQN(resumed_model, "squared_error", lr=1.0, memory=3, L=3)
    resumed.load_state_dict(saved_optimizer)
    generator.set_state(saved_generator)
    run(resumed, resumed_model, X, Y, 8, generator)
    assert torch.equal(flat_params(resumed_model), expected) and resumed.stats == expected_stats
    with pytest.raises(ValueError, match="memory"):
        SQN(resumed_model, "squared_error", memory=4).load_state_dict(saved_optimizer)


@pytest.mark.parametrize("options, error, name", [
    (dict(lr=0.0), ValueError, "lr"), (dict(memory=0), ValueError, "memory"), (dict(L=0), ValueError, "L:"),
    (dict(L=1.5), ValueError, "L:"), (dict(curvature="fisher"), ValueError, "curvature"), (dict(h0="adagrad"), ValueError, "h0"),
    (dict(curvature_skip=-1.0), ValueError, "curvature_skip"), (dict(curvature_rule="angle"), ValueError, "curvature_rule"),
])
def test_bad_hyperparameters_name_the_parameter(options, error, name):
    with pytest.raises(error, match=name):
        SQN(nn.Linear(2, 1), "squared_error", **options)
    with pytest.raises(TypeError, match="model"):
        SQN([torch.zeros(2, requires_grad=True)], "squared_error")
