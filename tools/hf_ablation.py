"""Hessian-free's CG termination, CG cap and structural damping, ablated on the pathological problems.

    python tools/hf_ablation.py run --tasks addition --T 20 --hidden 50 --seeds 0 1 2 \
        --rules window average --caps 50 100 250 --out data/hf_ablation.jsonl
    python tools/hf_ablation.py table data/hf_ablation.jsonl
    python tools/hf_ablation.py versus data/hf_ablation.jsonl --task addition --T 20 30

`run` trains one HessianFree per configuration with `qnwb.bench.bench_hf` (one torch thread, the held-out
set checked after every step) and appends each finished run to the JSON-lines file at once, so an
interrupted ablation loses at most the run in progress and a rerun skips what is already there.
`table` prints, per configuration, the runs that met each criterion and the median minibatches to it;
`versus` puts qnwb's former CG settings (eq. 2 read literally, ε = 1e-4, cap 250) beside its defaults
(Martens' average rule, ε = 5e-4, cap 50) seed by seed: curvature products and minibatches to each
criterion, a run that missed one counted at the budget it spent.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

from qnwb.bench import bench_hf
from qnwb.store import machine_name

KEY = ("task", "T", "hidden", "mu", "reduction", "rule", "tolerance", "cap", "seed")


def _key(row: dict) -> tuple:
    return tuple(row[k] for k in KEY)


def _done(path: Path) -> set:
    if not path.exists():
        return set()
    return {_key(json.loads(line)) for line in path.read_text().splitlines() if line.strip()}


def run(args) -> int:
    path, done = Path(args.out), _done(Path(args.out))
    grid = [
        dict(
            task=task,
            T=T,
            hidden=args.hidden,
            mu=mu,
            reduction=args.reduction,
            rule=rule,
            tolerance=args.tolerance.get(rule),
            cap=cap,
            seed=seed,
        )
        for task in args.tasks
        for T in args.T
        for mu in args.mu
        for rule in args.rules
        for cap in args.caps
        for seed in args.seeds
    ]
    todo = [config for config in grid if _key(config) not in done]
    print(f"{len(grid)} configurations, {len(grid) - len(todo)} already in {path}", file=sys.stderr)
    for i, config in enumerate(todo, 1):
        result = bench_hf(
            config["task"],
            config["T"],
            config["seed"],
            hidden=config["hidden"],
            structural_damping=config["mu"],
            structural_reduction=config["reduction"],
            budget_minibatches=args.minibatches,
            threads=args.threads,
            cg_max_iterations=config["cap"],
            cg_termination=config["rule"],
            cg_tolerance=config["tolerance"],
        )
        row = {
            **config,
            "budget_minibatches": args.minibatches,
            "machine": machine_name(),
            **{
                k: result[k]
                for k in (
                    "solved",
                    "loose",
                    "strict",
                    "steps",
                    "minibatches",
                    "gradient_evaluations",
                    "curvature_products",
                    "forward_products",
                    "loss_evaluations",
                    "held_out_wrong",
                    "seconds",
                    "cpu_seconds",
                    "threads",
                    "torch",
                )
            },
        }
        with path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        first = {
            c: (None if row[c] is None else round(row[c]["minibatches"]))
            for c in ("loose", "strict")
        }
        print(
            f"[{i}/{len(todo)}] {config}: loose at {first['loose']}, strict at {first['strict']} minibatches, "
            f"{row['seconds']:.0f} s",
            file=sys.stderr,
            flush=True,
        )
    return 0


def table(args) -> int:
    rows = [json.loads(line) for line in Path(args.file).read_text().splitlines() if line.strip()]
    groups: dict[tuple, list] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in KEY if k != "seed"), []).append(row)
    print(
        "| task | T | hidden | μ | rule | ε | CG cap | seeds | loose: solved, median minibatches | "
        "strict: solved, median minibatches | per seed (strict) | median s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for key, runs in sorted(groups.items(), key=lambda kv: tuple(str(x) for x in kv[0])):
        task, T, hidden, mu, reduction, rule, tolerance, cap = key
        cells = []
        for criterion in ("loose", "strict"):
            hit = [r[criterion]["minibatches"] for r in runs if r[criterion] is not None]
            cells.append(
                f"{len(hit)}/{len(runs)}, " + (f"{statistics.median(hit):,.0f}" if hit else "—")
            )
        per_seed = ", ".join(
            f"{r['strict']['minibatches']:,.0f}" if r["strict"] else f">{r['minibatches']:,.0f}"
            for r in sorted(runs, key=lambda r: r["seed"])
        )
        eps = f"{tolerance:g}"
        mu_text = "0" if not mu else (f"{mu:.3g}" + ("/T" if reduction == "mean" else ""))
        print(
            f"| {task} | {T} | {hidden} | {mu_text} | {rule} | {eps} | {cap} | {len(runs)} | {cells[0]} | "
            f"{cells[1]} | {per_seed} | {statistics.median(r['seconds'] for r in runs):,.0f} |"
        )
    return 0


BEFORE = {"rule": "window", "tolerance": 1e-4, "cap": 250}
AFTER = {"rule": "average", "tolerance": 5e-4, "cap": 50}


def _to(row: dict, criterion: str) -> tuple[str, str, float]:
    "Curvature products and minibatches to the criterion (or '>' the run's totals) and the minibatches for medians."
    hit = row[criterion]
    if hit is None:
        return f">{row['curvature_products']:,}", f">{row['minibatches']:,.0f}", row["minibatches"]
    return f"{hit['curvature_products']:,}", f"{hit['minibatches']:,.0f}", hit["minibatches"]


def versus(args) -> int:
    rows = [json.loads(line) for line in Path(args.file).read_text().splitlines() if line.strip()]
    mu = 1 / 30
    print(
        "| T | hidden | seed | before: loose products / minibatches | before: strict | "
        "after: loose | after: strict |"
    )
    print("|---|---|---|---|---|---|---|")
    for T in args.T:
        pick = lambda setting: {  # noqa: E731
            r["seed"]: r
            for r in rows
            if r["task"] == args.task
            and r["T"] == T
            and r["mu"] == mu
            and all(r[k] == v for k, v in setting.items())
        }
        before, after = pick(BEFORE), pick(AFTER)
        medians = {name: {"loose": [], "strict": []} for name in ("before", "after")}
        for seed in sorted(set(before) | set(after)):
            cells = []
            for name, runs in (("before", before), ("after", after)):
                for criterion in ("loose", "strict"):
                    if seed not in runs:
                        cells.append("not run")
                        continue
                    products, minibatches, value = _to(runs[seed], criterion)
                    medians[name][criterion].append(value)
                    cells.append(f"{products} / {minibatches}")
            hidden = (after.get(seed) or before.get(seed))["hidden"]
            print(f"| {T} | {hidden} | {seed} | " + " | ".join(cells) + " |")
        summary = [
            f"{statistics.median(v):,.0f}" if v else "—"
            for name in ("before", "after")
            for v in medians[name].values()
        ]
        print(f"| {T} | | median minibatches | " + " | ".join(summary) + " |")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    r = commands.add_parser("run", help="run the grid, appending to --out")
    r.add_argument("--tasks", nargs="+", default=["addition"])
    r.add_argument("--T", nargs="+", type=int, default=[20])
    r.add_argument("--hidden", type=int, default=50)
    r.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    r.add_argument("--rules", nargs="+", default=["window", "average"])
    r.add_argument("--caps", nargs="+", type=int, default=[50, 100, 250])
    r.add_argument("--mu", nargs="+", type=float, default=[1 / 30])
    r.add_argument("--reduction", default="sum")
    r.add_argument(
        "--average-tolerance",
        type=float,
        default=5e-4,
        help="ε of the 'average' rule (Martens 2010)",
    )
    r.add_argument(
        "--window-tolerance",
        type=float,
        default=1e-4,
        help="ε of the 'window' rule (M&S 2012 eq. 2)",
    )
    r.add_argument("--minibatches", type=float, default=15_000)
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--out", default="data/hf_ablation.jsonl")
    t = commands.add_parser("table", help="a markdown table of a results file")
    t.add_argument("file")
    v = commands.add_parser(
        "versus", help="the former CG settings beside the defaults, seed by seed"
    )
    v.add_argument("file")
    v.add_argument("--task", default="addition")
    v.add_argument("--T", nargs="+", type=int, default=[20, 30])
    args = parser.parse_args(argv)
    if args.command == "versus":
        return versus(args)
    if args.command == "run":
        args.tolerance = {"average": args.average_tolerance, "window": args.window_tolerance}
        return run(args)
    return table(args)


if __name__ == "__main__":
    sys.exit(main())
