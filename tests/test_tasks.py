"""qnwb.tasks: every generator against its definition, the error measures on hand-made predictions, seeds."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qnwb.core import make_generator
from qnwb.curvature import finite_difference_check
from qnwb.models import TanhRNN
from qnwb.tasks import (
    TASKS,
    Addition,
    Memorization5Bit,
    Memorization20Bit,
    Multiplication,
    RandomPermutation,
    TemporalOrder,
    TemporalOrder3,
    Xor,
    input_independent_error,
    make_task,
    task_figure,
)

CASES = 256


def marked(inputs):
    """Positions and values of the two marked steps of each case (addition, multiplication, XOR)."""
    positions = inputs[..., 1].nonzero()  # (2 * cases, 2): rows (case, step), in order
    steps = positions[:, 1].view(-1, 2)
    values = inputs[..., 0].gather(1, steps)
    return steps, values


@pytest.mark.parametrize(
    "cls, combine",
    [(Addition, torch.add), (Multiplication, torch.mul), (Xor, lambda a, b: (a != b).float())],
)
@pytest.mark.parametrize("T", [10, 37, 100])
def test_two_marked_problems(cls, combine, T):
    inputs, targets = cls(T).batch(CASES, make_generator(T))
    assert inputs.shape == (CASES, T, 2) and targets.shape == (CASES, T, 1)
    assert set(inputs[..., 1].unique().tolist()) == {0.0, 1.0}
    assert (inputs[..., 1].sum(1) == 2).all()  # exactly two markers
    steps, values = marked(inputs)
    assert (
        (steps[:, 0] < T // 10).all()
        and (steps[:, 1] >= T // 10).all()
        and (steps[:, 1] < T // 2).all()
    )
    assert torch.isnan(targets[:, :-1]).all() and not torch.isnan(targets[:, -1]).any()
    torch.testing.assert_close(targets[:, -1, 0], combine(values[:, 0], values[:, 1]))
    if cls is Xor:
        assert set(inputs[..., 0].unique().tolist()) == {0.0, 1.0}
    else:
        assert (
            inputs[..., 0].min() >= 0 and inputs[..., 0].max() <= 1
        )  # U[0, 1] (Sutskever et al. A.4)


@pytest.mark.parametrize(
    "cls, windows",
    [(TemporalOrder, ((10, 20), (50, 60))), (TemporalOrder3, ((10, 20), (33, 43), (66, 76)))],
)
@pytest.mark.parametrize("T", [10, 100, 150])
def test_temporal_order(cls, windows, T):
    task = cls(T)
    inputs, targets = task.batch(CASES, make_generator(1))
    symbols = inputs.argmax(-1)
    assert (inputs.sum(-1) == 1).all()  # one-hot
    assert (symbols[:, 0] == 6).all() and (symbols[:, -1] == 7).all()  # start E, trigger B
    relevant = (symbols == 4) | (symbols == 5)
    assert (relevant.sum(1) == len(windows)).all()
    steps = relevant.nonzero()[:, 1].view(CASES, len(windows))
    for k, (start, stop) in enumerate(windows):
        low, high = (
            max(1, math.floor(start * T / 100)),
            max(max(1, math.floor(start * T / 100)), math.floor(stop * T / 100)),
        )
        assert (steps[:, k] >= low).all() and (steps[:, k] <= high).all()
    bits = (symbols.gather(1, steps) == 5).long()  # Y = 1
    label = sum(bits[:, k] << (len(windows) - 1 - k) for k in range(len(windows)))
    assert torch.equal(targets[:, -1].argmax(-1), label)
    assert torch.isnan(targets[:, :-1]).all()
    assert len(label.unique()) == 2 ** len(windows)  # every order occurs


def test_random_permutation():
    inputs, targets = RandomPermutation(60).batch(CASES, make_generator(2))
    symbols = inputs.argmax(-1)
    assert set(symbols[:, 0].unique().tolist()) == {0, 1}
    assert (symbols[:, 1:] >= 2).all() and (symbols[:, 1:] <= 99).all()
    assert torch.equal(targets[:, -1].argmax(-1), symbols[:, 0])
    assert torch.isnan(targets[:, :-1]).all()


@pytest.mark.parametrize("cls, n, alphabet", [(Memorization5Bit, 5, 2), (Memorization20Bit, 10, 5)])
@pytest.mark.parametrize("T", [1, 30])
def test_memorization(cls, n, alphabet, T):
    task = cls(T)
    inputs, targets = task.batch(CASES, make_generator(3))
    L = T + 2 * n
    assert (
        task.length == L
        and inputs.shape == (CASES, L, alphabet + 2)
        and targets.shape == (CASES, L, alphabet + 1)
    )
    symbols, wanted = inputs.argmax(-1), targets.argmax(-1)
    blank, trigger = alphabet, alphabet + 1
    assert (symbols[:, :n] < alphabet).all()
    assert (symbols[:, L - n - 1] == trigger).all()
    others = torch.ones(L, dtype=torch.bool)
    others[:n] = False
    others[L - n - 1] = False
    assert (symbols[:, others] == blank).all()
    assert torch.equal(wanted[:, L - n :], symbols[:, :n])  # the data, reproduced at the end
    assert (wanted[:, : L - n] == blank).all()  # a constant target at every other step
    assert not torch.isnan(targets).any()


def test_error_measures_on_hand_made_predictions():
    task = Addition(20)
    _, targets = task.batch(4, make_generator(0))
    outputs = torch.zeros_like(targets)
    outputs[:, -1, 0] = targets[:, -1, 0] + torch.tensor([0.0, 0.039, -0.041, 0.5])
    assert task.wrong(outputs, targets).tolist() == [0, 0, 1, 1]
    assert task.error(outputs, targets) == 0.5 and not task.success(outputs, targets)
    outputs[:, -1, 0] = targets[:, -1, 0] + 0.01
    assert task.error(outputs, targets) == 0.0 and task.success(outputs, targets)

    xor = Xor(20)
    _, t = xor.batch(4, make_generator(1))
    z = torch.zeros_like(t)
    z[:, -1, 0] = torch.where(t[:, -1, 0] > 0.5, 3.0, -3.0)
    z[0, -1, 0] *= -1  # one confident mistake
    assert xor.wrong(z, t).tolist() == [1, 0, 0, 0]

    memo = Memorization5Bit(3)
    _, t = memo.batch(3, make_generator(2))
    z = t.nan_to_num() * 5.0  # right everywhere
    assert memo.error(z, t) == 0.0
    z[0, -1] = z[0, -1].roll(1)  # one wrong symbol in case 0
    z[1, -5:] = z[1, -5:].roll(1, dims=-1)  # five wrong symbols in case 1
    assert memo.wrong(z, t).tolist() == [1, 5, 0]
    assert memo.error(z, t) == 2.0  # Table 5's unit: wrong symbols per sequence
    with pytest.raises(ValueError, match="do not match targets"):
        memo.error(z[:, :-1], t)


def test_same_seed_same_batches_and_a_separate_held_out_set():
    task = TemporalOrder(50)
    a, b = task.batch(32, make_generator(5)), task.batch(32, make_generator(5))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)
    c = task.batch(32, make_generator(6))
    assert not torch.equal(a[0], c[0])
    held1, held2 = task.held_out(seed=0, cases=32), task.held_out(seed=0, cases=32)
    assert torch.equal(held1[0], held2[0])
    assert not torch.equal(held1[0], task.batch(32, make_generator(0))[0])  # its own stream
    assert not torch.equal(held1[0], task.held_out(seed=1, cases=32)[0])


def test_input_independent_error_matches_the_analysis_and_table_5_where_it_can():
    # The mean predictor of X1 + X2 with X ~ U[0, 1] is within 0.04 with probability 1 - 0.96^2 = 0.0784.
    assert abs(input_independent_error(Addition(80), cases=4000) - (1 - 0.0784)) < 0.03
    # Memorisation: guess 5 bits (2.5 wrong) or 10 five-ary symbols (8 wrong); Table 5 says 2.5 and 8.0.
    assert abs(input_independent_error(Memorization5Bit(200), cases=4000) - 2.5) < 0.15
    assert abs(input_independent_error(Memorization20Bit(80), cases=4000) - 8.0) < 0.2


@pytest.mark.parametrize(
    "name, T", [("addition", 10), ("xor", 12), ("temporal_order", 10), ("memorization_5bit", 2)]
)
def test_task_batches_drive_the_curvature_engine(name, T):
    task = make_task(name, T)
    model = TanhRNN(task.n_in, 3, task.n_out, dtype=torch.float64, generator=make_generator(0))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=make_generator(1), dtype=p.dtype))
    batch = task.batch(3, make_generator(2), dtype=torch.float64)
    report = finite_difference_check(
        model, task.loss, batch, coordinates=40, generator=make_generator(3)
    )
    assert max(report["jvp"], report["vjp"], report["ggn"]) < 1e-6, report


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_task_draws_a_figure(name):
    task = make_task(name, 20)
    fig = task_figure(task, cases=2)
    heatmaps = [trace for trace in fig.data if trace.type == "heatmap"]
    assert len(heatmaps) == 2 and heatmaps[0].z.shape == (task.n_in, task.length)
    assert name in fig.layout.title.text


def test_bad_input_gets_clear_errors():
    with pytest.raises(ValueError, match="is not one of"):
        make_task("parity", 50)
    with pytest.raises(ValueError, match="needs T ≥ 10, got 9"):
        make_task("temporal_order_3bit", 9)
    with pytest.raises(TypeError, match="T: expected an int"):
        Addition(50.0)
    with pytest.raises(ValueError, match="cases"):
        Addition(50).batch(0)


def test_batches_on_the_requested_device_and_dtype(device):
    inputs, targets = Addition(20).batch(8, make_generator(0), device=device, dtype=torch.float64)
    assert inputs.device.type == device.type and targets.dtype == torch.float64
    cpu_inputs, _ = Addition(20).batch(8, make_generator(0), dtype=torch.float64)
    torch.testing.assert_close(inputs.cpu(), cpu_inputs)  # the same data on every device


def test_biases_command_reports_the_papers_numbers_beside_ours():
    done = subprocess.run(
        [
            str(Path(sys.executable).parent / "qnwb"),
            "tasks",
            "biases",
            "--seeds",
            "1",
            "--cases",
            "2000",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    rows = {(r["task"], r["T"]): r for r in json.loads(done.stdout.splitlines()[-1])}
    assert (
        rows[("memorization_20bit", 80)]["paper"] == 8.0
        and abs(rows[("memorization_20bit", 80)]["error"] - 8.0) < 0.3
    )
    assert set(rows) == {
        ("addition", 80),
        ("multiplication", 80),
        ("memorization_5bit", 200),
        ("memorization_20bit", 80),
    }


@pytest.mark.parametrize("name", ["addition", "xor", "temporal_order", "random_permutation"])
def test_outputs_at_steps_without_a_target_never_count(name):
    task = make_task(name, 20)
    _, targets = task.batch(16, make_generator(4))
    right = {
        "squared_error": lambda t: t,
        "sigmoid_cross_entropy": lambda t: 4 * t - 2,
        "softmax_cross_entropy": lambda t: 4 * t,
    }
    perfect = right[task.loss](targets.nan_to_num())  # right at the target step
    noisy = perfect.clone()
    noisy[:, :-1] = 50 * torch.randn(
        noisy[:, :-1].shape, generator=make_generator(5)
    )  # confident nonsense elsewhere
    assert task.error(perfect, targets) == 0.0
    assert task.error(noisy, targets) == 0.0 and task.success(noisy, targets)


@pytest.mark.parametrize("name", ["addition_hs", "multiplication_hs"])
@pytest.mark.parametrize("T", [20, 31, 100])
def test_hochreiter_schmidhuber_variants_follow_their_definition(name, T):
    """H&S 1997 experiments 4–5: lengths uniform on T … T + T/10, −1 markers at both ends, X₁ in the first
    ten pairs, X₂ in the first T/2 − 1 unmarked ones, the target at each sequence's own end, 0.04 on it."""
    task = make_task(name, T)
    inputs, targets = task.batch(3000, make_generator(T), dtype=torch.float64)
    cases, rows = inputs.shape[0], torch.arange(inputs.shape[0])
    assert task.length == T + T // 10 and inputs.shape == (cases, task.length, 2)
    present = ~torch.isnan(targets[..., 0])
    assert bool((present.sum(1) == 1).all())
    ends = present.float().argmax(1)
    assert set(ends.tolist()) == set(range(T - 1, T + T // 10))  # every length occurs
    values, markers = inputs[..., 0], inputs[..., 1]
    assert bool((markers[:, 0] == -1).all() and (markers[rows, ends] == -1).all())
    assert bool(((markers == -1).sum(1) == 2).all() or T // 10 == 0)
    marked = markers == 1
    positions = torch.arange(task.length).expand(cases, -1)
    assert bool((positions[marked] <= T // 2 - 1).all())  # both within the first T/2 pairs
    first = torch.where(marked, positions, task.length).amin(1)
    assert bool(((first <= 9) | (marked.sum(1) < 2)).all())  # (pair 0 drawn: one +1 mark left)
    assert bool((values[positions > ends[:, None]] == 0).all())  # silent after the end
    hits = torch.where(marked, values, 0.0 if name == "addition_hs" else 1.0)
    expected = 0.5 + hits.sum(1) / 4 if name == "addition_hs" else hits.prod(1)
    torch.testing.assert_close(targets[rows, ends, 0], expected, rtol=0, atol=1e-6)
    low = float(values[positions <= ends[:, None]].min())
    assert (low < -0.99) if name == "addition_hs" else (low >= 0.0)
    outputs = targets.clone()
    outputs[rows, ends, 0] += 0.039
    assert task.success(outputs, targets)  # within 0.04 of the scaled target: right
    outputs[0, ends[0], 0] += 0.002
    assert not task.success(outputs, targets) and task.error(outputs, targets) == 1 / cases
