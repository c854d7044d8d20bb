"""The runner: problems, budgets, evaluations, steering, bit-for-bit resume, SIGKILL and concurrent runs, bad input."""

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from qnwb.problems import PROBLEMS, EpochStream, make_problem, problem_options
from qnwb.quadratic import Quadratic
from qnwb.runs import BUDGET_UNITS, Runner, check_config, load_config, run_config
from qnwb.store import RunStore

TINY = {
    "addition": {"T": 10, "hidden": 6, "batch_size": 20, "held_out": 50},
    "curves": {"size": 8, "sizes": [12, 4], "train": 60, "test": 20, "batch_size": 25},
    "char_lm": {"hidden": 8, "length": 6, "batch_size": 8, "held_out": 10},
    "quadratic": {"n": 6, "batch_size": 3},
    "lenet": {"train": 40, "test": 10, "batch_size": 20},
    "pixel_mnist": {"hidden": 6, "train": 40, "test": 10, "batch_size": 20},
}
HYPER = {
    "hessian_free": {"cg_max_iterations": 5},
    "lbfgs": {"lr": 0.1, "line_search": "armijo", "memory": 3},
    "sqn": {"lr": 0.05, "L": 2, "memory": 3},
    "adaqn": {"lr": 0.05, "L": 2, "memory": 3, "fisher_memory": 4},
    "lsr1": {"memory": 3},
    "cm": {"lr": 0.01},
    "nag": {"lr": 0.01, "momentum": {"schedule": "SutskeverMomentum", "period": 3}},
    "sgd": {"lr": 0.01},
    "adagrad": {"lr": 0.05},
    "adam": {"lr": 0.01},
}


def config(optimizer="adam", problem="addition", steps=6, **more):
    return {
        "problem": problem,
        "problem_options": TINY[problem],
        "optimizer": optimizer,
        "hyperparameters": HYPER[optimizer],
        "budget": {"steps": steps},
        "evaluate_every": 2,
        "device": "cpu",
        "seed": 3,
        **more,
    }


def params(runner):
    return [p.detach().clone() for p in runner.model.parameters()]


def untimed(steps):
    "The steps' stats as JSON (NaN == NaN), without timings (HF's gradient_s, cg_s, evaluation_s)."
    return json.dumps(
        [{k: v for k, v in x["stats"].items() if not k.endswith("_s")} for x in steps],
        sort_keys=True,
    )


def stop_at(k):
    return lambda info: info["step"] == k and info["runner"].request_stop()


# --------------------------------------------------------------------------------------------------------------------
# problems


@pytest.mark.parametrize(
    "name",
    [
        "addition",
        "xor",
        "temporal_order",
        "memorization_5bit",
        "curves",
        "char_lm",
        "quadratic",
        "lenet",
        "pixel_mnist",
    ],
)
def test_every_problem_builds_and_evaluates(name):
    options = TINY.get(name, {"T": 10, "hidden": 5, "batch_size": 10, "held_out": 20})
    p = make_problem(name, seed=0, device="cpu", **options)
    x, y = p.stream.next()
    loss = p.loss(p.model(x), y)
    assert torch.isfinite(loss) and loss.requires_grad
    for data in (p.held_out, p.train_sample, p.monitor, p.curvature_stream.next()):
        value, error = p.evaluate(data)
        assert math.isfinite(value) and math.isfinite(error) and error >= 0


def test_the_registry_covers_the_pathological_tasks_the_autoencoder_the_char_lm_images_and_quadratics():
    from qnwb.tasks import TASKS

    assert set(TASKS) | {"curves", "char_lm", "lenet", "pixel_mnist", "quadratic"} == set(PROBLEMS)
    assert problem_options("addition")["T"] == 20


def test_seeds_fix_weights_and_batches_and_the_held_out_set_is_shared():
    a, b, c = (make_problem("addition", seed=s, **TINY["addition"]) for s in (0, 0, 1))
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.model.parameters(), c.model.parameters()))
    assert torch.equal(a.stream.next()[0], b.stream.next()[0])
    assert not torch.equal(a.stream.next()[0], c.stream.next()[0])
    assert torch.equal(a.held_out[0], c.held_out[0])  # the same validation data for every seed


def test_every_optimizer_sees_the_same_batches_for_one_seed():
    seen = {}
    for name in ("adam", "lbfgs"):
        runner = Runner(config(name, steps=3), store=False, progress=False)
        draw = runner.problem.stream.draw
        batches = []
        runner.problem.stream.draw = lambda g, draw=draw, batches=batches: (
            batches.append(draw(g)) or batches[-1]
        )
        runner.run()
        seen[name] = batches
    assert all(torch.equal(a[0], b[0]) for a, b in zip(seen["adam"], seen["lbfgs"]))


