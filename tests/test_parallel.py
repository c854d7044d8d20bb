"""Data parallelism on torch.distributed: two spawned gloo ranks compute what one process computes on the union batch."""

import math

import parallel_workers as workers
import pytest
import torch

from qnwb.parallel import launch, shard, world


@pytest.fixture(scope="module")
def products():
    return workers.products(), launch(workers.products, 2)


@pytest.mark.parametrize(
    "name",
    [
        "loss",
        "gradient",
        "ggn",
        "ggn_plain",
        "quadratic_form",
        "hessian",
        "fisher",
        "fisher_diagonal",
        "fisher_diagonal_streamed",
        "chapelle_erhan",
    ],
)
def test_every_product_on_two_ranks_equals_one_process_on_the_union(products, name):
    one, ranks = products
    assert [r["rank"] for r in ranks] == [0, 1]
    reference = one[name]
    assert reference.abs().max() > 0  # the batch's targets reach every product
    for r in ranks:
        assert float((r[name] - reference).norm() / reference.norm()) <= 1e-12
    assert torch.equal(ranks[0][name], ranks[1][name])  # every rank holds the same bits


def test_a_shard_without_the_sum_would_be_caught(products):
    one, _ = products
    half = shard(workers.batch(0), 0, 2)  # rank 0's cases alone
    model = workers.rnn(0)
    with torch.no_grad():
        value = workers.LOSS(model(half[0]), half[1])
    assert (
        abs(float(value) - float(one["loss"])) > 1e-3
    )  # the tests above compare numbers that differ without the sum


def _close(a, b) -> bool:
    return a == b or (
        isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)
    )


@pytest.fixture(scope="module")
def trajectories():
    return workers.trajectories(), launch(workers.trajectories, 2, timeout=120)


@pytest.mark.parametrize("name", list(workers.TRAJECTORIES))
def test_ten_steps_on_two_ranks_follow_one_process(trajectories, name):
    one, ranks = trajectories
    reference = one[name]["thetas"]
    moved = (reference[-1] - workers.flat_params(workers.rnn(0))).norm() / reference[-1].norm()
    assert moved > 1e-3  # the optimizer learns something to follow
    for r in ranks:
        deviation = (r[name]["thetas"] - reference).norm(dim=1) / reference.norm(dim=1)
        assert float(deviation.max()) <= 1e-10, deviation.tolist()


@pytest.mark.parametrize("name", list(workers.TRAJECTORIES))
def test_every_decision_is_the_same_on_every_rank_and_as_on_one_process(trajectories, name):
    one, (first, second) = trajectories
    assert torch.equal(first[name]["thetas"], second[name]["thetas"])
    for s1, s2, s in zip(first[name]["stats"], second[name]["stats"], one[name]["stats"]):
        timed = {k for k in s1 if k.endswith("_s") or k == "seconds"}
        assert all(_close(s1[k], s2[k]) for k in s1 if k not in timed), name
        decisions = {
            k for k, v in s.items() if isinstance(v, (bool, int, str))
        }  # accepted, CG stops, pairs, …
        assert {k: s1[k] for k in decisions} == {k: s[k] for k in decisions}


def test_one_process_leaves_batches_alone():
    batch = workers.batch(0)
    assert world() == (0, 1) and shard(batch) is batch


def test_a_rank_that_raises_ends_the_launch_with_its_error():
    with pytest.raises(RuntimeError, match=r"rank 0:[\s\S]*not one of"):
        launch(workers.trajectory, 2, "no_such_optimizer", {}, timeout=20)


RUN = {
    "problem": "addition",
    "optimizer": "adaqn",  # its monitoring set is sharded too
    "hyperparameters": {"lr": 0.05, "L": 3},
    "problem_options": {
        "T": 10,
        "hidden": 8,
        "batch_size": 40,
        "held_out": 61,
    },  # 61: shards of 31 and 30
    "budget": {"steps": 12},
    "evaluate_every": 4,
    "dtype": "float64",
}


