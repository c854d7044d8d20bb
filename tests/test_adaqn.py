"""qnwb.optim.adaqn.AdaQN, Algorithm 1 of Keskar & Berahas: a regression test for each defect found in public reference implementations."""

import copy
import math

import pytest
import torch
from host_reads import no_host_reads
from hypothesis import given
from hypothesis import strategies as st
from roundoff import floor
from torch import nn

from qnwb.core import flat_grads, flat_params, make_generator
from qnwb.init import esn_init_
from qnwb.losses import matching_loss
from qnwb.models import TanhRNN
from qnwb.optim.adaqn import AdaQN, GradientFIFO
from qnwb.tasks import Addition

F64 = torch.float64
SQUARED = matching_loss("squared_error")


def regression(seed=0, n=300, d=5):
    g = make_generator(seed)
    X = torch.randn(n, d, generator=g, dtype=F64)
    Y = torch.tanh(X @ torch.randn(d, 1, generator=g, dtype=F64)) + 0.05 * torch.randn(
        n, 1, generator=g, dtype=F64
    )
    torch.manual_seed(seed)
    return nn.Linear(d, 1, dtype=F64), X, Y


class Driver:
    """Steps an AdaQN on mini-batches of a regression problem, recording iterates and gradients."""

    def __init__(self, seed=0, monitor_values=None, **options):
        self.model, self.X, self.Y = regression(seed)
        self.optimizer = AdaQN(self.model.parameters(), **options)
        self.generator = make_generator(seed + 100)
        self.iterates, self.gradients, self.monitor_calls = [], [], 0
        self.monitor_values = iter(monitor_values) if monitor_values is not None else None

    def closure(self, rows):
        def closure():
            self.optimizer.zero_grad()
            value = SQUARED(self.model(self.X[rows]), self.Y[rows])
            value.backward()
            return value

        return closure

    def monitor(self):
        self.monitor_calls += 1
        if self.monitor_values is not None:
            return next(self.monitor_values)
        return SQUARED(self.model(self.X[:100]), self.Y[:100])

    def step(self, count=1):
        for _ in range(count):
            rows = torch.randperm(len(self.X), generator=self.generator)[:25]
            closure = self.closure(rows)
            closure()
            self.iterates.append(flat_params(self.model).clone())
            self.gradients.append(flat_grads(self.model).clone())
            self.optimizer.step(closure, self.monitor)
        return self.optimizer.stats

    @property
    def state(self):
        return self.optimizer.state[self.model.weight]


# --- the defects of public reference implementations ------------------------------------------------------------------


def test_the_adagrad_accumulator_accumulates_on_every_step_even_across_a_rejection():
    # cycles of L = 2: tests at steps 4 (accept: 1 ≤ 1.01·1), 6 (reject: 5 > 1.01·1) and 8 (accept)
    run = Driver(1, monitor_values=[1.0, 1.0, 5.0, 1.0, 1.0, 1.0], lr=0.05, L=2)
    run.step(8)
    assert run.optimizer.stats["rejections"] == 1
    squares = torch.stack(run.gradients).pow(2).sum(0)
    # 8 squares summed in two orders (in place, and by sum(0)): a few ε of the positive sum
    torch.testing.assert_close(run.optimizer.scaling.accumulator, squares, rtol=floor(1), atol=0)


def accumulator_at_the_last_move_of_the_old_average(run, steps):
    "Step `run` `steps` times; the Adagrad accumulator right after the last step that moved w̄ₒ."
    at_previous, previous = None, None
    for _ in range(steps):
        run.step()
        now = run.state.get("previous_average")
        if now is not None and (previous is None or not torch.equal(now, previous)):
            at_previous = run.optimizer.scaling.accumulator.clone()
        previous = None if now is None else now.clone()
    return at_previous


