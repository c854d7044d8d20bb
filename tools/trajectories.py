"""Record and compare short float64 trajectories of every registered optimizer on a few problems.

A redesign that must leave behaviour unchanged is checked by recording before it and comparing
after it, on the same machine (torch picks kernels by CPU, so the last bits differ between machines):

    python tools/trajectories.py record data/trajectories.json
    python tools/trajectories.py compare data/trajectories.json

`compare` exits 1 at the first number that differs in any bit, naming run, step and field.
"""

import argparse
import hashlib
import json
import math
import subprocess
import sys
import time

import torch

from qnwb.store import machine_name

PROBLEMS = {  # small float64 instances: 25 steps of every optimizer take seconds
    "addition": {"T": 10, "hidden": 8, "batch_size": 50, "held_out": 100},
    "curves": {"size": 8, "train": 200, "test": 50, "batch_size": 50},
    "char_lm": {"hidden": 16, "length": 10, "batch_size": 16, "held_out": 20},
    "quadratic": {"n": 20},
}
EXTRA = [  # settings beyond the defaults that take other paths through the code
    (
        "nag",
        "addition",
        {"lr": 0.01, "momentum": {"schedule": "SutskeverMomentum", "mu_max": 0.99, "period": 5}},
    ),
    ("hessian_free", "addition", {"structural_damping": 0.03}),
    (
        "hessian_free",
        "curves",
        {"preconditioner": "chapelle_erhan", "iterate_selection": "minimum"},
    ),
    ("lbfgs", "curves", {"line_search": "strong_wolfe"}),
    ("lbfgs", "quadratic", {"line_search": "armijo"}),
    ("lsr1", "curves", {"method": "line_search"}),
]
RENAMED = {  # stats keys renamed since the recording: old ↦ new (a redesign renames, the numbers stay)
    "learning_rate": "lr",  # HF, CM and NAG now say lr, as every other optimizer does
    "function_evaluations": "gradient_evaluations",  # the quasi-Newton methods counted both; they were always equal
    "total_function_evaluations": "total_gradient_evaluations",
}
SKIP_TIMES = (
    "time",
    "train_time",
    "eval_time",
    "seconds",
)  # and every stats key ending in "_s" (a timing)


def exact(value):
    "A JSON value with every float written as its hex (bit for bit)."
    if isinstance(value, float):
        return {"hex": value.hex()} if math.isfinite(value) else {"nonfinite": repr(value)}
    if isinstance(value, dict):
        return {
            k: exact(v) for k, v in value.items() if k not in SKIP_TIMES and not k.endswith("_s")
        }
    if isinstance(value, (list, tuple)):
        return [exact(v) for v in value]
    if isinstance(value, torch.Tensor):
        return exact(value.detach().double().flatten().tolist())
    return value


def one_run(optimizer: str, problem: str, hyperparameters: dict, steps: int) -> dict:
    from qnwb.runs import Runner

    config = {
        "problem": problem,
        "problem_options": PROBLEMS[problem],
        "optimizer": optimizer,
        "hyperparameters": hyperparameters,
        "seed": 3,
        "dtype": "float64",
        "budget": {"steps": steps},
        "evaluate_every": 10,
    }
    runner = Runner(config, store=False, progress=False)
    runner.run()
    theta = torch.cat([p.detach().flatten() for p in runner.model.parameters()])
    return {
        "steps": exact(runner.history["steps"]),
        "evaluations": exact(runner.history["evaluations"]),
        "theta_sha256": hashlib.sha256(theta.double().numpy().tobytes()).hexdigest(),
    }


def runs(steps: int):
    from qnwb.optim import OPTIMIZERS

    for problem in PROBLEMS:
        for optimizer in OPTIMIZERS:
            yield f"{optimizer}/{problem}", optimizer, problem, {}
    for optimizer, problem, hyper in EXTRA:
        yield (
            f"{optimizer}/{problem}/{json.dumps(hyper, sort_keys=True)}",
            optimizer,
            problem,
            hyper,
        )


def renamed(recording):
    "`recording` with RENAMED applied to every stats dict; a renamed key whose new name is also there must agree with it."
    for run in recording.values():
        for row in run["steps"]:
            stats = row.get("stats", {})
            for old, new in RENAMED.items():
                if old in stats:
                    value = stats.pop(old)
                    if new in stats and stats[new] != value:
                        raise SystemExit(f"{old} = {value} but {new} = {stats[new]}: not a rename")
                    stats[new] = value
    return recording


def first_difference(a, b, where=""):
    if type(a) is not type(b):
        return f"{where}: {a!r} != {b!r}"
    if isinstance(a, dict):
        if set(a) != set(b):
            return f"{where}: keys {sorted(set(a) ^ set(b))} differ"
        for k in a:
            d = first_difference(a[k], b[k], f"{where}.{k}")
            if d:
                return d
        return None
    if isinstance(a, list):
        if len(a) != len(b):
            return f"{where}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            d = first_difference(x, y, f"{where}[{i}]")
            if d:
                return d
        return None
    return None if a == b else f"{where}: {a!r} != {b!r}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("record", "compare"))
    parser.add_argument("path")
    parser.add_argument("--steps", type=int, default=25)
    args = parser.parse_args()
    torch.set_num_threads(1)
    recorded = renamed({key: one_run(o, p, h, args.steps) for key, o, p, h in runs(args.steps)})
    meta = {
        "torch": torch.__version__,
        "threads": 1,
        "steps": args.steps,
        "date": time.strftime("%Y-%m-%d"),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        "machine": machine_name(),
    }
    if args.action == "record":
        with open(args.path, "w") as f:
            json.dump({"meta": meta, "runs": recorded}, f)
        print(f"recorded {len(recorded)} runs to {args.path}")
        return 0
    with open(args.path) as f:
        saved = renamed(json.load(f)["runs"])
    failed = 0
    for key in sorted(set(saved) | set(recorded)):
        d = first_difference(saved.get(key), recorded.get(key), key)
        print(f"{'DIFFERS' if d else 'same   '} {key}" + (f"  ({d})" if d else ""))
        failed += bool(d)
    print(
        f"{len(recorded) - failed} of {len(set(saved) | set(recorded))} runs identical bit for bit"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
