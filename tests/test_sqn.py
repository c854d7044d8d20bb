"""qnwb.optim.sqn.SQN: pairs from averaged iterates, y from the curvature engine at the average, schedule, state, safety."""

import copy

import pytest
import torch
from host_reads import no_host_reads
from roundoff import floor
from torch import nn

from qnwb.core import flat_grads, flat_params, make_generator
from qnwb.curvature import GGN
from qnwb.init import esn_init_
from qnwb.models import MLP, TanhRNN
from qnwb.optim.memory import two_loop
from qnwb.optim.sqn import SQN
from qnwb.tasks import Addition

F64 = torch.float64


def regression(seed=0, n=300, d=5, model=None):
    g = make_generator(seed)
    X = torch.randn(n, d, generator=g, dtype=F64)
    Y = torch.tanh(X @ torch.randn(d, 2, generator=g, dtype=F64)) + 0.05 * torch.randn(
        n, 2, generator=g, dtype=F64
    )
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
        optimizer.step(
            closure_for(optimizer, model, X[rows], Y[rows]),
            (X[:curvature_rows], Y[:curvature_rows]),
        )


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
    # differences of averaged iterates: round-off of the iterates' size, not of s's
    torch.testing.assert_close(S, expected_s, rtol=1e-12, atol=floor(*iterates))
    design = X[
        :100
    ]  # ½‖Wx + b − t‖² averaged over the curvature batch: H is the same for the Hessian and the GGN
    for s, y in zip(S, Ys):
        weight_s, bias_s = s[:10].view(2, 5), s[10:]  # the weight (2 × 5, row-major), then the bias
        expected = torch.cat(
            [
                (weight_s @ design.T @ design / 100 + bias_s[:, None] * design.mean(0)).reshape(-1),
                weight_s @ design.mean(0) + bias_s,
            ]
        )
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
    at_the_current_point = GGN(model, "squared_error", (X[:100], Y[:100])).mv(
        s
    )  # not where y is measured
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
            # θ − lr·g in another order (a fused multiply-add or not): round-off of the size of θ and of the step
            torch.testing.assert_close(flat_params(model), sgd, rtol=0, atol=floor(theta, sgd))
        sizes.append(sqn.stats["memory_size"])
        formed.append(sqn.stats["pair_formed"])
    assert formed == [0, 0, 0, 0, 0, 1, 0, 0, 1, 0, 0, 1]
    assert sizes == [0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2]  # m = 2: the third pair replaces the first
    assert sqn.stats["cycles"] == 4 and sqn.stats["total_curvature_products"] == 3
    assert sqn.stats["total_gradient_evaluations"] == 12


def test_a_skipped_pair_still_advances_the_previous_average():
    model, X, Y = regression(9)
    sqn = SQN(
        model, "squared_error", lr=0.05, L=2, curvature_skip=1.0
    )  # cos(s, y) > 1 never holds: every pair skipped
    iterates = []
    run(sqn, model, X, Y, 6, make_generator(10), record=iterates)
    assert (
        sqn.stats["pairs_skipped"] == 2
        and sqn.stats["memory_size"] == 0
        and sqn.stats["pair_skipped"] is True
    )
    state = sqn.state[model.weight]
    # an average of two iterates in another order: round-off of the iterates' size, even where they cancel
    torch.testing.assert_close(
        state["previous_average"],
        torch.stack(iterates[4:6]).mean(0),
        rtol=0,
        atol=floor(*iterates[4:6]),
    )


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
    assert (
        torch.equal(flat_params(model), before)
        and sqn.stats["non_finite"] is True
        and sqn.stats["step_size"] == 0.0
    )


def test_sqn_reduces_a_logistic_regression_loss():
    g = make_generator(15)
    X = torch.randn(400, 6, generator=g, dtype=F64)
    Y = (
        torch.rand(400, 1, generator=g, dtype=F64)
        < torch.sigmoid(2 * X @ torch.randn(6, 1, generator=g, dtype=F64))
    ).to(F64)
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
    saved_model, saved_optimizer, saved_generator = (
        copy.deepcopy(model.state_dict()),
        copy.deepcopy(sqn.state_dict()),
        generator.get_state(),
    )
    run(sqn, model, X, Y, 8, generator)
    expected, expected_stats = flat_params(model).clone(), dict(sqn.stats)

    resumed_model, _, _ = regression(0)
    resumed_model.load_state_dict(saved_model)
    resumed = SQN(resumed_model, "squared_error", lr=1.0, memory=3, L=3)
    resumed.load_state_dict(saved_optimizer)
    generator.set_state(saved_generator)
    run(resumed, resumed_model, X, Y, 8, generator)
    assert torch.equal(flat_params(resumed_model), expected) and resumed.stats == expected_stats
    other = SQN(resumed_model, "squared_error", memory=4)
    other.load_state_dict(
        saved_optimizer
    )  # a memory size is no longer fixed at construction: the saved one is taken
    assert other.memory.size == other.param_groups[0]["memory"] == 3