def test_the_quadratic_problem_is_the_quadratic_in_float64():
    p = make_problem("quadratic", n=8, condition=50.0)
    q = Quadratic.log_uniform(8, 1 / 50, 1.0, seed=0)
    theta = p.model.theta.detach()
    expected = q.value(theta) - q.value(q.minimizer)
    assert p.model.theta.dtype == torch.float64
    assert p.evaluate(p.held_out)[0] == pytest.approx(float(expected), rel=1e-10)


def test_epoch_stream_visits_every_case_once_per_epoch_and_restores():
    s = EpochStream((torch.arange(12),), seed=5, batch_size=4)
    epoch = torch.cat([s.next()[0] for _ in range(3)])
    assert sorted(epoch.tolist()) == list(range(12))
    state = s.state_dict()
    ahead = [s.next()[0] for _ in range(4)]
    s.load_state_dict(state)
    assert all(torch.equal(a, s.next()[0]) for a in ahead)
    with pytest.raises(ValueError, match="batch_size"):
        EpochStream((torch.arange(3),), seed=0, batch_size=4)


# --------------------------------------------------------------------------------------------------------------------
# resume, bit for bit


@pytest.mark.parametrize("optimizer", sorted(HYPER))
def test_a_stopped_and_resumed_run_ends_bit_for_bit_where_an_uninterrupted_one_does(
    tmp_path, optimizer
):
    problem = "quadratic" if optimizer in ("lsr1",) else "addition"
    c = config(optimizer, problem, steps=9)
    whole = Runner(c, store=tmp_path / "s.sqlite", progress=False)
    whole.run()
    part = Runner(c, store=tmp_path / "s.sqlite", on_step=stop_at(4), progress=False)
    first = part.run()
    assert (first["status"], first["steps"]) == ("stopped", 4)
    del part
    resumed = Runner.resume(first["checkpoint"], progress=False)
    second = resumed.run()
    assert (second["status"], second["steps"], second["run_id"]) == ("finished", 9, first["run_id"])
    assert all(torch.equal(a, b) for a, b in zip(params(whole), params(resumed)))
    for key in ("gradient_evaluations", "curvature_products", "loss_evaluations"):
        assert second[key] == whole.counts[key]
    with RunStore(tmp_path / "s.sqlite") as s:
        a, b = s.steps(whole.run_id), s.steps(first["run_id"])
        assert [x["loss"] for x in a] == [x["loss"] for x in b]  # the same batches, the same losses
        assert untimed(a) == untimed(b)  # and the same statistics
        assert s.run(first["run_id"])["preemption_count"] == 1


@pytest.mark.parametrize("problem", ["curves", "char_lm"])
def test_resume_keeps_the_data_position_of_epoch_and_window_streams(tmp_path, problem):
    c = config(
        "adam", problem, steps=7, checkpoint=str(tmp_path / "c.pt")
    )  # curves: an epoch is 2 batches of 25 of 60
    whole = Runner(c, store=False, progress=False)
    whole.run()
    part = Runner(
        c, store=False, on_step=stop_at(3), progress=False, overwrite=True
    )  # replaces the first run's checkpoint
    part.run()
    resumed = Runner.resume(tmp_path / "c.pt", store=False, progress=False)
    resumed.run()
    assert all(torch.equal(a, b) for a, b in zip(params(whole), params(resumed)))
    if problem == "curves":
        assert resumed.problem.stream.epoch == pytest.approx(7 * 25 / 60)


def test_a_crashed_run_resumes_from_its_last_periodic_checkpoint(tmp_path):
    path = tmp_path / "s.sqlite"
    c = config("nag", steps=10, checkpoint_every=3)
    whole = Runner(c, store=path, progress=False)
    whole.run()

    def crash(info):
        if info["step"] == 8:
            raise RuntimeError("power cut")

    broken = Runner(c, store=path, on_step=crash, progress=False)
    with pytest.raises(RuntimeError, match="power cut"):
        broken.run()
    with RunStore(path) as s:
        run = s.run(broken.run_id)
        assert run["status"] == "failed" and "power cut" in run["error"] and run["steps"] == 8
    resumed = Runner.resume(run["checkpoint"], progress=False)  # the checkpoint of step 6
    assert resumed.step == 6
    resumed.run()
    assert all(torch.equal(a, b) for a, b in zip(params(whole), params(resumed)))
    with RunStore(path) as s:
        assert [x["step"] for x in s.steps(broken.run_id)] == list(range(1, 11))
        assert [x["loss"] for x in s.steps(broken.run_id)] == [
            x["loss"] for x in s.steps(whole.run_id)
        ]


