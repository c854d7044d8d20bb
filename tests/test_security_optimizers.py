"""Bad numbers and bad state against qnwb's seven optimizers: CM and NAG reject a non-finite loss or gradient (θ, v and the
update count stay, one host read per step); every `load_state_dict` refuses another optimizer's state and a corrupted
state of its own with nothing changed; absurd hyperparameters are refused before anything is allocated."""

import contextlib
import copy
import itertools
import math

import pytest
import torch
from resizing import same
from torch import nn

from qnwb.core import SETTING_BOUNDS
from qnwb.losses import matching_loss
from qnwb.optim import CM, LBFGS, LSR1, NAG, SQN, AdaQN, HessianFree
from qnwb.optim.schedules import SutskeverMomentum

F64 = torch.float64
LOSS = matching_loss("squared_error")
BUILD = {  # name ↦ the optimizer for a model
    "HessianFree": lambda model: HessianFree(model, "squared_error", cg_max_iterations=5, seed=0),
    "LBFGS": lambda model: LBFGS(model.parameters(), lr=0.5, memory=3),
    "SQN": lambda model: SQN(model, "squared_error", lr=0.05, memory=3, L=2),
    "AdaQN": lambda model: AdaQN(model.parameters(), lr=0.05, L=2, memory=3, fisher_memory=4),
    "LSR1": lambda model: LSR1(model.parameters(), memory=3),
    "CM": lambda model: CM(model.parameters(), lr=0.05, momentum=SutskeverMomentum(0.99, period=2)),
    "NAG": lambda model: NAG(model.parameters(), lr=lambda t: 0.05 / (1 + t), momentum=0.9),
}
NAMES = list(BUILD)


def problem(device="cpu"):
    """(model, inputs, targets): a small tanh network in float64, the same for every call."""
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(24, 4, generator=g, dtype=F64), torch.randn(24, 2, generator=g, dtype=F64)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).to(device, F64)
    return model, X.to(device), Y.to(device)


def step(optimizer, model, X, Y):
    """One step of `optimizer` on the squared error of `model`, through the step signature it has."""
    if isinstance(optimizer, HessianFree):
        return optimizer.step((X, Y))

    def closure():
        optimizer.zero_grad()
        loss = LOSS(model(X), Y)
        loss.backward()
        return loss

    if isinstance(optimizer, SQN):
        return optimizer.step(closure, curvature_batch=(X, Y))
    if isinstance(optimizer, AdaQN):
        return optimizer.step(closure, monitor=lambda: LOSS(model(X), Y))
    return optimizer.step(closure)


def trained(name, steps=3, device="cpu"):
    """(optimizer, model, X, Y) after `steps` steps."""
    model, X, Y = problem(device)
    optimizer = BUILD[name](model)
    for _ in range(steps):
        step(optimizer, model, X, Y)
    return optimizer, model, X, Y


def timeless(stats: dict) -> dict:
    "The statistics without wall-clock times (HF's *_s)."
    return {k: v for k, v in stats.items() if not k.endswith("_s")}


def assert_continues_as(optimizer, model, reference, reference_model, X, Y, steps=2):
    """Steps of `optimizer` give, bit for bit, the parameters and statistics of `reference` (an untouched twin)."""
    for _ in range(steps):
        step(optimizer, model, X, Y)
        step(reference, reference_model, X, Y)
        assert same(timeless(dict(optimizer.stats)), timeless(dict(reference.stats)))
        for p, q in zip(model.parameters(), reference_model.parameters()):
            assert torch.equal(p, q)


@contextlib.contextmanager
def counted_host_reads():
    """Count every way of reading a tensor on the host (item, bool, float, int, index, tolist, numpy) inside the block, except
    while `counter["paused"]` is true (the closure's own work: the loss may read what it likes)."""
    names = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy")
    saved = {name: getattr(torch.Tensor, name) for name in names}
    counter = {"reads": 0, "paused": False}

    def counting(name):
        def method(self, *args, **kwargs):
            counter["reads"] += not counter["paused"]
            return saved[name](self, *args, **kwargs)

        return method

    try:
        for name in names:
            setattr(torch.Tensor, name, counting(name))
        yield counter
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