@pytest.mark.parametrize("epsilon, stored", [(1e-4, 2), (1e6, 0)])
def test_the_accumulator_safeguard_returns_sum_g2_to_its_value_at_the_old_average_bit_for_bit(
    epsilon, stored
):
    # L = 2: tests at steps 4 (accept), 6 (accept) and 8 (reject: 5 > 1.01·1); with ε = 1e6 every pair is skipped and
    # w̄ₒ stays at step 2's average (line 21), so Σg² returns to its value at step 2
    options = dict(lr=0.05, L=2, restore_accumulator_on_reject=True, epsilon=epsilon)
    run = Driver(1, monitor_values=[1.0, 1.0, 1.0, 1.0, 5.0, 1.0], **options)
    expected = accumulator_at_the_last_move_of_the_old_average(run, 7)
    assert run.optimizer.stats["pairs_stored"] == stored
    run.step()
    assert run.optimizer.stats["rejected"] == 1
    assert torch.equal(run.optimizer.scaling.accumulator, expected)
    assert torch.equal(run.state["accumulator_at_previous"], expected)
    # the literal Algorithm 1 keeps the excursion's gradients: the restored value is strictly smaller
    literal = Driver(
        1, monitor_values=[1.0, 1.0, 1.0, 1.0, 5.0, 1.0], lr=0.05, L=2, epsilon=epsilon
    )
    literal.step(8)
    assert (literal.optimizer.scaling.accumulator > expected).all()


def test_the_accumulator_safeguard_survives_a_checkpoint_between_the_old_average_and_the_rejection():
    options = dict(lr=0.05, L=2, restore_accumulator_on_reject=True)
    run = Driver(5, monitor_values=[1.0, 1.0, 1.0, 1.0, 5.0, 1.0], **options)
    run.step(7)
    saved_model = copy.deepcopy(run.model.state_dict())
    saved_optimizer = copy.deepcopy(run.optimizer.state_dict())
    saved_generator = run.generator.get_state()
    run.step()
    resumed = Driver(0, monitor_values=[5.0, 1.0], **options)
    resumed.X, resumed.Y = run.X, run.Y
    resumed.model.load_state_dict(saved_model)
    resumed.optimizer.load_state_dict(saved_optimizer)
    resumed.generator.set_state(saved_generator)
    resumed.step()
    assert resumed.optimizer.stats["rejected"] == run.optimizer.stats["rejected"] == 1
    assert torch.equal(resumed.optimizer.scaling.accumulator, run.optimizer.scaling.accumulator)
    assert torch.equal(flat_params(resumed.model), flat_params(run.model))


def test_the_first_two_cycles_are_adagrad_steps_with_epsilon_inside_the_root():
    run = Driver(2, lr=0.1, L=3, adagrad_epsilon=1e-6)
    squares = torch.zeros(6, dtype=F64)
    for _ in range(6):
        run.step()
        squares += run.gradients[-1] ** 2
        expected = run.iterates[-1] - 0.1 * run.gradients[-1] / torch.sqrt(squares + 1e-6)
        # θ − lr·g/√(Σg² + ε) in another order: round-off of the size of θ and of the update, even where they cancel
        torch.testing.assert_close(
            flat_params(run.model), expected, rtol=0, atol=floor(run.iterates[-1], expected)
        )


def test_a_rejection_restores_the_average_clears_memory_and_fifo_and_restarts_the_window():
    run = Driver(3, monitor_values=[1.0, 1.0, 1.0, 1.0, 2.0, 1.0], lr=0.05, L=3, fisher_memory=50)
    run.step(9)  # tests at steps 6 and 9: pairs
    assert run.optimizer.stats["memory_size"] == 2
    previous = run.state["previous_average"].clone()
    run.step(3)  # step 12: 2.0 > 1.01·1.0
    s = run.optimizer.stats
    assert (
        s["rejected"] == 1
        and s["rejections"] == 1
        and s["memory_size"] == 0
        and s["fisher_size"] == 0
    )
    assert torch.equal(flat_params(run.model), previous) and torch.equal(
        run.state["previous_average"], previous
    )
    assert torch.equal(run.state["iterate_sum"], torch.zeros_like(previous))
    run.monitor_values = iter([1.0, 1.0])
    run.step(3)  # the next window: steps 13–15, starting from w̄ₒ
    assert run.iterates[12].equal(previous)
    (s_new,), _ = run.optimizer.memory.pairs()
    # a difference of averaged iterates: its round-off is of the iterates' size, not of s's
    torch.testing.assert_close(
        s_new,
        torch.stack(run.iterates[12:15]).mean(0) - previous,
        rtol=1e-12,
        atol=floor(*run.iterates),
    )
    assert run.optimizer.stats["fisher_size"] == 3  # only the gradients since the rejection