def test_resume_can_extend_the_budget_of_a_finished_run(tmp_path):
    c = config("adam", steps=8)
    whole = Runner(c, store=tmp_path / "s.sqlite", progress=False)
    whole.run()
    short = run_config({**c, "budget": {"steps": 5}}, store=tmp_path / "s.sqlite", progress=False)
    longer = Runner.resume(short["checkpoint"], budget={"steps": 8}, progress=False)
    assert longer.run()["steps"] == 8
    assert all(torch.equal(a, b) for a, b in zip(params(whole), params(longer)))


def test_resume_refuses_what_is_not_a_checkpoint(tmp_path):
    (tmp_path / "x.pt").write_text("no")
    with pytest.raises(ValueError, match="cannot read"):
        Runner.resume(tmp_path / "x.pt")
    torch.save({"a": 1}, tmp_path / "y.pt")
    with pytest.raises(ValueError, match="not a qnwb checkpoint"):
        Runner.resume(tmp_path / "y.pt")


# --------------------------------------------------------------------------------------------------------------------
# budgets, evaluations, targets, callbacks


def test_budgets_count_closure_calls_and_curvature_products():
    lbfgs = Runner(
        config("lbfgs", steps=1000, budget={"gradient_evaluations": 12}),
        store=False,
        progress=False,
    )
    calls = [0]
    step = lbfgs.optimizer.step
    lbfgs.optimizer.step = lambda closure, **kw: step(
        lambda: (calls.__setitem__(0, calls[0] + 1), closure())[1], **kw
    )
    out = lbfgs.run()
    assert out["gradient_evaluations"] == calls[0] >= 12
    assert (
        calls[0] - sum(1 for _ in [0]) < 12 + 25
    )  # stops at the first step boundary past the limit
    hf = Runner(
        config("hessian_free", budget={"curvature_products": 20, "steps": 100}),
        store=False,
        progress=False,
    )
    products = []
    original = hf.optimizer.step

    def counted(batch):
        value = original(batch)
        products.append(hf.optimizer.stats["curvature_products"])
        return value

    hf.optimizer.step = counted
    out = hf.run()
    assert out["curvature_products"] == sum(products) >= 20 > sum(products[:-1])
    assert out["gradient_evaluations"] == out["steps"] == len(products)


def test_an_epoch_budget_and_the_evaluations_unit():
    out = run_config(config("sgd", "curves", budget={"epochs": 2.0}), store=False, progress=False)
    assert out["steps"] == 5 and out["epochs"] == pytest.approx(
        5 * 25 / 60
    )  # 2 batches per epoch of 60; the 5th starts at 1.67
    hf = run_config(config("hessian_free", budget={"evaluations": 30}), store=False, progress=False)
    assert hf["gradient_evaluations"] + hf["curvature_products"] >= 30


def test_evaluations_at_the_interval_at_the_start_and_at_the_end(tmp_path):
    runner = Runner(
        config("adam", steps=7, evaluate_every=3), store=tmp_path / "s.sqlite", progress=False
    )
    runner.run()
    with RunStore(tmp_path / "s.sqlite") as s:
        rows = s.evaluations(runner.run_id)
    assert [r["step"] for r in rows] == [0, 3, 6, 7]
    assert all(r["validation_loss"] is not None and r["train_loss"] is not None for r in rows)
    assert rows[-1]["validation_loss"] == pytest.approx(
        runner.problem.evaluate(runner.problem.held_out)[0]
    )
    work = Runner(
        config("hessian_free", steps=12, evaluate_every=10, evaluate_unit="evaluations"),
        store=False,
        progress=False,
    )
    work.run()
    done = [0] + [
        x["gradient_evaluations"] + x["curvature_products"] for x in work.history["steps"]
    ]
    assert (
        max(b - a for a, b in zip(done, done[1:])) < 10
    )  # a step does less work than the interval
    crossed = [
        t for t in range(1, len(done)) if done[t] // 10 > done[t - 1] // 10
    ]  # steps that pass a multiple of 10 evaluations
    assert len(crossed) >= 3
    assert [e["step"] for e in work.history["evaluations"]] == [0, *crossed] + (
        [12] if crossed[-1] != 12 else []
    )


def test_a_target_stops_the_run_early():
    c = {
        "problem": "quadratic",
        "problem_options": {"n": 6},
        "optimizer": "lbfgs",
        "device": "cpu",
        "hyperparameters": {"line_search": "strong_wolfe", "full_batch": True},
        "budget": {"steps": 200},
        "evaluate_every": 1,
        "target": {"validation_error": 1e-8},
    }
    out = run_config(c, store=False, progress=False)
    assert out["reached_target"] and out["status"] == "finished" and out["steps"] < 200
    assert out["last_evaluation"]["validation_error"] <= 1e-8


