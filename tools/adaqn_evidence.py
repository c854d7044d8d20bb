"""adaQN's safeguards and its paper's initialisation, measured.

    python tools/adaqn_evidence.py run tour --out data/adaqn_safeguard.json
    python tools/adaqn_evidence.py run char_lm --out data/adaqn_safeguard.json
    python tools/adaqn_evidence.py table data/adaqn_safeguard.json
    python tools/adaqn_evidence.py init --out data/init_reading.json
    python tools/adaqn_evidence.py paper --seeds 1 --out data/adaqn_5x100.json

`run`: each variant against Adagrad on one problem at its tuned step size.
Every variant follows the reports' tuning protocol (`qnwb.reports.tune`): its learning rate chosen from
Adagrad's grid on seed 0 by the final held-out loss, then the winner trained on seeds 1–3. The variants:
Adagrad itself; adaQN as Algorithm 1 has it; adaQN whose rejection also returns Adagrad's accumulator to its
value at w̄ₒ (`restore_accumulator_on_reject`); adaQN with the Fisher product unnormalised, as the authors'
public minSQN code forms it (`fisher_normalization="none"`); and both. One torch thread; the results of a
problem replace that problem's entry in the JSON file.

`init`: the paper's 5-layer, 100-unit character RNN (sequences of 50, §4.1) with its weights drawn from
"N(0, 0.01)" read as a standard deviation (0.01) and as a variance (std 0.1), trained by Adam, Adagrad and adaQN
for the same number of steps on two seeds: the held-out loss in nats per character at the end.
"""

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from qnwb.optim import tuning_grid
from qnwb.reports import tune
from qnwb.runs import Runner
from qnwb.store import machine_name

PROBLEMS = {  # the tour's addition problem and the character-LM report's default
    "tour": dict(
        problem="addition",
        problem_options={"T": 20, "hidden": 16, "batch_size": 100},
        budget={"evaluations": 3000},
        evaluate_every=300,
    ),
    "char_lm": dict(
        problem="char_lm",
        problem_options={"hidden": 32, "layers": 1, "length": 20, "batch_size": 32},
        budget={"evaluations": 2000},
        evaluate_every=200,
    ),
}
VARIANTS = {
    "Adagrad": ("adagrad", {}),
    "adaQN (Algorithm 1)": ("adaqn", {}),
    "adaQN + accumulator restored": ("adaqn", {"restore_accumulator_on_reject": True}),
    "adaQN + unnormalised Fisher": ("adaqn", {"fisher_normalization": "none"}),
    "adaQN + both": (
        "adaqn",
        {"fisher_normalization": "none", "restore_accumulator_on_reject": True},
    ),
}


def config(problem: str, optimizer: str, seed: int, hyperparameters: dict) -> dict:
    return {
        **PROBLEMS[problem],
        "name": f"safeguard {problem} {optimizer} seed {seed}",
        "optimizer": optimizer,
        "hyperparameters": hyperparameters,
        "seed": seed,
        "evaluate_unit": "evaluations",
    }


def provenance() -> dict:
    "When, from which commit, where and how the results were measured (every run pins one torch thread)."
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return {
        "date": time.strftime("%Y-%m-%d"),
        "commit": commit.stdout.strip(),
        "machine": machine_name(),
        "threads": 1,
        "torch": torch.__version__,
    }


def final(runner: Runner) -> dict:
    last = runner.last_evaluation or {}
    stats = getattr(runner.optimizer, "stats", {}) or {}
    return {
        "validation_loss": last.get("validation_loss"),
        "validation_error": last.get("validation_error"),
        "rejections": float(stats["rejections"]) if "rejections" in stats else None,
    }


def run(args) -> int:
    torch.set_num_threads(1)
    results = {}
    for name, (optimizer, fixed) in VARIANTS.items():
        start = time.process_time()
        tuning = tune(
            optimizer,
            lambda o, s: config(args.problem, o, s, {**fixed, "lr": 0.01}),
            seed=0,
            grid=tuning_grid("adagrad"),
            store=False,
        )
        seeds = {}
        for seed in args.seeds:
            runner = Runner(
                config(args.problem, optimizer, seed, tuning.chosen), store=False, progress=False
            )
            try:
                runner.run()
                seeds[seed] = final(runner)
            except FloatingPointError as e:
                seeds[seed] = {"failed": str(e)}
            print(f"{name} seed {seed}: {seeds[seed]}", flush=True)
        results[name] = {
            "optimizer": optimizer,
            "hyperparameters": tuning.chosen,
            "tuning": tuning.rows(),
            "seeds": seeds,
            "cpu_seconds": time.process_time() - start,
        }
    path = Path(args.out)
    saved = json.loads(path.read_text()) if path.exists() else {}
    saved[args.problem] = {
        "setting": PROBLEMS[args.problem],
        **provenance(),
        "tuning_seed": 0,
        "variants": results,
    }
    path.write_text(json.dumps(saved, indent=1) + "\n")
    return table(argparse.Namespace(path=args.out))