@pytest.mark.parametrize(
    "options, error, name",
    [
        (dict(lr=0.0), ValueError, "lr"),
        (dict(memory=0), ValueError, "memory"),
        (dict(L=0), ValueError, "L:"),
        (dict(L=1.5), ValueError, "L:"),
        (dict(curvature="fisher"), ValueError, "curvature"),
        (dict(h0="adagrad"), ValueError, "h0"),
        (dict(curvature_skip=-1.0), ValueError, "curvature_skip"),
        (dict(curvature_rule="angle"), ValueError, "curvature_rule"),
    ],
)
def test_bad_hyperparameters_name_the_parameter(options, error, name):
    with pytest.raises(error, match=name):
        SQN(nn.Linear(2, 1), "squared_error", **options)
    with pytest.raises(TypeError, match="model"):
        SQN([torch.zeros(2, requires_grad=True)], "squared_error")


# --- memory and L set between steps (the dashboard steers param_groups[0]) -------------------------------------------

from resizing import generator_copy, optimizer_state, same, twin  # noqa: E402


def trajectory(optimizer, model, X, Y, steps, generator):
    """`run`, recording (θ, stats) after every step."""
    out = []
    for _ in range(steps):
        run(optimizer, model, X, Y, 1, generator)
        out.append((flat_params(model).clone(), dict(optimizer.stats)))
    return out


def test_a_memory_set_in_the_group_resizes_at_the_next_step_like_a_fresh_memory_of_the_newest_pairs():
    model, X, Y = regression(30, model=MLP([5, 4, 2], dtype=F64))
    sqn = SQN(model, "squared_error", lr=0.1, memory=4, L=2)
    generator = make_generator(31)
    run(
        sqn, model, X, Y, 13, generator
    )  # six pairs formed: the memory is full and has wrapped around
    assert sqn.stats["memory_size"] == sqn.stats["memory_capacity"] == 4
    for size in (2, 3, 1):  # shrink, grow, shrink to one pair
        copy_model, reference = twin(
            model, sqn, lambda m, memory: SQN(m, "squared_error", memory=memory), memory=size
        )
        sqn.param_groups[0]["memory"] = size
        copy_generator = generator_copy(generator)
        got = trajectory(sqn, model, X, Y, 6, generator)
        assert (
            sqn.memory.size == got[0][1]["memory_capacity"] == size
            and got[0][1]["memory_size"] <= size
        )
        for (a, stats_a), (b, stats_b) in zip(
            got, trajectory(reference, copy_model, X, Y, 6, copy_generator)
        ):
            assert torch.equal(a, b) and same(stats_a, stats_b)


@pytest.mark.parametrize(
    "name, bad",
    [
        ("memory", 0),
        ("memory", -3),
        ("memory", 2.5),
        ("memory", True),
        ("L", 0),
        ("L", -3),
        ("L", 2.5),
        ("L", True),
        ("L", None),
    ],
)
def test_a_bad_memory_or_L_set_in_the_group_is_refused_at_the_step_with_nothing_changed(name, bad):
    model, X, Y = regression(32)
    sqn = SQN(model, "squared_error", lr=0.05, memory=3, L=3)
    generator = make_generator(33)
    run(sqn, model, X, Y, 7, generator)
    theta, state = flat_params(model).clone(), optimizer_state(sqn)
    calls = []
    sqn.param_groups[0][name] = bad
    with pytest.raises(
        ValueError, match=rf"{name}: must be a positive int.*param_groups\[0\]\['{name}'\]"
    ):
        sqn.step(lambda: calls.append(1), lambda: calls.append(2))
    assert (
        calls == [] and torch.equal(flat_params(model), theta) and same(optimizer_state(sqn), state)
    )