def test_on_step_gets_the_step_the_work_the_stats_and_the_evaluation():
    seen = []
    run_config(config("lbfgs", steps=4), store=False, progress=False, on_step=seen.append)
    assert [i["step"] for i in seen] == [1, 2, 3, 4]
    assert [i["evaluation"] is not None for i in seen] == [False, True, False, True]
    assert all("memory_size" in i["stats"] and i["gradient_evaluations"] >= i["step"] for i in seen)
    assert seen[-1]["runner"].step == 4


def test_a_background_run_stops_on_its_event_and_records_steering(tmp_path):
    stop, steps = threading.Event(), []
    runner = Runner(
        config("cm", steps=10_000),
        store=tmp_path / "s.sqlite",
        on_step=lambda i: steps.append(i["step"]),
        progress=False,
    )
    thread = threading.Thread(target=runner.run, kwargs={"stop": stop})
    thread.start()
    while len(steps) < 3:
        time.sleep(0.001)
    runner.steer("lr", 0.005)
    runner.steer("momentum", 0.5)
    while runner.optimizer.param_groups[0]["momentum"] != 0.5:
        time.sleep(0.001)
    stop.set()
    thread.join()
    with RunStore(tmp_path / "s.sqlite") as s:
        run = s.run(runner.run_id)
        events = s.steering_events(runner.run_id)
    assert run["status"] == "stopped" and run["steps"] == runner.step < 10_000
    assert [(e["parameter"], e["old_value"], e["new_value"]) for e in events] == [
        ("lr", 0.01, 0.005),
        ("momentum", 0.9, 0.5),
    ]
    assert events[0]["step"] == events[1]["step"] >= 3
    with pytest.raises(ValueError, match="steerable"):
        runner.steer("momentun", 0.5)


def test_a_scheduled_momentum_is_steered_to_another_schedule_and_to_a_number(tmp_path):
    from qnwb.optim.schedules import SutskeverMomentum

    c = config("nag", steps=9)  # momentum: SutskeverMomentum with period 3 (μ_max 0.999)
    runner = Runner(c, store=tmp_path / "s.sqlite", progress=False)
    spec = {"schedule": "SutskeverMomentum", "mu_max": 0.8, "period": 1}
    runner.on_step = lambda info: (
        (info["step"] == 3 and runner.steer("momentum", spec))
        or (info["step"] == 6 and runner.steer("momentum", 0.3))
    )
    seen = []
    runner.on_step, steer = (
        (lambda info: (seen.append(runner.optimizer.param_groups[0]["momentum"]), steer(info))),
        runner.on_step,
    )
    runner.run()
    configured, steered = SutskeverMomentum(period=3), SutskeverMomentum(mu_max=0.8, period=1)
    # the momentum of update t (t = 0, 1, ...): the configured schedule, then the steered one at the same t, then the number
    assert seen == [configured(t) for t in range(3)] + [steered(t) for t in range(3, 6)] + [0.3] * 3
    assert (
        steered(5) == 0.8 and configured(5) == 0.75
    )  # the two schedules differ where it is checked
    with RunStore(tmp_path / "s.sqlite") as s:
        events = s.steering_events(runner.run_id)
    assert [(e["step"], e["old_value"], e["new_value"]) for e in events] == [
        (3, {"schedule": "SutskeverMomentum", "period": 3}, spec),
        (6, spec, 0.3),
    ]


@pytest.mark.parametrize(
    "value, message",
    [
        ({"schedule": "Bogus"}, "is not one of"),
        ({"schedule": "SutskeverMomentum", "mu_max": 1.5}, "mu_max"),
        ({"schedule": "RNNMomentum", "mu_zero": 0.9}, "refused"),
        (1.0, "momentum = 1.0 is refused"),
    ],
)
def test_bad_momentum_schedules_are_refused_and_change_nothing(value, message):
    runner = Runner(config("nag"), store=False, progress=False)
    with pytest.raises(ValueError, match=message):
        runner.steer("momentum", value)
    assert runner._steering == [] and "momentum" in runner.optimizer.schedules


def test_only_cm_and_nag_take_schedules():
    hf = Runner({**_SMALL, "optimizer": "hessian_free"}, store=False, progress=False)
    assert hf.schedulable() == [] and Runner(
        config("cm"), store=False, progress=False
    ).schedulable() == ["lr", "momentum"]
    with pytest.raises(ValueError, match="takes a number, not a schedule"):
        hf.steer("damping", {"schedule": "Constant", "value": 1.0})