def test_a_run_on_two_ranks_follows_one_process_and_only_rank_0_records_it(tmp_path):
    from qnwb.store import RunStore

    one = workers.run_config(RUN, str(tmp_path / "one.sqlite"))
    ranks = launch(workers.run_config, 2, RUN, str(tmp_path / "two.sqlite"))
    assert [r["run_id"] for r in ranks] == [1, None]  # rank 1 has no store
    for r in ranks:
        assert r["status"] == "finished"
        assert float((r["theta"] - one["theta"]).norm() / one["theta"].norm()) <= 1e-10
        assert all(abs(a - b) <= 1e-10 * abs(a) for a, b in zip(one["losses"], r["losses"]))
        for e1, e2 in zip(one["evaluations"], r["evaluations"], strict=True):
            assert all(
                abs(a - b) <= 1e-10 * abs(a) for a, b in zip(e1, e2)
            )  # held-out and training sample, sharded
    store = RunStore(tmp_path / "two.sqlite", read_only=True)
    (run,) = store.runs()
    assert run["status"] == "finished" and len(store.steps(run["id"])) == 12


def test_a_rank_that_dies_fails_the_run_with_an_error_not_a_hang(tmp_path):
    from qnwb.store import RunStore

    with pytest.raises(RuntimeError) as raised:
        launch(
            workers.run_config,
            2,
            RUN | {"budget": {"steps": 40}},
            str(tmp_path / "r.sqlite"),
            5,  # rank 1 exits after step 5
            timeout=30,
        )
    assert "rank 1: exited with code 3" in str(raised.value)
    (run,) = RunStore(tmp_path / "r.sqlite", read_only=True).runs()
    assert (
        run["status"] == "failed"
        and "RankLost: data parallel: a collective of rank 0 of 2 failed" in run["error"]
    )
    assert run["steps"] <= 6  # rank 0 stopped at the next collective after the loss


def test_qnwb_run_and_resume_with_processes_train_under_torchrun(tmp_path):
    import json
    import subprocess
    import sys

    config = tmp_path / "run.json"
    config.write_text(json.dumps(RUN | {"budget": {"steps": 4}}))
    store = ["--store", str(tmp_path / "s.sqlite")]
    qnwb = [sys.executable, "-m", "qnwb"]
    ranks = ["--processes", "2", "--quiet", "--json"]
    out = subprocess.run(
        [*qnwb, "run", str(config), *store, *ranks], capture_output=True, text=True, timeout=240
    )
    assert out.returncode == 0, out.stderr
    first = json.loads(out.stdout)  # rank 0 alone prints
    assert first["steps"] == 4 and first["status"] == "finished"
    out = subprocess.run(
        [*qnwb, "runs", "resume", str(first["run_id"]), "-b", "steps", "8", *store, *ranks],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr
    resumed = json.loads(out.stdout)
    alone = workers.run_config(RUN | {"budget": {"steps": 8}}, False)  # one process, no store
    assert resumed["steps"] == 8 and resumed["run_id"] == first["run_id"]
    last, reference = resumed["last_evaluation"]["validation_loss"], alone["evaluations"][-1][0]
    assert abs(last - reference) <= 1e-10 * reference


def test_a_checkpoint_of_two_ranks_resumes_on_one_process_on_the_same_trajectory(tmp_path):
    from qnwb.runs import Runner

    store = tmp_path / "two.sqlite"
    launch(workers.run_config, 2, RUN | {"budget": {"steps": 6}}, str(store))
    checkpoint = store.parent / "two.sqlite-runs"
    (saved,) = list(checkpoint.glob("*.pt"))  # rank 0's, the only one written
    resumed = Runner.resume(saved, store=False, budget={"steps": 12}, progress=False)
    resumed.run()
    whole = workers.run_config(RUN, False)
    theta = workers.flat_params(resumed.model)
    assert float((theta - whole["theta"]).norm() / whole["theta"].norm()) <= 1e-10


def test_batch_norm_under_data_parallel_is_warned_about(tmp_path):
    ranks = launch(workers.warnings_of_lenet, 2)
    assert all(any("batch norm normalises each rank" in w for w in r) for r in ranks)
    assert not any(
        "batch norm" in w for w in workers.warnings_of_lenet()
    )  # one process: nothing to warn about