def test_a_new_L_takes_effect_at_the_next_cycle_boundary():
    """L = 5, set to 2 before step 7: the cycle of steps 6–10 keeps its length 5 (a pair at step 10), then cycles of two
    steps (pairs at 12, 14, 16), the first of which averages the iterates of steps 11 and 12."""
    model, X, Y = regression(34, model=MLP([5, 4, 2], dtype=F64))
    sqn = SQN(model, "squared_error", lr=0.05, memory=10, L=5)
    generator, iterates, formed, lengths = make_generator(35), [], [], []
    for step in range(1, 17):
        if step == 7:
            sqn.param_groups[0]["L"] = 2
        run(
            sqn, model, X, Y, 1, generator, record=iterates
        )  # iterates[step − 1]: the iterate of that step
        formed.append(sqn.stats["pair_formed"])
        lengths.append(sqn.stats["cycle_length"])
    assert [step for step, f in enumerate(formed, 1) if f] == [10, 12, 14, 16]
    assert lengths == [5] * 10 + [2] * 6
    assert sqn.stats["cycles"] == 5 and sqn.stats["memory_size"] == 4
    S, _ = sqn.memory.pairs()
    averages = {
        10: torch.stack(iterates[5:10]).mean(0),
        12: torch.stack(iterates[10:12]).mean(0),
        14: torch.stack(iterates[12:14]).mean(0),
    }
    # differences of averaged iterates: round-off of the iterates' size
    torch.testing.assert_close(
        S[0], averages[10] - torch.stack(iterates[0:5]).mean(0), rtol=1e-12, atol=floor(*iterates)
    )
    torch.testing.assert_close(
        S[1], averages[12] - averages[10], rtol=1e-12, atol=floor(*iterates)
    )  # over 2 iterates
    torch.testing.assert_close(S[2], averages[14] - averages[12], rtol=1e-12, atol=floor(*iterates))


def test_an_L_changed_and_changed_back_within_a_cycle_changes_nothing():
    runs = []
    for steer in (False, True):
        model, X, Y = regression(36)
        sqn = SQN(model, "squared_error", lr=0.05, memory=3, L=3)
        generator = make_generator(37)
        out = []
        for step in range(1, 14):
            if steer and step in (5, 11):
                sqn.param_groups[0]["L"] = 7  # mid-cycle (cycles: 1–3, 4–6, 7–9, 10–12)
            if steer and step in (6, 12):
                sqn.param_groups[0]["L"] = 3  # back before the cycle ends
            out += trajectory(sqn, model, X, Y, 1, generator)
        runs.append(out)
    for (a, stats_a), (b, stats_b) in zip(*runs):
        assert torch.equal(a, b) and same(stats_a, stats_b)


@pytest.mark.parametrize("between", [False, True])
def test_a_checkpoint_after_a_resize_and_a_new_L_resumes_in_an_optimizer_built_with_the_constructor_sizes(
    between,
):
    """As qnwb.runs resumes: SQN(model, loss, **configuration) with memory and L the defaults 10, then load_state_dict."""
    model, X, Y = regression(38)
    sqn = SQN(model, "squared_error", lr=0.05)
    generator = make_generator(39)
    run(sqn, model, X, Y, 33, generator)  # 3 cycles of 10 and a bit
    sqn.param_groups[0].update(memory=2, L=3)
    if not between:
        run(
            sqn, model, X, Y, 10, generator
        )  # the 4th cycle ends at step 40; cycles of 3 from step 41
    saved_model, saved = copy.deepcopy(model.state_dict()), copy.deepcopy(sqn.state_dict())
    saved_generator = generator.get_state()
    expected = trajectory(sqn, model, X, Y, 8, generator)
    assert expected[-1][1]["memory_capacity"] == 2 and expected[-1][1]["cycle_length"] == 3

    resumed_model, _, _ = regression(0)
    resumed_model.load_state_dict(saved_model)
    resumed = SQN(resumed_model, "squared_error", lr=0.05)
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["memory"] == 2 and resumed.memory.size == (10 if between else 2)
    generator.set_state(saved_generator)
    for (a, stats_a), (b, stats_b) in zip(
        expected, trajectory(resumed, resumed_model, X, Y, 8, generator)
    ):
        assert torch.equal(a, b) and same(stats_a, stats_b)


def test_a_state_saved_before_cycles_were_recorded_resumes_identically():
    """Checkpoints written before L could change lack `cycle_start` and `cycle_length`: cycles of the group's L."""
    model, X, Y = regression(40)
    sqn = SQN(model, "squared_error", lr=0.05, memory=3, L=4)
    generator = make_generator(41)
    run(sqn, model, X, Y, 10, generator)
    saved_model, saved = copy.deepcopy(model.state_dict()), copy.deepcopy(sqn.state_dict())
    for state in saved["state"].values():
        del state["cycle_start"], state["cycle_length"]
    saved_generator = generator.get_state()
    expected = trajectory(sqn, model, X, Y, 7, generator)
    resumed_model, _, _ = regression(0)
    resumed_model.load_state_dict(saved_model)
    resumed = SQN(resumed_model, "squared_error", memory=3, L=4)
    resumed.load_state_dict(saved)
    generator.set_state(saved_generator)
    for (a, stats_a), (b, stats_b) in zip(
        expected, trajectory(resumed, resumed_model, X, Y, 7, generator)
    ):
        assert torch.equal(a, b) and same(stats_a, stats_b)