def test_a_steered_schedule_survives_a_checkpoint_and_a_replay(tmp_path):
    from qnwb.runs import replay

    c = config("nag", steps=8)
    spec = {"schedule": "RNNMomentum", "mu0": 0.5, "switch": 5, "initial": 0.2}
    whole = Runner(c, store=tmp_path / "s.sqlite", progress=False)
    whole.on_step = lambda info: info["step"] == 2 and whole.steer("momentum", spec)
    whole.run()
    part = Runner(c, store=tmp_path / "s.sqlite", progress=False)
    part.on_step = lambda info: (
        (info["step"] == 2 and part.steer("momentum", spec)) or stop_at(4)(info)
    )
    first = part.run()
    resumed = Runner.resume(first["checkpoint"], progress=False)
    assert resumed.schedule_specs == {"momentum": spec}
    resumed.run()
    again = replay(whole.run_id, tmp_path / "s.sqlite")
    for other in (resumed, again):
        assert all(torch.equal(a, b) for a, b in zip(params(whole), params(other)))
    assert whole.optimizer.param_groups[0]["momentum"] == 0.5


def test_a_diverging_run_is_marked_failed(tmp_path):
    c = {
        "problem": "quadratic",
        "problem_options": {"n": 6, "condition": 10.0},
        "optimizer": "sgd",
        "device": "cpu",
        "hyperparameters": {"lr": 1e4},
        "budget": {"steps": 50},
    }
    runner = Runner(c, store=tmp_path / "s.sqlite", progress=False)
    with pytest.raises(FloatingPointError, match="not finite|inf|nan"):
        runner.run()
    with RunStore(tmp_path / "s.sqlite") as s:
        run = s.run(runner.run_id)
    assert run["status"] == "failed" and "FloatingPointError" in run["error"]


def test_the_progress_bar_counts_the_budget_unit(capsys):
    run_config(config("adam", steps=3), store=False, progress=True)
    err = capsys.readouterr().err
    assert "adam on addition" in err and "/3 " in err and "steps/s" in err


# --------------------------------------------------------------------------------------------------------------------
# bad input: a clear error and no rows


@pytest.mark.parametrize(
    "change, message",
    [
        ({"optimizer": "adamw"}, "optimizer: 'adamw' is not one of"),
        ({"problem": "adittion"}, "problem: 'adittion' is not one of"),
        ({"budget": {"steps": 0}}, r"budget\['steps'\]: must be a positive int"),
        ({"budget": {"gradient_evaluations": 0}}, "must be a positive int"),
        ({"budget": {"seconds": 0.0}}, r"budget\['seconds'\]: must be in \(0"),
        ({"budget": {}}, "budget: give a mapping"),
        ({"budget": {"flops": 3}}, "'flops' is not one of"),
        ({"hyperparameters": {"lrr": 0.1}}, r"\['lrr'\] are not hyperparameters of 'adam'"),
        ({"hyperparameters": {"lr": -1.0}}, "hyperparameters of .adam.: lr: must be in"),
        ({"problem_options": {"T": 1}}, "T"),
        ({"problem": "addition", "budget": {"epochs": 1}}, "has no epochs"),
        ({"target": {"accuracy": 0.9}}, "'accuracy' is not one of"),
        ({"seed": -1}, "seed"),
        ({"seeds": [1, 2]}, r"unknown keys \['seeds'\]"),
        ({"device": "tpu"}, "device"),
        ({"budget": {"curvature_products": 10}}, "would never end"),  # adam computes none
        ({"evaluate_unit": "curvature_products"}, "evaluate_unit"),
    ],
)
def test_bad_configurations_fail_clearly_and_store_nothing(tmp_path, change, message):
    path = tmp_path / "s.sqlite"
    RunStore(path).close()
    with pytest.raises((ValueError, TypeError), match=message):
        Runner({**config("adam"), **change}, store=path, progress=False)
    with RunStore(path) as s:
        assert s.runs() == []


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("missing.json", None, "cannot read"),
        ("bad.json", "{problem: addition", "is not valid JSON"),
        ("bad.yaml", "problem: [addition", "is not valid YAML"),
        ("list.json", "[1, 2]", "must hold a mapping"),
        ("binary.json", b"\xff\xfe\x00", "cannot read"),
    ],
)
def test_unreadable_configurations_fail_clearly_and_store_nothing(tmp_path, name, text, message):
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    elif text is not None:
        path.write_text(text)
    with pytest.raises(ValueError, match=message):
        run_config(path, store=tmp_path / "s.sqlite", progress=False)
    assert not (tmp_path / "s.sqlite").exists()