# --- 1. CM and NAG reject a non-finite loss or gradient --------------------------------------------------------------

POISONS = {  # what a closure does wrong
    "nan_gradient": lambda loss, params: params[0].grad.view(-1).__setitem__(0, math.nan) or loss,
    "inf_gradient": lambda loss, params: (
        params[-1].grad.view(-1).__setitem__(-1, -math.inf) or loss
    ),
    "nan_loss": lambda loss, params: loss * math.nan,  # the gradients stay finite
    "inf_loss_as_a_number": lambda loss, params: math.inf,
}


@pytest.mark.parametrize("poison", list(POISONS))
@pytest.mark.parametrize("name", ["CM", "NAG"])
def test_a_non_finite_loss_or_gradient_is_rejected_by_cm_and_nag(name, poison, device):
    optimizer, model, X, Y = trained(name, device=device)
    reference, reference_model, _, _ = trained(name, device=device)
    params = list(model.parameters())
    theta = [p.detach().clone() for p in params]
    velocity = [optimizer.state[p]["velocity"].clone() for p in params]
    updates, stats = optimizer.updates, dict(optimizer.stats)

    def closure(poison=None):
        counter["paused"] = True
        optimizer.zero_grad()
        loss = LOSS(model(X), Y)
        loss.backward()
        counter["paused"] = False
        return POISONS[poison](loss, params) if poison else loss

    with counted_host_reads() as counter:
        optimizer.step(lambda: closure(poison))  # no raise: the caller decides
    assert counter["reads"] <= 1  # one decision for all gradients, never one per parameter
    assert all(
        torch.equal(p, q) for p, q in zip(params, theta)
    )  # NAG: θ back from θ + μv, bit for bit
    assert all(
        torch.equal(optimizer.state[p]["velocity"], v) and "_theta" not in optimizer.state[p]
        for p, v in zip(params, velocity)
    )
    assert optimizer.updates == updates  # the schedules do not advance
    assert optimizer.stats["non_finite"] is True and optimizer.stats["step"] == stats["step"]
    with counted_host_reads() as counter:
        optimizer.step(closure)
    assert counter["reads"] <= 1 and optimizer.stats["non_finite"] is False
    step(reference, reference_model, X, Y)
    assert same(optimizer.stats, reference.stats)
    assert all(
        torch.equal(p, q) for p, q in zip(params, reference_model.parameters())
    )  # as if never tried


# --- 2. load_state_dict refuses another optimizer's state and a corrupted one, before anything changes ------------------


@pytest.mark.parametrize("saved_by, loader", list(itertools.permutations(NAMES, 2)))
def test_load_state_dict_refuses_another_optimizers_state_and_changes_nothing(saved_by, loader):
    saved = copy.deepcopy(trained(saved_by)[0].state_dict())
    optimizer, model, X, Y = trained(loader, steps=2)
    reference, reference_model, _, _ = trained(loader, steps=2)
    before = copy.deepcopy(optimizer.state_dict())
    with pytest.raises(
        ValueError, match=f"^state_dict: saved by {saved_by}, this optimizer is {loader}$"
    ):
        optimizer.load_state_dict(saved)
    untagged = {
        k: v for k, v in saved.items() if k != "optimizer"
    }  # as saved before states were tagged
    with pytest.raises(ValueError, match="^state_dict"):
        optimizer.load_state_dict(untagged)
    assert same(optimizer.state_dict(), before)
    assert_continues_as(optimizer, model, reference, reference_model, X, Y)
    assert saved["optimizer"] == saved_by and before["optimizer"] == loader