def test_the_fifo_switch_keeps_the_gradients_across_a_rejection():
    run = Driver(
        4,
        monitor_values=[1.0, 1.0, 2.0, 1.0],
        lr=0.05,
        L=3,
        fisher_memory=50,
        clear_fisher_on_reject=False,
    )
    run.step(9)
    assert run.optimizer.stats["rejected"] == 1 and run.optimizer.stats["memory_size"] == 0
    assert run.optimizer.stats["fisher_size"] == 9


def test_the_fifo_holds_exactly_the_last_m_F_gradients():
    run = Driver(5, lr=0.05, L=100, fisher_memory=4)
    for count in range(1, 8):
        run.step()
        held = run.optimizer.fisher.gradients()
        assert held.shape[0] == min(count, 4)
        assert torch.equal(held, torch.stack(run.gradients[-4:]))


@pytest.mark.parametrize("normalization, divide", [("count", True), ("none", False)])
def test_y_equals_the_explicit_accumulated_fisher_product(normalization, divide):
    run = Driver(
        6,
        lr=0.05,
        L=3,
        fisher_memory=5,
        fisher_normalization=normalization,
        curvature_rule="cosine",
        epsilon=0.0,
    )
    run.step(6)
    (s,), (y,) = run.optimizer.memory.pairs()
    G = torch.stack(run.gradients[-5:])
    expected = G.T @ (G @ s) / (5 if divide else 1)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-15)
    averages = [torch.stack(run.iterates[i : i + 3]).mean(0) for i in (0, 3)]
    torch.testing.assert_close(
        s, averages[1] - averages[0], rtol=1e-12, atol=floor(*run.iterates)
    )  # s from averaged iterates


@pytest.mark.parametrize("advance", [False, True])
def test_a_skipped_pair_does_not_advance_the_old_average_unless_asked(advance):
    run = Driver(7, lr=0.05, L=2, epsilon=1e9, advance_on_skip=advance)  # sᵀy > 10⁹ sᵀs never holds
    run.step(2)
    first = run.state["previous_average"].clone()
    run.step(2)
    assert run.optimizer.stats["pair_skipped"] is True and run.optimizer.stats["memory_size"] == 0
    newest = torch.stack(run.iterates[2:4]).mean(0)
    assert torch.equal(run.state["previous_average"], newest if advance else first)


# --- the acceptance tests --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values, options, rejected",
    [
        ([1.0101, 1.0], dict(), 1),
        ([1.0099, 1.0], dict(), 0),
        ([1.0, 1.0], dict(), 0),
        ([math.nan, 1.0], dict(), 1),
        ([1.3, 1.0], dict(gamma=1.5), 0),
        ([1.04, 1.0], dict(acceptance="relative", relative_threshold=0.05), 0),
        ([1.06, 1.0], dict(acceptance="relative", relative_threshold=0.05), 1),
        ([0.0, 0.0], dict(acceptance="relative"), 0),
        ([1e-9, 0.0], dict(acceptance="relative"), 1),
        ([-0.96, -1.0], dict(acceptance="relative", relative_threshold=0.05), 0),
    ],
)
def test_rejection_tests(values, options, rejected):
    run = Driver(8, monitor_values=values, lr=0.05, L=2, **options)
    run.step(4)
    assert run.optimizer.stats["rejected"] == rejected and run.monitor_calls == 2


def test_the_monitor_is_needed_and_called_only_at_cycle_ends_after_the_first():
    run = Driver(9, lr=0.05, L=3)
    run.step(3)
    assert run.monitor_calls == 0  # the first cycle end has nothing to compare with
    run.step(2)
    assert run.monitor_calls == 0
    rows = torch.arange(25)
    with pytest.raises(ValueError, match="monitor"):
        run.optimizer.step(run.closure(rows))
    assert run.state["step"] == 5
    run.step()
    assert run.monitor_calls == 2 and run.optimizer.stats["total_monitor_evaluations"] == 2


