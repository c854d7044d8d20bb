"""qnwb's HessianFree against a peer implementation, drasmuss/hessianfree 0.4.0 (numpy), on one shared data stream.

The task is qnwb's "addition" problem (T = 20 by default, 50 tanh hidden units, 1000 sequences per HF step, a
held-out set of 2000 sequences). After every HF step both sides check the held-out set with qnwb's own test
(`Task.wrong`: the last output more than 0.04 from the target) against bench_hf's two criteria: loose (at most 1 %
of the held-out sequences wrong) and strict (none wrong). Work is counted in Martens & Sutskever 2011 Figure 3's
unit, minibatches = (gradient evaluations + curvature products) × batch / 1000, and a run stops at the strict
criterion or when the budget (20,000 minibatches) is spent.

The peer lives in its own virtual environment and is never a dependency of qnwb:

    python3 -m venv ../peer-venv        # beside the checkout, or anywhere: set QNWB_PEER_PYTHON to its python
    ../peer-venv/bin/pip install hessianfree==0.4.0 numpy matplotlib

Reproduce (from the repository root; each subcommand runs under the interpreter named):

    # everything: data, qnwb and both peer configurations per seed, one run at a time, then the table
    .venv/bin/python tools/peer_hf.py compare --seeds 0 1 2

    # or step by step, for one seed
    .venv/bin/python tools/peer_hf.py data --seed 0            # -> /tmp/peer_hf_addition_T20_seed0.npz
    .venv/bin/python tools/peer_hf.py qnwb --data /tmp/peer_hf_addition_T20_seed0.npz
    ../peer-venv/bin/python tools/peer_hf.py peer --data /tmp/peer_hf_addition_T20_seed0.npz --mask-curvature
    ../peer-venv/bin/python tools/peer_hf.py peer --data /tmp/peer_hf_addition_T20_seed0.npz --mask-curvature \
        --cg-iter 50
    python3 tools/peer_hf.py table                                        # markdown from data/peer_hf.jsonl

    # the two further configurations in data/peer_hf.jsonl (per seed, same data file)
    .venv/bin/python tools/peer_hf.py qnwb --data /tmp/peer_hf_addition_T20_seed0.npz \
        --structural-distance squared --option warm_start_from=last --label "qnwb squared SD, warm start from last"
    ../peer-venv/bin/python tools/peer_hf.py peer --data /tmp/peer_hf_addition_T20_seed0.npz --cg-iter 50 \
        --label "peer CG_iter=50 unmasked (as shipped)"

    # the products side by side (float64, 100 sequences): gradient, Gv with and without --mask-curvature,
    # structural term against qnwb's "squared" and "tanh" forms, through the parameter map of difference 2
    .venv/bin/python tools/peer_hf.py check --data /tmp/peer_hf_addition_T20_seed0.npz
    python3 tools/peer_hf.py differences

The shared stream: `data` draws the training batches exactly as `qnwb.bench.bench_hf` does (the task's `batch`
on `make_generator(seed + 1)`, one draw of 1000 sequences per step), the held-out set with `Task.held_out(seed)`
and the initial weights with bench_hf's calls (`TanhRNN` + `esn_init_` on `make_generator(seed)`, output bias the
input-independent mean target). The `qnwb` side runs `bench_hf` itself, unchanged, and first checks that the file
holds that stream and those weights; the `peer` side reads the file. Sequences are stored compactly but exactly:
values (float32), markers (uint8) and the final targets (float32); the peer rebuilds inputs (steps, 1000, T, 2)
and targets that are NaN at every step but the last.

Every finished run appends one JSON line to data/peer_hf.jsonl (`--out`). Differences between the two
implementations, and how they are handled, are listed in DIFFERENCES below (printed by `differences`).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # before numpy is imported: one BLAS thread

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "data" / "peer_hf.jsonl"
QNWB_PYTHON = str(ROOT / ".venv" / "bin" / "python")  # the checkout's own environment (make setup)
PEER_PYTHON = os.environ.get("QNWB_PEER_PYTHON", str(ROOT.parent / "peer-venv" / "bin" / "python"))
TOLERANCE = 0.04  # qnwb.tasks.Addition.tolerance; checked against the file's own copy
CRITERIA = {
    "loose": 0.01,
    "strict": 0.0,
}  # qnwb.bench.HF_CRITERIA: largest fraction of held-out sequences wrong
QNWB_OPTIONS = dict(cg_max_iterations=50, cg_termination="average", cg_tolerance=5e-4)

DIFFERENCES = """\
1. Output curvature at steps without a target. The peer's SquaredError.d2_loss is 1 at every time step, NaN
   target or not (its loss and gradient do mask NaN), so its Gauss-Newton matrix includes J_zᵀJ_z at 19 of 20 steps
   that are not in the loss. qnwb's L'' is zero there. --mask-curvature swaps in a subclass whose d2_loss is 0
   where the target is NaN (the Gv is then the GGN of the loss that is actually minimised); without it the peer
   runs as shipped. `check`: the shipped peer's Gv is 8× off qnwb's GGN in norm, the masked one agrees to 1e-15.