def test_an_untagged_state_loads_only_where_it_is_provably_the_loaders():
    """States saved before they were tagged: the five optimizers whose settings no other qnwb optimizer has all of load their
    own (and continue identically); CM's and NAG's look alike and are refused with a message that says how to tag them."""
    for name in NAMES:
        saved = {
            k: v
            for k, v in copy.deepcopy(trained(name)[0].state_dict()).items()
            if k != "optimizer"
        }
        optimizer, model, X, Y = trained(name, steps=1)
        if name in ("CM", "NAG"):
            with pytest.raises(ValueError, match="names no optimizer.*'optimizer': 'CM' or 'NAG'"):
                optimizer.load_state_dict(saved)
            continue
        optimizer.load_state_dict(saved)
        reference, reference_model, _, _ = trained(name)
        for p, q in zip(model.parameters(), reference_model.parameters()):
            p.data.copy_(q.data)
        assert_continues_as(optimizer, model, reference, reference_model, X, Y)


def tensor_paths(tree, path=()):
    """The paths (key tuples) of every tensor in the nested dicts and lists of `tree`."""
    if isinstance(tree, torch.Tensor):
        yield path
    elif isinstance(tree, dict):
        for key, value in tree.items():
            yield from tensor_paths(value, (*path, key))
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from tensor_paths(value, (*path, i))


def replaced(tree, path, change):
    """A deep copy of `tree` with the value at `path` replaced by `change(value)` (or removed when change is None)."""
    tree = copy.deepcopy(tree)
    node = tree
    for key in path[:-1]:
        node = node[key]
    if change is None:
        del node[path[-1]]
    else:
        node[path[-1]] = change(node[path[-1]])
    return tree


def other_kind(t):
    "The same values in a dtype of the other kind (floating ↔ integer)."
    return t.long() if t.is_floating_point() else t.double()


def corruptions(saved, optional=()):
    """(label, corrupted state) pairs: every top-level entry and every per-parameter entry (except the `optional` ones, whose
    absence is a valid state) missing; every tensor with a wrong shape, a dtype of the wrong kind, or as a list; a negative
    step count; the parameter indices renumbered or one short; a setting of the wrong type, and an absurd one."""
    for key in saved:
        if key != "optimizer":
            yield f"no {key!r}", replaced(saved, (key,), None)
    for index, entry in saved["state"].items():
        for key in entry:
            if key not in optional:
                yield f"no state[{index}][{key!r}]", replaced(saved, ("state", index, key), None)
    for path in tensor_paths(saved):
        yield f"{path} of a wrong shape", replaced(saved, path, lambda t: t.reshape(-1)[:-1])
        yield f"{path} of the other dtype kind", replaced(saved, path, other_kind)
        yield f"{path} as a list", replaced(saved, path, lambda t: t.tolist())
    if "step" in saved["state"].get(0, {}):
        yield "a negative step count", replaced(saved, ("state", 0, "step"), lambda k: -1)
    if "updates" in saved:
        yield "a negative update count", replaced(saved, ("updates",), lambda k: -1)
    yield (
        "parameters renumbered",
        replaced(saved, ("param_groups", 0, "params"), lambda indices: [i + 1 for i in indices]),
    )
    yield (
        "a parameter missing",
        replaced(saved, ("param_groups", 0, "params"), lambda indices: indices[:-1]),
    )
    group = saved["param_groups"][0]
    setting = "lr" if "lr" in group else "damping" if "damping" in group else "memory"
    yield f"{setting} as a string", replaced(saved, ("param_groups", 0, setting), lambda v: "0.1")
    yield f"{setting} absurd", replaced(saved, ("param_groups", 0, setting), lambda v: 1e300)


@pytest.mark.parametrize("name", NAMES)
def test_a_truncated_or_corrupted_state_of_the_right_optimizer_is_refused_and_changes_nothing(name):
    saved = copy.deepcopy(trained(name, steps=4)[0].state_dict())
    optimizer, model, X, Y = trained(name, steps=2)
    reference, reference_model, _, _ = trained(name, steps=2)
    before = copy.deepcopy(optimizer.state_dict())
    tried = 0
    for label, corrupted in corruptions(saved, getattr(optimizer, "_optional_entries", {})):
        try:
            optimizer.load_state_dict(corrupted)
        except ValueError as e:
            assert "\n" not in str(e), (label, str(e))
        else:
            pytest.fail(f"{name} loaded a state with {label}")
        assert same(optimizer.state_dict(), before), label
        tried += 1
    assert tried >= 12
    assert_continues_as(optimizer, model, reference, reference_model, X, Y)
    optimizer.load_state_dict(saved)  # the intact state still loads