def test_memory_average_per_epoch():
    run = Driver(10, lr=0.05, L=2, epsilon=0.0, curvature_rule="cosine")
    sizes = []
    for _ in range(8):
        before = len(run.optimizer.memory)
        run.step()
        sizes.append(before)  # the pairs the step's direction used
    assert run.optimizer.stats["memory_average"] == pytest.approx(sum(sizes) / 8)
    run.optimizer.new_epoch()
    before = len(run.optimizer.memory)
    run.step()
    assert run.optimizer.stats["memory_average"] == before


def test_steps_between_cycle_ends_never_read_a_tensor_on_the_host():
    run = Driver(11, lr=0.05, L=4)
    run.step(8)
    rows = torch.arange(25)
    with no_host_reads():
        for _ in range(3):
            run.optimizer.step(run.closure(rows))  # steps 9–11: no cycle end
    assert run.optimizer.stats["step"] == 11


# --- convergence, state, errors --------------------------------------------------------------------------------------


def test_adaqn_reduces_the_loss_of_a_regression_and_of_a_small_tanh_rnn():
    run = Driver(12, lr=0.1, L=5)
    start = float(SQUARED(run.model(run.X), run.Y).detach())
    run.step(60)
    assert float(SQUARED(run.model(run.X), run.Y).detach()) < 0.3 * start
    assert run.optimizer.stats["pairs_stored"] >= 5

    model = esn_init_(TanhRNN(2, 6, 1, dtype=F64), input_scale=0.1, generator=make_generator(13))
    X, Y = Addition(10).batch(200, make_generator(14), dtype=F64)
    adaqn = AdaQN(model.parameters(), lr=0.05, L=5)
    generator = make_generator(15)
    start = float(SQUARED(model(X), Y).detach())
    for _ in range(40):
        rows = torch.randperm(200, generator=generator)[:50]

        def closure():
            adaqn.zero_grad()
            value = SQUARED(model(X[rows]), Y[rows])
            value.backward()
            return value

        adaqn.step(closure, lambda: SQUARED(model(X[:100]), Y[:100]))
    assert float(SQUARED(model(X), Y).detach()) < 0.5 * start


def test_state_dict_mid_cycle_continues_identically():
    run = Driver(16, lr=0.05, L=3, memory=2, fisher_memory=4)
    run.step(10)  # mid-cycle, pairs, a full FIFO
    saved_model = copy.deepcopy(run.model.state_dict())
    saved_optimizer = copy.deepcopy(run.optimizer.state_dict())
    saved_generator = run.generator.get_state()
    run.step(7)
    expected, expected_stats = flat_params(run.model).clone(), dict(run.optimizer.stats)

    resumed = Driver(0, lr=9.0, L=3, memory=2, fisher_memory=4)
    resumed.X, resumed.Y = run.X, run.Y
    resumed.model.load_state_dict(saved_model)
    resumed.optimizer.load_state_dict(saved_optimizer)
    resumed.generator.set_state(saved_generator)
    resumed.step(7)
    assert (
        torch.equal(flat_params(resumed.model), expected)
        and resumed.optimizer.stats == expected_stats
    )
    other = AdaQN(run.model.parameters(), L=3, memory=2, fisher_memory=5)
    other.load_state_dict(
        saved_optimizer
    )  # buffer sizes are no longer fixed at construction: the saved ones are taken
    assert other.fisher.size == other.param_groups[0]["fisher_memory"] == 4