2. Initial hidden state. qnwb's TanhRNN learns h0 (esn_init_ sets it to 0); the first pre-activation is
   W_hx x_0 + b_h + W_hh h0. The peer has no h0; it learns a bias b_0 added at the first step only (the
   recurrent connection's bias). Both nets have 2751 parameters; the map W_in = W_hxᵀ, b_in = b_h, W_rec = W_hhᵀ,
   b_0 = W_hh h0 (= 0 at the start), W_out = W_zhᵀ, b_out = b_z copies qnwb's initial weights into the peer
   exactly (checked at every peer run: same held-out outputs to float32 rounding). At h0 = 0 the two sides'
   gradients and Gv agree through this map (`check`: relative error ~1e-15 in float64), but the h0/b_0 block
   of the map (W_hh, spectral radius 1.1) is not orthogonal, so Tikhonov damping λI and CG act differently on
   it and the steps differ from the first on; after it b_0 and W_hh h0 drift apart. Not changeable without
   editing the peer; the script copies the initial weights and leaves the parametrisations as they are.
3. Structural damping. Both use weight λμ (μ = 1/30 here, λ the current Tikhonov damping) summed over time steps
   and averaged over cases. The peer's StructuralDamping puts curvature λμ on the hidden states (after tanh):
   λμ J_hᵀJ_h, which is qnwb's structural_distance="squared". qnwb's default (and bench_hf's, used here) is
   "tanh", the matching-loss form λμ (1 − h²) on the pre-activations. `qnwb --structural-distance squared` runs
   qnwb with the peer's form. The peer fixes λ in its structural term when the batch is cached (start of step),
   as qnwb does. `check`: peer masked + structural vs qnwb "squared" 1e-15, vs qnwb "tanh" 7e-4 (λ = 0.5).
4. CG warm start. Both start CG from 0.95 × the previous solution, qnwb from the update it chose (backtracked,
   warm_start_from="chosen"), the peer from CG's last iterate (qnwb's warm_start_from="last"); see
   `qnwb --option warm_start_from=last`.
5. CG termination. Both use Martens' relative-progress test (q_j − q_{j−k}) / q_j < k·ε with the "average"
   threshold k·ε, k = max(10, ~j/10), and a cap. Peer: ε = 5e-6, k = max(⌊0.1 i⌋, 10) on the 0-based index
   i = j − 1, applied only when i > k, i.e. from j = 12 CG steps on (its q list has no q_0), requiring
   q_{j−k} < 0; cap CG_iter (default 250); otherwise it stops only on a non-finite step or ‖r‖² < 1e-20.
   qnwb here: ε = 5e-4 (100× looser), k = max(10, ⌈j/10⌉), applied from j = 10 on (q_0 kept), requiring q_j < 0,
   cap 50, and it also stops on non-positive curvature. `peer --cg-iter 50` gives the peer the same cap;
   the peer's ε is hard-coded.
6. Curvature products counted. The peer computes CG's starting residual with a Gv at every step, even on the
   first (x0 = 0), and evaluates ρ with an extra full Gv of the damped model (λI and the structural term
   included, so its ρ is the damped one). qnwb spends a product on the start only for a warm start, and computes
   ρ from the undamped quadratic model (eq. 10) with one forward-mode product, which it counts as
   `forward_products`, not as a curvature product (Figure 3's minibatches leave it out). Both sides are counted
   as they spend: the peer by wrapping net.calc_G and net.calc_grad, qnwb by bench_hf's own counts.
7. Levenberg–Marquardt. Same thresholds (ρ < 1/4: λ×1.5; ρ > 3/4: λ×decrease); the peer decreases by 0.66,
   qnwb by 2/3, and qnwb caps λ at SETTING_BOUNDS["scale"]; qnwb counts a step that raised f as ρ = −∞. The peer
   updates λ before its line search, qnwb after (same effect: λ is used from the next step on).
8. Backtracking over CG iterates. The peer keeps iterates after 6, 7, 8, 10, 12, 15, 19, ... CG steps (its
   counter 5 → ⌊1.3·c⌋ on the 0-based index) and the last; qnwb keeps ⌈5·1.3^j⌉ = 5, 7, 9, 11, 15, 19, ... and
   the last. Both walk back from the last while f keeps decreasing (the peer continues on ties).
9. Line search. Identical rule (Armijo c = 0.01 on min(∇fᵀδ, 0), α ← 0.8α, 60 tries, α = 0 if none passes).
10. Arithmetic. Both float32 on the CPU with one thread; qnwb in torch, the peer in numpy (loops over time in
   Python). The peer's loss is ½Σ(z − t)² over time and units, averaged over cases, as qnwb's squared_error.
"""


# --------------------------------------------------------------------------------------------- shared helpers
def _default_data(task: str, T: int, seed: int) -> Path:
    return Path(f"/tmp/peer_hf_{task}_T{T}_seed{seed}.npz")


def _append(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def _meta(data) -> dict:
    return json.loads(str(data["meta"]))


def _batch(data, k: int) -> tuple[np.ndarray, np.ndarray]:
    "Training batch k as (inputs (B, T, 2), targets (B, T, 1) NaN but at the last step), float32."
    values, markers, final = data["values"][k], data["markers"][k], data["final"][k]
    inputs = np.stack([values, markers.astype(np.float32)], -1)
    targets = np.full(values.shape + (1,), np.nan, dtype=np.float32)
    targets[:, -1] = final
    return inputs, targets


def _wrong_fraction(last_outputs: np.ndarray, final_targets: np.ndarray, tolerance: float) -> float:
    "qnwb's Task.wrong for one target step per sequence: |z − t| > tolerance; fraction of sequences wrong."
    return float((np.abs(last_outputs - final_targets).max(-1) > tolerance).mean())


# ------------------------------------------------------------------------------------------ data (qnwb venv)
def cmd_data(args) -> int:
    import torch

    from qnwb import __version__ as qnwb_version
    from qnwb.core import make_generator
    from qnwb.init import esn_init_
    from qnwb.models import TanhRNN
    from qnwb.tasks import input_independent_outputs, make_task

    torch.set_num_threads(1)
    problem = make_task(args.task, args.T)
    # initial weights exactly as bench_hf makes them
    mean_target = input_independent_outputs(problem, cases=2000, seed=args.seed)[-1]
    model = TanhRNN(problem.n_in, args.hidden, problem.n_out)
    esn_init_(
        model,
        input_scale=problem.input_scale,
        generator=make_generator(args.seed),
        output_bias=mean_target if problem.loss == "squared_error" else 0.0,
    )
    held_in, held_t = problem.held_out(args.seed, args.held_out)
    stream = make_generator(args.seed + 1)  # bench_hf's training stream
    B, T = args.batch, problem.length
    values = np.empty((args.steps, B, T), np.float32)
    markers = np.empty((args.steps, B, T), np.uint8)
    final = np.empty((args.steps, B, 1), np.float32)
    for k in range(args.steps):
        x, t = problem.batch(B, stream)
        values[k], markers[k], final[k] = x[..., 0].numpy(), x[..., 1].numpy(), t[:, -1].numpy()
        if k < 3:  # the compact form rebuilds the batch exactly
            assert torch.equal(x[..., 1], torch.from_numpy(markers[k].astype(np.float32)))
            assert torch.isnan(t[:, :-1]).all()
    with torch.no_grad():
        held_out_z = model(held_in)[:, -1].numpy()
    p = {
        name: param.detach().numpy().astype(np.float64) for name, param in model.named_parameters()
    }
    meta = dict(
        task=args.task,
        T=args.T,
        seed=args.seed,
        hidden=args.hidden,
        batch=B,
        held_out=args.held_out,
        steps=args.steps,
        tolerance=problem.tolerance,
        stream=f"qnwb Task.batch({B}, make_generator({args.seed + 1})) per step, as bench_hf",
        qnwb=qnwb_version,
        torch=torch.__version__,
    )
    out = Path(args.out or _default_data(args.task, args.T, args.seed))
    np.savez(
        out,
        meta=json.dumps(meta),
        values=values,
        markers=markers,
        final=final,
        held_inputs=held_in.numpy(),
        held_final=held_t[:, -1].numpy(),
        held_out_z=held_out_z,
        **{f"qnwb_{name}": value for name, value in p.items()},
    )
    print(f"wrote {out}: {args.steps} batches of {B}, held-out {args.held_out}", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------------------ qnwb (qnwb venv)
def _check_stream(data, meta) -> None:
    "The file holds bench_hf's stream, held-out set and initial weights (first batches and all weights compared)."
    from qnwb.core import make_generator
    from qnwb.init import esn_init_
    from qnwb.models import TanhRNN
    from qnwb.tasks import input_independent_outputs, make_task

    problem = make_task(meta["task"], meta["T"])
    stream = make_generator(meta["seed"] + 1)
    for k in range(3):
        x, t = problem.batch(meta["batch"], stream)
        xf, tf = _batch(data, k)
        assert np.array_equal(x.numpy(), xf) and np.array_equal(t.numpy(), tf, equal_nan=True), k
    held_in, held_t = problem.held_out(meta["seed"], meta["held_out"])
    assert np.array_equal(held_in.numpy(), data["held_inputs"])
    assert np.array_equal(held_t[:, -1].numpy(), data["held_final"])
    model = TanhRNN(problem.n_in, meta["hidden"], problem.n_out)
    esn_init_(
        model,
        input_scale=problem.input_scale,
        generator=make_generator(meta["seed"]),
        output_bias=input_independent_outputs(problem, cases=2000, seed=meta["seed"])[-1],
    )
    for name, param in model.named_parameters():
        assert np.array_equal(param.detach().numpy().astype(np.float64), data[f"qnwb_{name}"]), name
    assert problem.tolerance == TOLERANCE == meta["tolerance"]


def _run_head(meta: dict, args) -> dict:
    "The fields every result row starts with: the shared data's settings and the budget."
    return {k: meta[k] for k in ("task", "T", "seed", "hidden", "batch", "held_out")} | {
        "budget_minibatches": args.budget
    }


def _qnwb_gv_seconds(data, meta, structural_distance: str, repeats: int = 20) -> float:
    "Seconds per curvature product (GGN + λμ·G_S) of qnwb at the initial weights on batch 0, one thread."
    import torch

    from qnwb.losses import matching_loss
    from qnwb.models import TanhRNN
    from qnwb.optim.hessian_free import curvature_operator

    model = TanhRNN(2, meta["hidden"], 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.from_numpy(data[f"qnwb_{name}"]))
    x, t = (torch.from_numpy(a) for a in _batch(data, 0))
    op = curvature_operator(
        model,
        matching_loss("squared_error"),
        (x, t),
        "ggn",
        1.0,
        1 / 30,
        structural_distance,
    )
    v = torch.randn(
        sum(p.numel() for p in model.parameters()), generator=torch.Generator().manual_seed(0)
    )
    op.mv(v)
    start = time.perf_counter()
    for _ in range(repeats):
        op.mv(v)
    return (time.perf_counter() - start) / repeats


def cmd_qnwb(args) -> int:
    import torch

    from qnwb import __version__ as qnwb_version
    from qnwb.bench import bench_hf

    torch.set_num_threads(1)
    data = np.load(args.data)
    meta = _meta(data)
    _check_stream(data, meta)
    options = dict(QNWB_OPTIONS)
    if args.structural_distance != "tanh":
        options["structural_distance"] = args.structural_distance
    for item in args.option:
        key, value = item.split("=", 1)
        try:
            options[key] = json.loads(value)  # numbers, true/false/null, lists
        except json.JSONDecodeError:
            options[key] = value  # a bare string: warm_start_from=last
    result = bench_hf(
        meta["task"],
        meta["T"],
        meta["seed"],
        hidden=meta["hidden"],
        batch=meta["batch"],
        held_out=meta["held_out"],
        budget_minibatches=args.budget,
        threads=1,
        progress=args.progress,
        **options,
    )
    gv = _qnwb_gv_seconds(data, meta, options.get("structural_distance", "tanh"))
    row = dict(
        side="qnwb",
        config=args.label or "qnwb",
        **_run_head(meta, args),
        options=dict(
            structural_damping=result["structural_damping"], damping=result["damping"], **options
        ),
        stream="bench_hf's own (make_generator(seed + 1)); the data file was checked to hold it",
        data_steps=meta["steps"],
        solved=result["solved"],
        loose=result["loose"],
        strict=result["strict"],
        steps=result["steps"],
        held_out_wrong=result["held_out_wrong"],
        minibatches=result["minibatches"],
        gradient_evaluations=result["gradient_evaluations"],
        curvature_products=result["curvature_products"],
        forward_products=result["forward_products"],
        loss_evaluations=result["loss_evaluations"],
        seconds=result["seconds"],
        cpu_seconds=result["cpu_seconds"],
        gv_seconds=gv,
        gv_seconds_how="mean of 20 GGN products at the initial weights on batch 0",
        threads=result["threads"],
        versions=dict(qnwb=qnwb_version, torch=torch.__version__, numpy=np.__version__),
        python=platform.python_version(),
        machine=platform.machine(),
    )
    _append(Path(args.out), row)
    return 0


# ------------------------------------------------------------------------------------------ peer (peer venv)
def _peer_weights(data, hidden: int) -> np.ndarray:
    "qnwb's initial weights in the peer's parameter layout: [(0,1) W, b][(1,2) W, b][(1,1) W, b] (row-major)."
    W_hx, W_hh, b_h, h0 = (data[f"qnwb_{n}"] for n in ("W_hx", "W_hh", "b_h", "h0"))
    W_zh, b_z = data["qnwb_W_zh"], data["qnwb_b_z"]
    parts = [W_hx.T, b_h, W_zh.T, b_z, W_hh.T, W_hh @ h0]
    return np.concatenate([np.asarray(p, np.float64).ravel() for p in parts]).astype(np.float32)


class _Counter:
    "Wraps a bound method of the peer's network: counts calls and their seconds."

    def __init__(self, fn):
        self.fn, self.calls, self.seconds = fn, 0, 0.0

    def __call__(self, *a, **k):
        start = time.perf_counter()
        try:
            return self.fn(*a, **k)
        finally:
            self.seconds += time.perf_counter() - start
            self.calls += 1


def cmd_peer(args) -> int:
    import hessianfree as hf

    class MaskedSquaredError(hf.loss_funcs.SquaredError):
        "The peer's squared error with L'' = 0 where the target is NaN (its loss and gradient already mask)."

        def d2_loss(self, activities, targets):
            out = [None for _ in activities[:-1]]
            return out + [(~np.isnan(targets)).astype(activities[-1].dtype)]

    data = np.load(args.data)
    meta = _meta(data)
    assert meta["tolerance"] == TOLERANCE
    held_in, held_final = data["held_inputs"], data["held_final"]
    W0 = _peer_weights(data, meta["hidden"])
    optimizer = hf.opt.HessianFree(CG_iter=args.cg_iter, init_damping=args.damping, plotting=True)
    loss = MaskedSquaredError() if args.mask_curvature else hf.loss_funcs.SquaredError()
    losses = [loss]
    if args.structural_damping > 0:
        losses.append(hf.loss_funcs.StructuralDamping(args.structural_damping, optimizer=optimizer))
    net = hf.RNNet(
        shape=[2, meta["hidden"], 1],
        layers=[hf.nl.Linear(), hf.nl.Tanh(), hf.nl.Linear()],
        loss_type=losses,
        load_weights=W0.copy(),
        rng=np.random.RandomState(meta["seed"]),
    )
    net.optimizer = optimizer
    z0 = net.forward(held_in, net.W)[-1][:, -1]
    init_diff = float(np.abs(z0 - data["held_out_z"]).max())
    assert init_diff < 1e-4, f"the peer's initial network differs from qnwb's by {init_diff}"
    gv, grad, err = _Counter(net.calc_G), _Counter(net.calc_grad), _Counter(net.error)
    net.calc_G, net.calc_grad, net.error = gv, grad, err  # the optimizer looks them up on the net

    def minibatches() -> float:
        return (grad.calls + gv.calls) * meta["batch"] / 1000

    reached = dict.fromkeys(CRITERIA)
    step, wrong, stop = 0, math.nan, "budget"
    start, cpu = time.perf_counter(), time.process_time()
    while minibatches() < args.budget:
        if step >= meta["steps"]:
            stop = "data exhausted"
            break
        inputs, targets = _batch(data, step)
        step += 1
        try:
            net.cache_minibatch(
                inputs, targets
            )  # forward pass with derivatives, as run_epochs does
            update = optimizer.compute_update(False)
            net.W += update
        except (OverflowError, FloatingPointError) as e:
            stop = f"non-finite: {e}"[:200]
            break
        net.activations = net.d_activations = None
        wrong = _wrong_fraction(net.forward(held_in, net.W)[-1][:, -1], held_final, TOLERANCE)
        for name, allowed in CRITERIA.items():
            if reached[name] is None and wrong <= allowed:
                reached[name] = dict(
                    step=step,
                    minibatches=minibatches(),
                    gradient_evaluations=grad.calls,
                    curvature_products=gv.calls,
                    loss_evaluations=err.calls,
                    seconds=time.perf_counter() - start,
                )
        if args.progress:
            print(
                f"step {step}: {wrong:.2%} held-out wrong, λ {optimizer.damping:.3g}, "
                f"CG {optimizer.plots['CG iterations'][-1]}, {minibatches():.0f} minibatches, "
                f"{time.perf_counter() - start:.0f} s",
                file=sys.stderr,
                flush=True,
            )
        if reached["strict"] is not None:
            stop = "strict"
            break
    cg = optimizer.plots["CG iterations"]
    row = dict(
        side="peer",
        config=args.label
        or f"peer CG_iter={args.cg_iter}" + (" masked" if args.mask_curvature else ""),
        **_run_head(meta, args),
        options=dict(
            CG_iter=args.cg_iter,
            init_damping=args.damping,
            structural_damping=args.structural_damping,
            mask_curvature=args.mask_curvature,
            initial_weights="qnwb's (bench_hf's esn_init_), mapped; first-step bias b_0 = W_hh h0",
        ),
        stream=meta["stream"],
        data_steps=meta["steps"],
        initial_output_difference=init_diff,
        solved=reached["strict"] is not None,
        stop=stop,
        loose=reached["loose"],
        strict=reached["strict"],
        steps=step,
        held_out_wrong=wrong,
        minibatches=minibatches(),
        gradient_evaluations=grad.calls,
        curvature_products=gv.calls,
        loss_evaluations=err.calls,
        cg_iterations_mean=float(np.mean(cg)) + 1
        if cg
        else None,  # its plot holds the 0-based index
        final_damping=float(optimizer.damping),
        seconds=time.perf_counter() - start,
        cpu_seconds=time.process_time() - cpu,
        gv_seconds=gv.seconds / max(gv.calls, 1),
        gv_seconds_how="mean over the run's calc_G calls",
        threads=1,
        thread_env={
            v: os.environ.get(v)
            for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
        },
        versions=dict(hessianfree=hf.__version__, numpy=np.__version__),
        python=platform.python_version(),
        machine=platform.machine(),
    )
    _append(Path(args.out), row)
    return 0


# --------------------------------------------------------------------------- check: the products, side by side
QNWB_ORDER = ("W_hx", "W_hh", "b_h", "h0", "W_zh", "b_z")


def _to_peer(q: dict, W_hh: np.ndarray) -> np.ndarray:
    "qnwb parameters or a direction in them (dict of arrays) in the peer's layout: M v, b_0 = W_hh h0 (linear in h0)."
    parts = [q["W_hx"].T, q["b_h"], q["W_zh"].T, q["b_z"], q["W_hh"].T, W_hh @ q["h0"]]
    return np.concatenate([np.asarray(a, np.float64).ravel() for a in parts])


def _from_peer(g: np.ndarray, W_hh: np.ndarray, H: int) -> np.ndarray:
    "Mᵀ g: a gradient or Gv in the peer's layout as a flat vector in qnwb's parameter order (valid at h0 = 0)."
    sizes = [2 * H, H, H, 1, H * H, H]
    W_in, b_in, W_out, b_out, W_rec, b_0 = np.split(g, np.cumsum(sizes)[:-1])
    parts = dict(
        W_hx=W_in.reshape(2, H).T,
        W_hh=W_rec.reshape(H, H).T,
        b_h=b_in,
        h0=W_hh.T @ b_0,
        W_zh=W_out.reshape(H, 1).T,
        b_z=b_out,
    )
    return np.concatenate([parts[n].ravel() for n in QNWB_ORDER])


def cmd_peer_products(args) -> int:
    "(peer venv) the peer's gradient and Gv products for the directions in --data; writes --result."
    import hessianfree as hf

    class MaskedSquaredError(hf.loss_funcs.SquaredError):
        def d2_loss(self, activities, targets):
            out = [None for _ in activities[:-1]]
            return out + [(~np.isnan(targets)).astype(activities[-1].dtype)]

    d = np.load(args.data)
    out = {}
    for masked in (False, True):
        for mu in (0.0, float(d["mu"])):
            opt = hf.opt.HessianFree(init_damping=float(d["lam"]))
            losses = [MaskedSquaredError() if masked else hf.loss_funcs.SquaredError()]
            if mu > 0:
                losses.append(hf.loss_funcs.StructuralDamping(mu, optimizer=opt))
            net = hf.RNNet(
                shape=[2, int(d["H"]), 1],
                layers=[hf.nl.Linear(), hf.nl.Tanh(), hf.nl.Linear()],
                loss_type=losses,
                load_weights=d["W"].copy(),
                dtype=np.float64,
            )
            net.optimizer = opt
            net.cache_minibatch(d["inputs"], d["targets"])
            key = f"masked{int(masked)}_mu{int(mu > 0)}"
            out[f"grad_{key}"] = net.calc_grad()
            out[f"gv_{key}"] = np.stack([net.calc_G(v, damping=0) for v in d["V"]])
    np.savez(args.result, **out)
    return 0


def cmd_check(args) -> int:
    "(qnwb venv) the peer's gradient and Gv against qnwb's on the same small batch, through the parameter map."
    import tempfile

    import torch

    from qnwb.losses import matching_loss
    from qnwb.models import TanhRNN
    from qnwb.optim.hessian_free import curvature_operator

    torch.set_num_threads(1)
    data = np.load(args.data)
    meta = _meta(data)
    H, lam, mu = meta["hidden"], args.lam, 1 / 30
    model = TanhRNN(2, H, 1, dtype=torch.float64)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.from_numpy(data[f"qnwb_{name}"]))
    x, t = (torch.from_numpy(a[: args.cases].astype(np.float64)) for a in _batch(data, 0))
    rng = np.random.default_rng(0)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    dirs = [{n: rng.standard_normal(shapes[n]) for n in QNWB_ORDER} for _ in range(3)]
    W_hh = data["qnwb_W_hh"]
    qnwb_v = [np.concatenate([d[n].ravel() for n in QNWB_ORDER]) for d in dirs]
    peer_v = np.stack([_to_peer(d, W_hh) for d in dirs])
    W_peer = _to_peer({n: data[f"qnwb_{n}"] for n in QNWB_ORDER}, W_hh)
    with tempfile.TemporaryDirectory() as tmp:
        request, result = Path(tmp) / "request.npz", Path(tmp) / "result.npz"
        np.savez(
            request, W=W_peer, V=peer_v, inputs=x.numpy(), targets=t.numpy(), lam=lam, mu=mu, H=H
        )
        script = str(Path(__file__).resolve())
        command = [args.peer_python, script, "peer-products", "--data", str(request)]
        subprocess.run([*command, "--result", str(result)], check=True)
        peer = dict(np.load(result))
    loss = matching_loss("squared_error")
    with torch.enable_grad():
        grads = torch.autograd.grad(loss(model(x), t), list(model.parameters()))
    g_q = torch.cat([g.reshape(-1) for g in grads]).numpy()

    def rel(a, b):
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    g_p = _from_peer(peer["grad_masked1_mu0"], W_hh, H)
    rows = [("gradient", rel(g_p, g_q))]
    for label, key, mu_q, distance in (
        ("Gv, peer as shipped vs qnwb GGN", "masked0_mu0", 0.0, None),
        ("Gv, peer --mask-curvature vs qnwb GGN", "masked1_mu0", 0.0, None),
        ("Gv + λμ G_S, peer masked vs qnwb 'squared'", "masked1_mu1", mu, "squared"),
        ("Gv + λμ G_S, peer masked vs qnwb 'tanh'", "masked1_mu1", mu, "tanh"),
    ):
        op = curvature_operator(model, loss, (x, t), "ggn", lam, mu_q, distance or "tanh")
        errors = [
            rel(_from_peer(peer[f"gv_{key}"][i], W_hh, H), op.mv(torch.from_numpy(v)).numpy())
            for i, v in enumerate(qnwb_v)
        ]
        rows.append((label, max(errors)))
    print(
        f"float64, {args.cases} sequences of batch 0, initial weights, λ = {lam}, μ = 1/30; "
        "relative error ‖Mᵀ(peer) − qnwb‖ / ‖qnwb‖ (worst of 3 random directions):"
    )
    for label, error in rows:
        print(f"  {label}: {error:.2e}")
    return 0


# -------------------------------------------------------------------------------------------- table, compare
def _fmt(reached: dict | None, key: str, budget: float, digits: int = 0) -> str:
    if reached is None:
        return f">{budget:,.0f}" if key == "minibatches" else "–"
    value = reached[key]
    return f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}"


def table(rows: list[dict]) -> str:
    lines = [
        "| config | seed | loose minibatches | strict minibatches | strict grads + Gv | strict s | strict steps "
        "| ms per Gv | run ms per (grad + Gv) | run s | steps run |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["config"], r["seed"])):
        s, budget = r["strict"], r["budget_minibatches"]
        products = f"{s['gradient_evaluations']} + {s['curvature_products']}" if s else "–"
        lines.append(
            f"| {r['config']} | {r['seed']} | {_fmt(r['loose'], 'minibatches', budget)} "
            f"| {_fmt(s, 'minibatches', budget)} | {products} | {_fmt(s, 'seconds', budget)} "
            f"| {_fmt(s, 'step', budget)} | {1000 * r['gv_seconds']:.1f} "
            f"| {1000 * r['seconds'] / (r['gradient_evaluations'] + r['curvature_products']):.1f} "
            f"| {r['seconds']:.0f} | {r['steps']} |"
        )
    lines += ["", "| config | runs | strict solved | median loose minibatches | median strict minibatches "
              "| median strict s |", "|---|---|---|---|---|---|"]  # fmt: skip
    for config in sorted({r["config"] for r in rows}):
        group = [r for r in rows if r["config"] == config]

        def median(criterion, key, group=group):
            # a failure counts as above every success (its value: infinity) so the median stays honest
            values = [r[criterion][key] if r[criterion] else math.inf for r in group]
            m = statistics.median(values)
            if m == math.inf:  # seconds of a failure: none to give
                return f">{group[0]['budget_minibatches']:,.0f}" if key == "minibatches" else "–"
            return f"{m:,.0f}"

        solved = sum(r["strict"] is not None for r in group)
        lines.append(
            f"| {config} | {len(group)} | {solved} | {median('loose', 'minibatches')} "
            f"| {median('strict', 'minibatches')} | {median('strict', 'seconds')} |"
        )
    return "\n".join(lines)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def cmd_table(args) -> int:
    print(table(_rows(Path(args.out))))
    return 0


def cmd_compare(args) -> int:
    script, out = str(Path(__file__).resolve()), Path(args.out)
    peer_configs = [("peer", [])] + [
        (f"peer CG_iter={n}", ["--cg-iter", str(n)]) for n in args.peer_cg_iters
    ]
    for seed in args.seeds:
        path = str(_default_data("addition", args.T, seed))
        common = ["--data", path, "--budget", str(args.budget), "--out", str(out)]
        jobs = [
            [
                args.qnwb_python,
                script,
                "data",
                "--seed",
                str(seed),
                "--T",
                str(args.T),
                "--out",
                path,
            ]
        ]
        jobs.append([args.qnwb_python, script, "qnwb", *common])
        for _, extra in peer_configs:
            jobs.append([args.peer_python, script, "peer", *common, "--mask-curvature", *extra])
        for job in jobs:  # one run at a time
            print("$", " ".join(job), file=sys.stderr, flush=True)
            subprocess.run(job, check=True)
    print(table([r for r in _rows(out) if r["seed"] in args.seeds]))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p, data=True):
        if data:
            p.add_argument("--data", required=True, help="the .npz written by `data`")
        p.add_argument("--budget", type=float, default=20_000, help="minibatches of 1000 sequences")
        p.add_argument("--out", default=str(OUT), help="JSON-lines file the result is appended to")
        p.add_argument("--label", default=None, help="the config name in the table")
        p.add_argument("--progress", action="store_true", help="a line per step on stderr")

    p = sub.add_parser(
        "data", help="(qnwb venv) write bench_hf's batches, held-out set and initial weights"
    )
    p.add_argument("--task", default="addition")
    p.add_argument("--T", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hidden", type=int, default=50)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--held-out", type=int, default=2000)
    p.add_argument(
        "--steps",
        type=int,
        default=1400,
        help="batches written (the peer spends ≥ 15 products a step: 20,000 minibatches ≤ 1334 steps)",
    )
    p.add_argument("--out", default=None, help="default /tmp/peer_hf_<task>_T<T>_seed<seed>.npz")
    p.set_defaults(fn=cmd_data)

    p = sub.add_parser("qnwb", help="(qnwb venv) qnwb.bench.bench_hf on the same stream")
    common(p)
    p.add_argument("--structural-distance", default="tanh", choices=("tanh", "squared"))
    p.add_argument(
        "--option", action="append", default=[], help="further HessianFree option key=value"
    )
    p.set_defaults(fn=cmd_qnwb)

    p = sub.add_parser("peer", help="(peer venv) hessianfree 0.4.0 on the stream in --data")
    common(p)
    p.add_argument("--cg-iter", type=int, default=250, help="the peer's CG_iter (its default 250)")
    p.add_argument("--damping", type=float, default=1.0, help="init_damping (the peer's default 1)")
    p.add_argument(
        "--structural-damping", type=float, default=1 / 30, help="μ (qnwb's bench_hf: 1/30)"
    )
    p.add_argument("--mask-curvature", action="store_true", help="zero L'' where the target is NaN")
    p.set_defaults(fn=cmd_peer)

    p = sub.add_parser(
        "compare",
        help="data + qnwb + peer (defaults and each --peer-cg-iters) per seed, then table",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--T", type=int, default=20)
    p.add_argument("--budget", type=float, default=20_000)
    p.add_argument("--peer-cg-iters", type=int, nargs="*", default=[50])
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--qnwb-python", default=QNWB_PYTHON)
    p.add_argument("--peer-python", default=PEER_PYTHON)
    p.set_defaults(fn=cmd_compare)

    p = sub.add_parser("table", help="markdown table of the JSON-lines file")
    p.add_argument("--out", default=str(OUT))
    p.set_defaults(fn=cmd_table)

    p = sub.add_parser("check", help="(qnwb venv) the peer's gradient and Gv against qnwb's")
    p.add_argument("--data", required=True)
    p.add_argument("--cases", type=int, default=100)
    p.add_argument("--lam", type=float, default=0.5)
    p.add_argument("--peer-python", default=PEER_PYTHON)
    p.set_defaults(fn=cmd_check)

    p = sub.add_parser("peer-products", help="(peer venv) used by `check`")
    p.add_argument("--data", required=True)
    p.add_argument("--result", required=True)
    p.set_defaults(fn=cmd_peer_products)

    p = sub.add_parser(
        "differences", help="the differences between the implementations and their handling"
    )
    p.set_defaults(fn=lambda args: print(DIFFERENCES) or 0)

    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