PAPER_ARCHITECTURE = (
    dict(  # the character report at the paper's 5 × 100 architecture (data/charlm_5x100_cpu.json)
        problem="char_lm",
        problem_options={
            "hidden": 100,
            "layers": 5,
            "length": 50,
            "batch_size": 32,
            "init_std": 0.1,
        },
        budget={"gradient_evaluations": 2100},
        evaluate_every=262,
        evaluate_unit="gradient_evaluations",
    )
)


def paper(args) -> int:
    "adaQN's variants on the 5 × 100 character model at the report's tuned step size, the held-out bits/char per epoch."
    torch.set_num_threads(1)
    rows = []
    for name, (optimizer, fixed) in VARIANTS.items():
        if optimizer != "adaqn":
            continue
        for seed in args.seeds:
            hyperparameters = {"lr": args.lr, "L": 5, **fixed}
            cfg = {
                **PAPER_ARCHITECTURE,
                "name": f"{name} seed {seed}",
                "optimizer": optimizer,
                "hyperparameters": hyperparameters,
                "seed": seed,
            }
            runner = Runner(cfg, store=False, progress=False)
            runner.run()
            bits = [
                e["validation_loss"] / (50 * math.log(2)) for e in runner.history["evaluations"]
            ]
            rows.append(
                {
                    "variant": name,
                    "seed": seed,
                    "hyperparameters": hyperparameters,
                    "bits_per_char": bits,
                    **final(runner),
                }
            )
            print(
                f"{name} seed {seed}: {bits[-1]:.3f} bits/char, {rows[-1]['rejections']} rejections",
                flush=True,
            )
    Path(args.out).write_text(
        json.dumps(
            {
                "setting": PAPER_ARCHITECTURE,
                **provenance(),
                "runs": rows,
            },
            indent=1,
        )
        + "\n"
    )
    return 0


INIT_RATES = {
    "adam": 0.001,
    "adagrad": 0.01,
    "adaqn": 0.01,
}  # Adam's usual rate; Adagrad's that learns here


def init(args) -> int:
    torch.set_num_threads(1)
    rows = []
    for std in (0.01, 0.1):
        for optimizer, lr in INIT_RATES.items():
            for seed in args.seeds:
                options = {**PAPER_ARCHITECTURE["problem_options"], "init_std": std}
                runner = Runner(
                    {
                        "name": f"init std {std} {optimizer} seed {seed}",
                        "problem": "char_lm",
                        "problem_options": options,
                        "optimizer": optimizer,
                        "hyperparameters": {"lr": lr},
                        "seed": seed,
                        "budget": {"steps": args.steps},
                        "evaluate_every": args.steps,
                    },
                    store=False,
                    progress=False,
                )
                runner.run()
                loss = runner.last_evaluation["validation_loss"] / options["length"]
                rows.append(
                    {
                        "init_std": std,
                        "optimizer": optimizer,
                        "lr": lr,
                        "seed": seed,
                        "nats_per_char": loss,
                    }
                )
                print(rows[-1], flush=True)
    Path(args.out).write_text(
        json.dumps(
            {
                "setting": "char_lm, 5 layers of 100 units, length 50, batch 32, the bundled corpus",
                "steps": args.steps,
                "date": time.strftime("%Y-%m-%d"),
                "machine": machine_name(),
                "threads": 1,
                "torch": torch.__version__,
                "runs": rows,
            },
            indent=1,
        )
        + "\n"
    )
    return 0


def table(args) -> int:
    saved = json.loads(Path(args.path).read_text())
    for problem, entry in saved.items():
        print(
            f"\n{problem}: {entry['setting']} ({entry['date']}, {entry['commit']}, {entry['machine']})"
        )
        print("| variant | tuned lr | held-out loss per seed | median | rejections |")
        print("|---|---|---|---|---|")
        for name, result in entry["variants"].items():
            losses = [r.get("validation_loss", float("inf")) for r in result["seeds"].values()]
            rejections = [r.get("rejections") for r in result["seeds"].values()]
            rejected = " / ".join(f"{r:.0f}" for r in rejections) if None not in rejections else "–"
            print(
                f"| {name} | {result['hyperparameters']['lr']} | "
                f"{' / '.join(f'{v:.4f}' for v in losses)} | {statistics.median(losses):.4f} | {rejected} |"
            )
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    r = commands.add_parser("run", help="tune and run every variant on one problem")
    r.add_argument("problem", choices=sorted(PROBLEMS))
    r.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    r.add_argument("--out", default="data/adaqn_safeguard.json")
    r.set_defaults(action=run)
    i = commands.add_parser(
        "init", help="the two readings of N(0, 0.01) on the paper's character RNN"
    )
    i.add_argument("--steps", type=int, default=1000)
    i.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    i.add_argument("--out", default="data/init_reading.json")
    i.set_defaults(action=init)
    p = commands.add_parser(
        "paper",
        help="adaQN's variants on the paper's 5 × 100 character model at the report's step size",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[1])
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--out", default="data/adaqn_5x100.json")
    p.set_defaults(action=paper)
    t = commands.add_parser("table", help="print the saved results as markdown tables")
    t.add_argument("path", nargs="?", default="data/adaqn_safeguard.json")
    t.set_defaults(action=table)
    args = parser.parse_args(argv)
    return args.action(args)


if __name__ == "__main__":
    sys.exit(main())