@pytest.mark.parametrize(
    "options, error, name",
    [
        (dict(lr=0.0), ValueError, "lr"),
        (dict(L=0), ValueError, "L:"),
        (dict(memory=0), ValueError, "memory"),
        (dict(fisher_memory=0), ValueError, "fisher_memory"),
        (dict(gamma=0.99), ValueError, "gamma"),
        (dict(epsilon=-1e-4), ValueError, "epsilon"),
        (dict(adagrad_epsilon=0.0), ValueError, "adagrad_epsilon"),
        (dict(curvature_rule="angle"), ValueError, "curvature_rule"),
        (dict(fisher_normalization="batch"), ValueError, "fisher_normalization"),
        (dict(acceptance="improvement"), ValueError, "acceptance"),
        (dict(relative_threshold=1.0), ValueError, "relative_threshold"),
        (dict(clear_fisher_on_reject=0), TypeError, "clear_fisher_on_reject"),
        (dict(advance_on_skip="no"), TypeError, "advance_on_skip"),
        (dict(restore_accumulator_on_reject=1), TypeError, "restore_accumulator_on_reject"),
    ],
)
def test_bad_hyperparameters_name_the_parameter(options, error, name):
    with pytest.raises(error, match=name):
        AdaQN([torch.zeros(3, requires_grad=True)], **options)


# --- the FIFO itself -------------------------------------------------------------------------------------------------


@given(st.integers(1, 5), st.lists(st.booleans(), max_size=15))
def test_gradient_fifo_matches_a_bounded_deque_and_masks_stale_slots(size, accepts):
    fifo, model = GradientFIFO(size, 3, dtype=F64), []
    for i, accept in enumerate(accepts):
        fifo.push(torch.full((3,), float(i + 1), dtype=F64), torch.tensor(accept))
        if accept:
            model = (model + [i + 1])[-size:]
        assert fifo.gradients()[:, 0].tolist() == [float(v) for v in model]
    s = torch.tensor([1.0, 0.0, 0.0], dtype=F64)
    expected = sum(v * v for v in model) / max(len(model), 1)
    torch.testing.assert_close(fifo.product(s), torch.full((3,), float(expected), dtype=F64))
    fifo.clear()
    assert torch.equal(fifo.product(s), torch.zeros(3, dtype=F64))  # stale rows contribute nothing


def test_gradient_fifo_errors_and_state():
    fifo = GradientFIFO(2, 3, dtype=F64)
    with pytest.raises(ValueError, match="size"):
        GradientFIFO(0, 3)
    with pytest.raises(ValueError, match="g: expected"):
        fifo.push(torch.zeros(4, dtype=F64))
    with pytest.raises(ValueError, match="normalization"):
        fifo.product(torch.zeros(3, dtype=F64), "batch")
    fifo.push(torch.ones(3, dtype=F64))
    copy_ = GradientFIFO(2, 3, dtype=F64)
    copy_.load_state_dict(fifo.state_dict())
    assert torch.equal(copy_.gradients(), fifo.gradients())
    with pytest.raises(ValueError, match="count"):
        copy_.load_state_dict(dict(fifo.state_dict(), count=torch.tensor(3)))


@given(st.integers(1, 5), st.lists(st.one_of(st.booleans(), st.integers(1, 6)), max_size=20))
def test_gradient_fifo_resized_between_pushes_matches_a_bounded_list(size, operations):
    """An operation is a push (True: accepted, False: refused) or a resize to an int."""
    fifo, model = GradientFIFO(size, 3, dtype=F64), []
    for i, op in enumerate(operations):
        if isinstance(op, bool):
            fifo.push(torch.full((3,), float(i + 1), dtype=F64), torch.tensor(op))
            if op:
                model = (model + [i + 1])[-size:]
        else:
            fifo.resize(op)
            size, model = op, model[-op:]
        assert fifo.size == size and len(fifo) == len(model)
        assert fifo.gradients()[:, 0].tolist() == [float(v) for v in model]
        assert fifo.held().sum().item() == len(model)
    s = torch.tensor([1.0, 0.0, 0.0], dtype=F64)
    expected = sum(v * v for v in model) / max(len(model), 1)
    torch.testing.assert_close(
        fifo.product(s), torch.full((3,), float(expected), dtype=F64), rtol=1e-15, atol=0
    )


def test_gradient_fifo_resize_errors_no_op_and_device(device):
    fifo = GradientFIFO(3, 2, device=device)
    for v in (1.0, 2.0, 3.0, 4.0):
        fifo.push(torch.full((2,), v, device=device))
    G = fifo.G
    fifo.resize(3)
    assert fifo.G is G
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="size"):
            fifo.resize(bad)
    with no_host_reads():
        fifo.resize(2)
    assert fifo.G.device.type == device.type and fifo.G.dtype == torch.float32
    assert fifo.gradients()[:, 0].tolist() == [3.0, 4.0]
    saved = fifo.state_dict()
    other = GradientFIFO(5, 2, device=device)
    other.resize(other.saved_size(saved))
    other.load_state_dict(saved)
    assert torch.equal(other.gradients(), fifo.gradients())