# --- 3. absurd hyperparameters are refused -----------------------------------------------------------------------------

ABSURD = [
    ("HessianFree", {"lr": 1e300}, "lr"),
    ("HessianFree", {"damping": 1e300}, "damping"),
    ("HessianFree", {"preconditioner_shift": 1e300}, "preconditioner_shift"),
    ("HessianFree", {"structural_damping": 1e300}, "structural_damping"),
    ("LBFGS", {"lr": 1e300}, "lr"),
    ("LBFGS", {"memory": 10**12}, "memory"),
    ("SQN", {"lr": 1e300}, "lr"),
    ("SQN", {"memory": 10**12}, "memory"),
    ("AdaQN", {"lr": 1e300}, "lr"),
    ("AdaQN", {"memory": 10**12}, "memory"),
    ("AdaQN", {"fisher_memory": 10**12}, "fisher_memory"),
    ("LSR1", {"memory": 10**12}, "memory"),
    ("LSR1", {"radius": 1e300}, "radius"),
    ("LSR1", {"max_radius": 1e300}, "max_radius"),
    ("LSR1", {"gamma": -1e300}, "gamma"),
    ("LSR1", {"method": "line_search", "gamma": 1e-300}, "gamma"),
    ("CM", {"lr": 1e300}, "lr"),
    ("NAG", {"lr": 1e300}, "lr"),
]


@pytest.mark.parametrize("name, options, setting", ABSURD)
def test_an_absurd_hyperparameter_is_refused_by_the_constructor(name, options, setting):
    model, _, _ = problem()
    model_args = (
        (model, "squared_error") if name in ("HessianFree", "SQN") else (model.parameters(),)
    )
    cls = {
        "HessianFree": HessianFree,
        "LBFGS": LBFGS,
        "SQN": SQN,
        "AdaQN": AdaQN,
        "LSR1": LSR1,
        "CM": CM,
        "NAG": NAG,
    }[name]
    if name in ("CM", "NAG"):
        options = {"lr": 0.1, **options}
    with pytest.raises(ValueError, match=f"{setting}.*(SETTING_BOUNDS|must be)"):
        cls(*model_args, **options)
    assert SETTING_BOUNDS["step_size"] < 1e300 and SETTING_BOUNDS["slots"] < 10**12


STEERED = [
    ("LBFGS", "memory", 10**12),
    ("LBFGS", "lr", 1e300),
    ("SQN", "memory", 10**12),
    ("SQN", "lr", 1e300),
    ("AdaQN", "fisher_memory", 10**12),
    ("AdaQN", "lr", 1e300),
    ("LSR1", "memory", 10**12),
    ("CM", "lr", 1e300),
    ("NAG", "lr", 1e300),
]


@pytest.mark.parametrize("name, setting, value", STEERED)
def test_an_absurd_value_set_between_steps_is_refused_at_the_next_step_and_changes_nothing(
    name, setting, value
):
    optimizer, model, X, Y = trained(name)
    before = copy.deepcopy(optimizer.state_dict())
    theta = [p.detach().clone() for p in model.parameters()]
    good = optimizer.param_groups[0][setting]
    if name in ("CM", "NAG"):
        optimizer.schedules.pop(setting, None)
    optimizer.param_groups[0][setting] = value
    with pytest.raises(ValueError, match=f"{setting}: must be"):
        step(optimizer, model, X, Y)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), theta))
    optimizer.param_groups[0][setting] = good
    after = optimizer.state_dict()
    assert same(
        {k: v for k, v in after.items() if k != "param_groups"},
        {k: v for k, v in before.items() if k != "param_groups"},
    )
