"""qnwb.optim.schedules: the values of Sutskever et al. 2013's schedules at chosen updates, and clear errors."""

import math

import pytest

from qnwb.optim.schedules import (
    AnnealedRate,
    Constant,
    FineTuning,
    NesterovMomentum,
    RNNMomentum,
    SutskeverMomentum,
    evaluate_schedule,
    schedule_figure,
)


@pytest.mark.parametrize(
    "t, expected",
    [
        (0, 0.5),
        (249, 0.5),
        (250, 0.75),
        (500, 1 - 1 / 6),
        (749, 1 - 1 / 6),
        (750, 0.875),
        (1750, 0.9375),
        (100_000, 1 - 2 ** (-1 - math.log2(401))),
    ],
)
def test_eq_5_at_chosen_updates(t, expected):
    assert SutskeverMomentum(mu_max=0.999)(t) == pytest.approx(expected, abs=1e-15)


@pytest.mark.parametrize("mu_max", [0.0, 0.9, 0.99, 0.995, 0.999])
def test_eq_5_is_capped_by_mu_max_and_never_decreases(mu_max):
    values = SutskeverMomentum(mu_max).values(20_000)
    assert max(values) == pytest.approx(min(mu_max, values[-1]) if mu_max else 0.0)
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert (
        SutskeverMomentum(mu_max)(10**7) == mu_max
    )  # 1 − 2^{−1−log2(40001)} ≈ 0.99999 exceeds every mu_max


def test_nesterov_and_the_rnn_schedule_switch_at_1000():
    assert [NesterovMomentum()(t) for t in (0, 1, 95)] == pytest.approx([0.4, 0.5, 0.97])
    rnn = RNNMomentum(mu0=0.98)
    assert [rnn(0), rnn(999), rnn(1000), rnn(50_000)] == [0.9, 0.9, 0.98, 0.98]
    assert RNNMomentum(mu0=0.0)(1000) == 0.0


def test_fine_tuning_switches_the_last_n_updates_and_keeps_zero_momentum():
    tuned = FineTuning(SutskeverMomentum(0.999), total=750_000, last=1000)
    assert (
        tuned(748_999) == SutskeverMomentum(0.999)(748_999)
        and tuned(749_000) == 0.9
        and tuned(749_999) == 0.9
    )
    assert FineTuning(Constant(0.0), total=100, last=10)(95) == 0.0
    assert FineTuning(lambda t: 0.99, total=20, last=5, value=0.5).values(20)[14:] == [
        0.99,
        0.5,
        0.5,
        0.5,
        0.5,
        0.5,
    ]


def test_annealed_rate_of_appendix_a6():
    curves, mnist = AnnealedRate(500, start=4000), AnnealedRate(250)
    assert [curves(0), curves(4000), curves(4500), curves(5000)] == [1.0, 1.0, 1.0, 0.5]
    assert [mnist(0), mnist(250), mnist(500)] == [1.0, 1.0, 0.5]


def test_a_dashboard_can_change_a_schedule_between_steps():
    schedule = SutskeverMomentum(0.999)
    before = schedule(10_000)
    schedule.mu_max = 0.9
    assert schedule(10_000) == 0.9 < before
    assert "mu_max=0.9" in repr(schedule)


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda: SutskeverMomentum(mu_max=1.0), "mu_max"),
        (lambda: SutskeverMomentum(mu_max=-0.1), "mu_max"),
        (lambda: SutskeverMomentum(period=0), "period"),
        (lambda: RNNMomentum(mu0=1.2), "mu0"),
        (lambda: RNNMomentum(switch=-1), "switch"),
        (lambda: FineTuning(0.9, total=10), "base"),
        (lambda: FineTuning(Constant(0.9), total=-1), "total"),
        (lambda: AnnealedRate(0.0), "c"),
        (lambda: AnnealedRate(1.0, initial=-1.0), "initial"),
        (lambda: Constant(math.nan), "value"),
        (lambda: Constant(0.5)(-1), "t:"),
        (
            lambda: evaluate_schedule("lr", lambda t: -1.0, 7, 0.0, low_open=True),
            "lr: must be in .* schedule at update 7",
        ),
        (lambda: evaluate_schedule("lr", 0.0, 7, 0.0, low_open=True), "lr: must be in \\(0.0"),
    ],
)
def test_bad_schedules_get_clear_errors(make, words):
    with pytest.raises((ValueError, TypeError), match=words):
        make()


def test_the_schedule_figure_has_one_trace_per_schedule():
    figure = schedule_figure(
        {"eq. 5": SutskeverMomentum(0.99), "rnn": RNNMomentum(0.9)}, updates=1200, log_memory=True
    )
    assert [trace.name for trace in figure.data] == ["eq. 5", "rnn"] and len(
        figure.data[0].x
    ) == 1200
    assert figure.data[0].y[0] == pytest.approx(2.0) and figure.layout.yaxis.type == "log"