# --- memory, fisher_memory and L set between steps (the dashboard steers param_groups[0]) ----------------------------

from resizing import generator_copy, optimizer_state, same, twin  # noqa: E402


def trajectory(optimizer, model, X, Y, steps, generator, calls=None):
    """Steps on mini-batches of 25 with the monitoring loss on the first 100 cases; (θ, stats) after every step."""
    out = []

    def monitor():
        if calls is not None:
            calls.append(optimizer.stats.get("step", 0) + 1)
        return SQUARED(model(X[:100]), Y[:100])

    for _ in range(steps):
        rows = torch.randperm(len(X), generator=generator)[:25]

        def closure():
            optimizer.zero_grad()
            value = SQUARED(model(X[rows]), Y[rows])
            value.backward()
            return value

        optimizer.step(closure, monitor)
        out.append((flat_params(model).clone(), dict(optimizer.stats)))
    return out


def test_memory_and_fisher_memory_set_in_the_group_resize_at_the_next_step_like_fresh_buffers_of_the_newest_entries():
    model, X, Y = regression(40)
    adaqn = AdaQN(
        model.parameters(),
        lr=0.05,
        L=2,
        memory=4,
        fisher_memory=6,
        epsilon=0.0,
        curvature_rule="cosine",
    )
    generator = make_generator(41)
    trajectory(adaqn, model, X, Y, 13, generator)
    assert (
        adaqn.stats["memory_size"] == 4
        and adaqn.stats["fisher_size"] == adaqn.stats["fisher_capacity"] == 6
    )
    build = lambda m, **sizes: AdaQN(m.parameters(), L=2, **sizes)  # noqa: E731
    for memory, fisher in ((2, 3), (3, 9), (1, 1)):  # shrink both, grow both, to one entry each
        copy_model, reference = twin(model, adaqn, build, memory=memory, fisher_memory=fisher)
        adaqn.param_groups[0].update(memory=memory, fisher_memory=fisher)
        copy_generator = generator_copy(generator)
        got = trajectory(adaqn, model, X, Y, 7, generator)
        assert (adaqn.memory.size, adaqn.fisher.size) == (memory, fisher)
        assert (got[0][1]["memory_capacity"], got[0][1]["fisher_capacity"]) == (memory, fisher)
        for (a, stats_a), (b, stats_b) in zip(
            got, trajectory(reference, copy_model, X, Y, 7, copy_generator)
        ):
            assert torch.equal(a, b) and same(stats_a, stats_b)


@pytest.mark.parametrize("name", ["memory", "fisher_memory", "L"])
@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_a_bad_size_set_in_the_group_is_refused_at_the_step_with_nothing_changed(name, bad):
    model, X, Y = regression(42)
    adaqn = AdaQN(model.parameters(), lr=0.05, L=3, memory=3, fisher_memory=4)
    generator = make_generator(43)
    trajectory(adaqn, model, X, Y, 8, generator)
    theta, state = flat_params(model).clone(), optimizer_state(adaqn)
    calls = []
    adaqn.param_groups[0][name] = bad
    with pytest.raises(
        ValueError, match=rf"{name}: must be a positive int.*param_groups\[0\]\['{name}'\]"
    ):
        adaqn.step(lambda: calls.append(1), lambda: calls.append(2))
    assert (
        calls == []
        and torch.equal(flat_params(model), theta)
        and same(optimizer_state(adaqn), state)
    )
    assert (adaqn.memory.size, adaqn.fisher.size) == (3, 4)


