"""Dense float64 references that several test files check qnwb against, one copy each.

Each is written the plain way, independent of the code under test: the quasi-Newton matrices by their textbook
recursions on explicit n × n matrices, and curvature matrices from torch.func (Jacobians by `jacrev` of the model's
outputs as a function of one flat parameter vector, loss Hessians by `torch.func.hessian`)."""

import torch
from torch.func import functional_call, hessian, jacrev

from qnwb.losses import matching_loss

F64 = torch.float64


# --- quasi-Newton recursions ------------------------------------------------------------------------------------------


def dense_bfgs_inverse(pairs, H0):
    """H ← (I − ρsyᵀ) H (I − ρysᵀ) + ρssᵀ from H0, oldest pair first (N&W eq. 6.17); `pairs` of (s, y) vectors."""
    H = H0.clone()
    for s, y in pairs:
        rho, eye = 1 / (s @ y), torch.eye(len(s), dtype=F64)
        H = (eye - rho * torch.outer(s, y)) @ H @ (
            eye - rho * torch.outer(y, s)
        ) + rho * torch.outer(s, s)
    return H


def dense_sr1(pairs, B0):
    """B ← B + wwᵀ/(wᵀs), w = y − Bs, from B0, oldest pair first (N&W eq. 6.24); `pairs` of (s, y) vectors, e.g.
    `zip(S, Y)` for pairs as rows. Self-dual: the pairs as (y, s) from H0 give the inverse H of the same recursion."""
    B = B0.clone()
    for s, y in pairs:
        w = y - B @ s
        B = B + torch.outer(w, w) / (w @ s)
    return B


# --- curvature matrices from torch.func -------------------------------------------------------------------------------


def flat_function(model, inputs, **kwargs):
    """The model's outputs on `inputs` as a function of one flat parameter vector (an unflatten of its own)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]

    def f(theta):
        tensors = [chunk.view(shape) for chunk, shape in zip(theta.split(sizes), shapes)]
        return functional_call(model, dict(zip(names, tensors)), (inputs,), kwargs)

    return f


def theta_of(model):
    "The model's parameters as one detached flat vector."
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def explicit_hessian(model, loss_name, batch):
    """∇²f(θ) of f(θ) = the matching loss `loss_name` of the model's outputs on `batch`, by torch.func.hessian (n × n)."""
    x, t = batch
    f = flat_function(model, x)
    return hessian(lambda theta: matching_loss(loss_name)(f(theta), t))(theta_of(model))


def explicit_ggn(model, loss_name, batch):
    """J^T L'' J from torch.func: J by jacrev (m × n), L'' by torch.func.hessian of the loss (m × m)."""
    x, t = batch
    f = flat_function(model, x)
    theta = theta_of(model)
    z = f(theta).detach()
    J = jacrev(f)(theta).reshape(z.numel(), -1)
    L = hessian(lambda q: matching_loss(loss_name)(q, t))(z).reshape(z.numel(), z.numel())
    return J.T @ L @ J


def explicit_structural(model, batch, distance):
    """J_t^T diag(block) J_t with J_t the Jacobian of the hidden pre-activations, block = (1-h^2)/B or (1-h^2)^2/B."""
    x, _ = batch
    f = flat_function(model, x, return_preactivations=True)
    theta = theta_of(model)
    _, t = f(theta)
    Jt = jacrev(lambda th: f(th)[1])(theta).reshape(t.numel(), -1)
    slope = 1 - torch.tanh(t.detach()).square()
    block = (slope if distance == "tanh" else slope.square()).reshape(-1) / x.shape[0]
    return Jt.T @ (block[:, None] * Jt)
