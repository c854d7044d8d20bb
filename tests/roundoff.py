"""Round-off floors for numeric bounds that must hold on every CPU.

Two computations of one quantity in different orders (a library kernel against a test's reference, a vectorised
reduction against a scalar one) differ by round-off, which scales with the size of the numbers the quantity is
computed FROM, not with the quantity itself: a difference of two iterates of size 1 carries errors of about ε·1 however
small the difference is. Kernels differ between CPUs (ATen picks AVX-512, AVX2 or its generic code at start-up; MKL
picks its own), so a bound below a few ulps of that scale passes on one machine and fails on another. `floor` is the
explained bound: c·ε·scale with c = 100 by default (room for short sums and a few chained operations; never more than
a few hundred)."""

import torch

EPS = torch.finfo(torch.float64).eps  # 2.2e-16


def size(*values) -> float:
    """The largest magnitude among tensors and numbers: the scale of the quantities a result is computed from."""
    return max(
        float(v.detach().abs().max()) if isinstance(v, torch.Tensor) else abs(float(v))
        for v in values
    )


def floor(*values, c: float = 100, eps: float = EPS) -> float:
    """c·ε·size(values): the round-off floor of a bound on a quantity computed from `values`."""
    return c * eps * size(*values)
