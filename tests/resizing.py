"""Helpers for the tests of buffer sizes set between steps (`memory`, `fisher_memory` and `L` in a parameter group)."""

import copy
import math

import torch

from qnwb.optim.memory import PairMemory

PARTS = {
    "memory": "memory",
    "fisher_memory": "fisher",
}  # a size setting ↦ the optimizer's buffer it sizes


def twin(model, optimizer, build, **sizes) -> tuple:
    """`(model copy, optimizer copy)`: `build(model_copy, **sizes)` constructs the optimizer, which loads the original's
    state_dict with, for each `setting=size`, the buffer replaced by a newly built one of `size` slots holding the
    original's newest entries (pushed oldest first) and the group's setting set to `size`. With sizes: the reference
    for a resize, which it never calls (the built buffers already have the saved sizes); without: a plain copy."""
    model = copy.deepcopy(model)
    saved = copy.deepcopy(optimizer.state_dict())
    for setting, size in sizes.items():
        old = getattr(optimizer, PARTS[setting])
        new = type(old)(size, old.n, device=old.device, dtype=old.dtype)
        # each row cloned: a BLAS dot product may round differently on a row view that is not aligned as the original was
        if isinstance(old, PairMemory):
            S, Y = old.pairs()
            for s, y in zip(S[-size:], Y[-size:]):
                new.push(s.clone(), y.clone())
        else:
            for g in old.gradients()[-size:]:
                new.push(g.clone())
        saved[PARTS[setting]] = new.state_dict()
        saved["param_groups"][0][setting] = size
    copied = build(model, **sizes)
    copied.load_state_dict(saved)
    return model, copied


def same(a, b) -> bool:
    """Equal bit for bit, recursively through dicts, lists and tuples (tensors: same dtype, shape and values; NaN equals NaN)."""
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor) or a.dtype != b.dtype or a.shape != b.shape:
            return False
        if a.is_floating_point():
            return bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())
        return torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return (
            isinstance(b, (list, tuple))
            and len(a) == len(b)
            and all(same(x, y) for x, y in zip(a, b))
        )
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def optimizer_state(optimizer) -> dict:
    """What a refused step must leave alone: the optimizer's state_dict without the parameter group (which holds the bad value)."""
    saved = optimizer.state_dict()
    saved.pop("param_groups")
    return saved


def generator_copy(generator: torch.Generator) -> torch.Generator:
    "A generator in the same state (the twin of a run draws what the run draws)."
    copied = torch.Generator()
    copied.set_state(generator.get_state())
    return copied