def test_a_new_L_takes_effect_at_the_next_cycle_boundary():
    """L = 5, set to 2 before step 7: the cycle of steps 6–10 keeps its length (the test and a pair at step 10), then
    cycles of two steps (tests and pairs at 12, 14, 16), the first averaging the iterates of steps 11 and 12."""
    model, X, Y = regression(44)
    adaqn = AdaQN(
        model.parameters(), lr=0.05, L=5, gamma=1e9, epsilon=0.0, curvature_rule="cosine"
    )  # no rejection
    generator, calls, iterates, out = make_generator(45), [], [], []
    for step in range(1, 17):
        if step == 7:
            adaqn.param_groups[0]["L"] = 2
        iterates.append(flat_params(model).clone())  # iterates[step − 1]: the iterate of that step
        out += trajectory(adaqn, model, X, Y, 1, generator, calls)
    stats = [s for _, s in out]
    assert [s["step"] for s in stats if s["cycle_end"]] == [5, 10, 12, 14, 16]
    assert [s["step"] for s in stats if s["pair_stored"]] == [10, 12, 14, 16]
    assert calls == [
        10,
        10,
        12,
        12,
        14,
        14,
        16,
        16,
    ]  # the monitor: twice at every cycle end after the first
    assert [s["cycle_length"] for s in stats] == [5] * 10 + [2] * 6
    S, _ = adaqn.memory.pairs()
    first, second, third = (
        torch.stack(iterates[a:b]).mean(0) for a, b in ((0, 5), (5, 10), (10, 12))
    )
    # differences of averaged iterates: round-off of the iterates' size
    torch.testing.assert_close(S[0], second - first, rtol=1e-12, atol=floor(*iterates))
    torch.testing.assert_close(
        S[1], third - second, rtol=1e-12, atol=floor(*iterates)
    )  # the first cycle of two: over 2 iterates


def test_a_rejection_ends_a_cycle_of_the_length_it_started_with():
    model, X, Y = regression(46)
    values = iter([1.0, 1.0, 5.0, 1.0])  # cycle ends at 3 (none), 6 (accept), 9 (reject)
    adaqn = AdaQN(model.parameters(), lr=0.05, L=3)
    generator, out = make_generator(47), []
    for step in range(1, 14):
        if step == 8:
            adaqn.param_groups[0]["L"] = 2
        rows = torch.randperm(len(X), generator=generator)[:25]

        def closure():
            adaqn.zero_grad()
            value = SQUARED(model(X[rows]), Y[rows])
            value.backward()
            return value

        adaqn.step(closure, lambda: next(values, 1.0))
        out.append(dict(adaqn.stats))
    assert [s["step"] for s in out if s["cycle_end"]] == [3, 6, 9, 11, 13]
    assert [s["step"] for s in out if s["rejected"]] == [9]


@pytest.mark.parametrize("between", [False, True])
def test_a_checkpoint_after_resizes_and_a_new_L_resumes_in_an_optimizer_built_with_the_constructor_sizes(
    between,
):
    """As qnwb.runs resumes: AdaQN(params, **configuration) with L = 5, m_L = 10, m_F = 100, then load_state_dict."""
    model, X, Y = regression(48)
    adaqn = AdaQN(model.parameters(), lr=0.05)
    generator = make_generator(49)
    trajectory(adaqn, model, X, Y, 17, generator)
    adaqn.param_groups[0].update(memory=2, fisher_memory=3, L=2)
    if not between:
        trajectory(adaqn, model, X, Y, 7, generator)  # the cycle of 16–20 ends, then cycles of two
    saved_model, saved = copy.deepcopy(model.state_dict()), copy.deepcopy(adaqn.state_dict())
    saved_generator = generator.get_state()
    expected = trajectory(adaqn, model, X, Y, 9, generator)

    resumed_model, _, _ = regression(0)
    resumed_model.load_state_dict(saved_model)
    resumed = AdaQN(resumed_model.parameters(), lr=0.05)
    resumed.load_state_dict(saved)
    assert (resumed.memory.size, resumed.fisher.size) == ((10, 100) if between else (2, 3))
    generator.set_state(saved_generator)
    for (a, stats_a), (b, stats_b) in zip(
        expected, trajectory(resumed, resumed_model, X, Y, 9, generator)
    ):
        assert torch.equal(a, b) and same(stats_a, stats_b)
    assert expected[-1][1]["fisher_capacity"] == 3 and expected[-1][1]["cycle_length"] == 2