def test_json_and_yaml_configurations_load(tmp_path):
    c = config("adam", steps=2)
    (tmp_path / "c.json").write_text(json.dumps(c))
    yaml = pytest.importorskip("yaml")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(c))
    assert load_config(tmp_path / "c.json") == load_config(tmp_path / "c.yaml") == check_config(c)
    assert run_config(tmp_path / "c.yaml", store=False, progress=False)["steps"] == 2


def test_a_store_that_cannot_be_written_fails_before_the_run(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="store: cannot make the folder"):
        Runner(config("adam"), store=tmp_path / "file" / "s.sqlite", progress=False)
    with pytest.raises(ValueError, match="is not a file"):
        Runner(config("adam"), store=tmp_path, progress=False)


def test_every_budget_unit_is_accepted():
    for unit in BUDGET_UNITS:
        problem = "curves" if unit == "epochs" else "addition"
        limit = 1e-6 if unit == "seconds" else 1
        optimizer = "hessian_free" if unit == "curvature_products" else "sgd"
        runner = Runner(
            config(optimizer, problem, budget={"steps": 50, unit: limit}),
            store=False,
            progress=False,
        )
        out = runner.run()
        assert (
            out["status"] == "finished" and 1 <= out["steps"] < 50 and runner.counter(unit) >= limit
        )


# --------------------------------------------------------------------------------------------------------------------
# processes: SIGKILL and concurrent writers

SCRIPT = textwrap.dedent("""
    import json, pathlib, sys, time
    from qnwb.runs import Runner
    config, barrier = json.loads(sys.argv[2]), int(sys.argv[3])
    folder = pathlib.Path(sys.argv[1]).parent

    def meet(info):  # after its first step, each run waits until every run has taken one
        if info["step"] == 1:
            (folder / f"ready-{config['seed']}").touch()
            while len(list(folder.glob("ready-*"))) < barrier:
                time.sleep(0.001)
    print(Runner(config, store=sys.argv[1], on_step=meet, progress=False).run()["status"])
""")


def _spawn(store, c, barrier=1):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(store), json.dumps(c), str(barrier)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_sigkill_mid_run_leaves_a_readable_store_with_every_completed_step(tmp_path):
    path = tmp_path / "s.sqlite"
    child = _spawn(path, config("adam", steps=10**7))
    try:
        while True:
            assert child.poll() is None, child.communicate()
            if path.exists():
                with RunStore(path, mark_dead=False) as s:
                    stored = s._query("SELECT COUNT(*) AS n FROM steps")[0]["n"]
                if stored >= 20:
                    break
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL
    with RunStore(path) as s:
        assert s._query("PRAGMA integrity_check")[0]["integrity_check"] == "ok"
        (run,) = s.runs()
        steps = s.steps(run["id"])
        assert run["status"] == "killed"
        assert len(steps) >= 20 and [x["step"] for x in steps] == list(range(1, len(steps) + 1))
        assert run["steps"] == len(
            steps
        )  # the run row agrees with its steps: one transaction for both
        assert all(math.isfinite(x["loss"]) and x["stats"] for x in steps)
        assert s.evaluations(run["id"])[0]["step"] == 0


def test_two_runs_in_two_processes_write_one_store_at_once(tmp_path):
    path = tmp_path / "s.sqlite"
    children = [
        _spawn(
            path,
            {**config("adam", steps=150, evaluate_every=10), "seed": seed, "name": f"seed {seed}"},
            barrier=2,
        )
        for seed in (0, 1)
    ]
    outputs = [child.communicate() for child in children]
    assert [child.returncode for child in children] == [0, 0], outputs
    assert [out.strip() for out, _ in outputs] == ["finished", "finished"]
    with RunStore(path) as s:
        runs = s.runs()
        assert sorted(r["name"] for r in runs) == ["seed 0", "seed 1"]
        for r in runs:
            assert r["status"] == "finished" and [x["step"] for x in s.steps(r["id"])] == list(
                range(1, 151)
            )
            assert [e["step"] for e in s.evaluations(r["id"])] == list(range(0, 151, 10))
        a, b = (s.steps(r["id"]) for r in runs)
        assert max(r["started"] for r in runs) < min(
            r["ended"] for r in runs
        )  # they ran at the same time (the barrier)
    assert [x["loss"] for x in a] != [x["loss"] for x in b]  # different seeds, different runs


# Each of these once misbehaved silently; the tests keep it from coming back.
_SMALL = {
    "problem": "addition",
    "problem_options": {"T": 10, "hidden": 8, "batch_size": 50},
    "budget": {"steps": 3},
    "evaluate_every": 3,
}


def test_hessian_free_gets_its_own_curvature_batch_when_one_is_configured():
    runner = Runner(
        {**_SMALL, "optimizer": "hessian_free", "curvature_batch_size": 10},
        store=False,
        progress=False,
    )
    sizes, step = [], runner.optimizer.step

    def spy(batch, curvature_batch=None, **options):
        sizes.append(None if curvature_batch is None else curvature_batch[0].shape[0])
        return step(batch, curvature_batch=curvature_batch, **options)

    runner.optimizer.step = spy
    runner.run()
    assert sizes == [10, 10, 10]
    with pytest.raises(ValueError, match="'adam' computes no curvature-vector products"):
        Runner(
            {**_SMALL, "optimizer": "adam", "curvature_batch_size": 10}, store=False, progress=False
        )


def test_running_again_with_a_raised_budget_marks_the_run_running(tmp_path):
    store = RunStore(tmp_path / "s.sqlite")
    runner = Runner({**_SMALL, "optimizer": "adam"}, store=store, progress=False)
    runner.run()
    seen = []
    runner.on_step = lambda info: seen.append(store.run(runner.run_id)["status"])
    runner.config["budget"] = {"steps": 6}
    runner.run()
    row = store.run(runner.run_id)
    assert (
        seen == ["running"] * 3
        and row["status"] == "finished"
        and row["steps"] == 6
        and row["preemption_count"] == 0
    )


def test_steering_refuses_values_the_constructor_refuses():
    lbfgs = Runner({**_SMALL, "optimizer": "lbfgs"}, store=False, progress=False)
    assert {"memory", "lr"} <= set(lbfgs.steerable())
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match=f"memory = {bad!r} is refused"):
            lbfgs.steer("memory", bad)
    with pytest.raises(ValueError, match="cannot be steered"):
        lbfgs.steer("memroy", 2)
    hf = Runner({**_SMALL, "optimizer": "hessian_free"}, store=False, progress=False)
    with pytest.raises(ValueError, match="damping = -1.0 is refused"):
        hf.steer("damping", -1.0)
    hf.steer("damping", 0.5)
    hf.run()
    assert [e["new_value"] for e in hf.history["steering"]] == [0.5]


def test_resume_is_bit_for_bit_with_a_curvature_batch_on_a_fixed_training_set(tmp_path):
    config = {
        "problem": "curves",
        "problem_options": {"size": 8, "train": 200, "test": 50, "batch_size": 50},
        "optimizer": "sqn",
        "budget": {"steps": 8},
        "evaluate_every": 4,
        "curvature_batch_size": 20,
    }
    whole = Runner(config, store=False, progress=False)
    whole.run()
    first = Runner(
        {**config, "budget": {"steps": 4}, "checkpoint": str(tmp_path / "ck.pt")},
        store=False,
        progress=False,
    )
    first.run()
    rest = Runner.resume(tmp_path / "ck.pt", store=False, budget={"steps": 8}, progress=False)
    rest.run()
    assert all(torch.equal(p, q) for p, q in zip(whole.model.parameters(), rest.model.parameters()))


def test_evaluate_works_outside_run():
    runner = Runner({**_SMALL, "optimizer": "adam"}, store=False, progress=False)
    assert runner.evaluate()["step"] == 0


@pytest.mark.parametrize("optimizer", ["lbfgs", "sqn", "adaqn", "lsr1"])
def test_a_steered_memory_size_and_L_take_effect_survive_a_checkpoint_and_replay(
    tmp_path, optimizer
):
    from qnwb.runs import replay

    problem = "quadratic" if optimizer == "lsr1" else "addition"
    c = config(optimizer, problem, steps=10)
    changes = {
        3: [("memory", 1)],
        5: [("L", 3)] if optimizer in ("sqn", "adaqn") else [],
        6: [("memory", 4)],
    }

    def steer(runner):
        return lambda info: [runner.steer(*change) for change in changes.get(info["step"], [])]

    whole = Runner(c, store=tmp_path / "s.sqlite", progress=False)
    capacity = []
    whole.on_step = lambda info: (
        capacity.append(info["stats"]["memory_capacity"]),
        steer(whole)(info),
    )
    whole.run()
    assert capacity == [3] * 3 + [1] * 3 + [4] * 4 and whole.optimizer.memory.size == 4
    if optimizer in (
        "sqn",
        "adaqn",
    ):  # steered after step 5, inside the cycle of steps 5–6: that cycle keeps L = 2
        assert [s["stats"]["cycle_length"] for s in whole.history["steps"]] == [2] * 6 + [3] * 4
    part = Runner(c, store=tmp_path / "s.sqlite", progress=False)
    part.on_step = lambda info: (steer(part)(info), stop_at(7)(info))
    first = part.run()
    resumed = Runner.resume(first["checkpoint"], progress=False)
    resumed.run()
    again = replay(whole.run_id, tmp_path / "s.sqlite")
    for other in (resumed, again):
        assert all(torch.equal(a, b) for a, b in zip(params(whole), params(other)))


def test_queued_changes_are_checked_together_and_construction_only_settings_are_not_steerable():
    hf = Runner(
        {**_SMALL, "optimizer": "hessian_free", "hyperparameters": {"cg_max_iterations": 10}},
        store=False,
        progress=False,
    )
    hf.steer("cg_min_iterations", 8)  # fine with the 10 in force
    with pytest.raises(ValueError, match="cg_max_iterations = 5 is refused"):
        hf.steer("cg_max_iterations", 5)  # 5 < the queued cg_min_iterations 8
    assert hf._steering == [("cg_min_iterations", 8)]
    for optimizer, fixed in (
        ("lsr1", "gamma"),
        ("adaqn", "adagrad_epsilon"),
        ("lbfgs", "h0_epsilon"),
        ("lbfgs", "rmsprop_decay"),
        ("adagrad", "initial_accumulator_value"),
    ):
        runner = Runner({**_SMALL, "optimizer": optimizer}, store=False, progress=False)
        assert fixed not in runner.steerable() and fixed in runner.optimizer.param_groups[0]
        with pytest.raises(ValueError, match="cannot be steered"):
            runner.steer(fixed, 0.5)


def test_a_memory_that_cannot_be_allocated_is_refused_as_a_value_and_nothing_of_the_real_size_is_built():
    adaqn = Runner({**_SMALL, "optimizer": "adaqn"}, store=False, progress=False)
    with pytest.raises(
        ValueError, match="memory = 10000000000000 is refused: "
    ):  # by the bound on slots, before allocating
        adaqn.steer("memory", 10**13)
    assert adaqn._steering == [] and adaqn.optimizer.memory.size == 10


def test_a_schedule_is_checked_at_the_optimizers_current_update():
    runner = Runner(config("nag", steps=4), store=False, progress=False)
    runner.run()  # 4 updates taken
    late = {
        "schedule": "FineTuning",
        "base": {"schedule": "Constant", "value": 0.9},
        "total": 6,
        "last": 4,
        "value": -0.5,
    }
    with pytest.raises(
        ValueError, match="momentum"
    ):  # fine at t = 0 … 1, negative from t = 2: refused now, at t = 4
        runner.steer("momentum", late)


def test_the_image_problems_read_mnist_and_cifar_files_written_in_their_formats(tmp_path):
    from qnwb.core import make_generator
    from qnwb.data import MNIST_FILES, write_cifar10_batch, write_idx

    g = make_generator(0)
    for split, count in (("train", 30), ("test", 12)):
        images = torch.randint(0, 256, (count, 28, 28), generator=g, dtype=torch.uint8)
        labels = torch.arange(count, dtype=torch.uint8) % 10
        write_idx(tmp_path / "mnist" / f"{MNIST_FILES[split][0]}.gz", images)
        write_idx(tmp_path / "mnist" / MNIST_FILES[split][1], labels)
    lenet = make_problem("lenet", dataset="mnist", root=str(tmp_path / "mnist"), batch_size=10)
    assert lenet.held_out[0].shape == (12, 1, 28, 28) and lenet.held_out[1].tolist() == [
        k % 10 for k in range(12)
    ]
    pixels = make_problem(
        "pixel_mnist", dataset="mnist", root=str(tmp_path / "mnist"), hidden=4, batch_size=10
    )
    assert pixels.held_out[0].shape == (12, 784, 1)
    assert pixels.held_out[1][:, -1].argmax(-1).tolist() == [k % 10 for k in range(12)]
    cifar = tmp_path / "cifar"
    for name, count in [(f"data_batch_{i}", 4) for i in range(1, 6)] + [("test_batch", 6)]:
        write_cifar10_batch(
            cifar / name,
            torch.randint(0, 256, (count, 3, 32, 32), generator=g, dtype=torch.uint8),
            [1] * count,
        )
    colour = make_problem("lenet", dataset="cifar10", root=str(cifar), batch_size=5, test=4)
    assert colour.held_out[0].shape == (4, 3, 32, 32) and colour.model(
        colour.held_out[0]
    ).shape == (4, 10)
    for name in ("lenet", "pixel_mnist"):
        p = make_problem(name, dataset="mnist", root=str(tmp_path / "mnist"), batch_size=10)
        value, error = p.evaluate(p.held_out)
        assert math.isfinite(value) and 0.0 <= error <= 1.0
