"""qnwb.curvature against dense float64 references built from torch.func, on tiny random models.

Every reference here is independent of the code under test: Jacobians from torch.func.jacrev on a
function of one flat vector, loss Hessians from torch.func.hessian (both in references.py, shared with
test_models.py and test_cg_probes.py), per-case gradients from a plain loop over cases with torch.autograd.grad.
"""

import gc
import weakref
from pathlib import Path

import pytest
import torch
from references import explicit_ggn, explicit_hessian, explicit_structural

from qnwb.core import flat_params
from qnwb.curvature import (
    GGN,
    EmpiricalFisher,
    Hessian,
    finite_difference_check,
    ggn_diagonal_estimate,
)
from qnwb.losses import matching_loss
from qnwb.models import MLP, TanhRNN

NAN = float("nan")
LOSS_NAMES = ("squared_error", "sigmoid_cross_entropy", "softmax_cross_entropy")
RNN_ROUTES = ("model", "linearize", "jvp")
MLP_ROUTES = ("linearize", "jvp")


def tiny_model(kind, device="cpu", seed=0):
    """A float64 model whose units are neither linear nor saturated (checked, not assumed)."""
    g = torch.Generator().manual_seed(seed)
    model = (
        TanhRNN(3, 4, 3, dtype=torch.float64, generator=g)
        if kind == "rnn"
        else MLP([3, 5, 3], dtype=torch.float64)
    )
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(
                torch.randn(p.shape, generator=g, dtype=p.dtype) * (0.7 if p.dim() == 2 else 0.3)
            )
    return model.to(device)


def tiny_batch(kind, loss_name, mask, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((4, 5, 3) if kind == "rnn" else (6, 3), generator=g, dtype=torch.float64)
    shape = (4, 5, 3) if kind == "rnn" else (6, 3)
    raw = torch.randn(shape, generator=g, dtype=torch.float64)
    t = {
        "squared_error": raw,
        "sigmoid_cross_entropy": torch.sigmoid(raw),
        "softmax_cross_entropy": torch.softmax(raw, -1),
    }[loss_name]
    if mask == "last step":  # the pathological problems: a target only at the end
        t = t.clone()
        if kind == "rnn":
            t[:, :-1] = NAN
        else:
            t[: len(t) // 2] = NAN
    elif mask == "scattered":
        t = t.masked_fill(torch.rand(shape, generator=g) < 0.3, NAN)
    return x.to(device), t.to(device)


def check_units_engaged(model, x):
    with torch.no_grad():
        h = (
            torch.tanh(model(x, return_preactivations=True)[1])
            if isinstance(model, TanhRNN)
            else torch.tanh(model[0](x))
        )
    engaged = ((h.abs() > 0.05) & (h.abs() < 0.97)).double().mean()
    assert engaged > 0.7, (
        f"only {engaged:.0%} of the units are in their nonlinear, unsaturated range"
    )


grid = [
    (kind, loss, mask, route)
    for kind, routes in (("rnn", RNN_ROUTES), ("mlp", MLP_ROUTES))
    for loss in LOSS_NAMES
    for mask in ("none", "last step", "scattered")
    for route in routes
]


@pytest.mark.parametrize("kind, loss_name, mask, route", grid)
def test_ggn_equals_explicit_jacobian_product(kind, loss_name, mask, route, device):
    model = tiny_model(kind)
    batch = tiny_batch(kind, loss_name, mask)
    check_units_engaged(model, batch[0])
    ggn = GGN(
        tiny_model(kind, device), loss_name, tiny_batch(kind, loss_name, mask, device), route=route
    )
    reference = explicit_ggn(model, loss_name, batch)  # on the CPU
    dense = ggn.dense().cpu()
    torch.testing.assert_close(dense, reference, rtol=1e-9, atol=1e-12)
    v = torch.randn(ggn.n, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(ggn.mv(v.to(device)).cpu(), reference @ v, rtol=1e-9, atol=1e-12)
    quadratic = float(v @ reference @ v)  # from the forward-mode product alone
    assert abs(ggn.quadratic_form(v.to(device)) - quadratic) <= 1e-9 * float(v @ v) * float(
        reference.abs().max()
    )
    torch.testing.assert_close(dense, dense.T, rtol=1e-10, atol=1e-13)  # symmetric
    assert torch.linalg.eigvalsh(reference).min() > -1e-10 * reference.abs().max()  # PSD


@pytest.mark.parametrize("route", RNN_ROUTES)
@pytest.mark.parametrize("distance", ["tanh", "squared"])
def test_structural_damping_adds_w_times_explicit_hidden_gauss_newton(route, distance, device):
    model = tiny_model("rnn")
    batch = tiny_batch("rnn", "squared_error", "last step")
    w = 0.37
    ggn = GGN(
        tiny_model("rnn", device),
        "squared_error",
        tiny_batch("rnn", "squared_error", "last step", device),
        structural_distance=distance,
        structural_weight=w,
        route=route,
    )
    G = explicit_ggn(model, "squared_error", batch)
    G_S = explicit_structural(model, batch, distance)
    torch.testing.assert_close(ggn.dense().cpu(), G + w * G_S, rtol=1e-9, atol=1e-12)
    ggn.structural_weight = 2.0  # the optimizer changes λμ between CG runs: no rebuild needed
    torch.testing.assert_close(ggn.dense().cpu(), G + 2.0 * G_S, rtol=1e-9, atol=1e-12)
    v = torch.randn(G.shape[0], dtype=G.dtype, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(
        ggn.mv(v.to(ggn.params[0].device), structural=False).cpu(), G @ v, rtol=1e-9, atol=1e-12
    )  # ρ's B
    scale = float(v @ v) * float(G.abs().max() + w * G_S.abs().max())
    assert (
        abs(ggn.quadratic_form(v.to(ggn.params[0].device)) - float(v @ G @ v)) <= 1e-9 * scale
    )  # ρ's vᵀBv, no G_S
    ggn.structural_weight = 0.0
    torch.testing.assert_close(ggn.dense().cpu(), G, rtol=1e-9, atol=1e-12)
    assert torch.linalg.eigvalsh(G_S).min() > -1e-12  # the matching distance keeps G_S PSD


@pytest.mark.parametrize("kind", ["rnn", "mlp"])
@pytest.mark.parametrize("loss_name", LOSS_NAMES)
def test_hessian_equals_torch_func_hessian_of_the_objective(kind, loss_name, device):
    model = tiny_model(kind)
    batch = tiny_batch(kind, loss_name, "scattered")
    reference = explicit_hessian(model, loss_name, batch)
    H = Hessian(
        tiny_model(kind, device), loss_name, tiny_batch(kind, loss_name, "scattered", device)
    )
    torch.testing.assert_close(H.dense().cpu(), reference, rtol=1e-9, atol=1e-12)
    assert torch.linalg.eigvalsh(reference).min() < 0  # the Hessian is indefinite here, unlike G


@pytest.mark.parametrize("kind", ["rnn", "mlp"])
@pytest.mark.parametrize("loss_name", LOSS_NAMES)
def test_empirical_fisher_is_the_mean_of_per_case_gradient_outer_products(kind, loss_name, device):
    model = tiny_model(kind)
    x, t = tiny_batch(kind, loss_name, "scattered")
    loss = matching_loss(loss_name)
    per_case = []
    for i in range(len(x)):  # a plain loop, independent of vmap
        model.zero_grad()
        loss(model(x[i : i + 1]), t[i : i + 1]).backward()
        per_case.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    g = torch.stack(per_case)
    reference = g.T @ g / len(x)
    fisher = EmpiricalFisher(tiny_model(kind, device), loss_name, (x.to(device), t.to(device)))
    torch.testing.assert_close(fisher.dense().cpu(), reference, rtol=1e-10, atol=1e-13)
    v = torch.randn(fisher.n, dtype=torch.float64)
    torch.testing.assert_close(fisher.mv(v.to(device)).cpu(), reference @ v, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(
        fisher.diagonal().cpu(), reference.diagonal(), rtol=1e-10, atol=1e-13
    )
    torch.testing.assert_close(
        g.sum(0) / len(x),
        torch.cat(
            [
                gr.reshape(-1)
                for gr in torch.autograd.grad(loss(model(x), t), list(model.parameters()))
            ]
        ),
    )


@pytest.mark.parametrize(
    "kind, structural", [("mlp", None), ("rnn", None), ("rnn", "tanh"), ("rnn", "squared")]
)
def test_chapelle_erhan_estimate_converges_to_the_ggn_diagonal(kind, structural):
    model = tiny_model(kind)
    batch = tiny_batch(kind, "softmax_cross_entropy", "scattered")
    w = 0.5 if structural else 0.0
    exact = (
        GGN(
            model,
            "softmax_cross_entropy",
            batch,
            structural_distance=structural,
            structural_weight=w,
        )
        .dense()
        .diagonal()
    )

    def error(samples, seed):
        estimate = ggn_diagonal_estimate(
            model,
            "softmax_cross_entropy",
            batch,
            samples=samples,
            structural_distance=structural,
            structural_weight=w,
            generator=torch.Generator().manual_seed(seed),
        )
        return float((estimate - exact).norm() / exact.norm())

    few, many = error(8, 0), error(800, 1)
    assert many < 0.05, many
    assert many < few / 3  # unbiased: the error shrinks like 1/sqrt(samples)


@pytest.mark.parametrize("kind, routes", [("rnn", RNN_ROUTES), ("mlp", MLP_ROUTES)])
@pytest.mark.parametrize("loss_name", LOSS_NAMES)
def test_finite_difference_checks_agree_to_1e_6(kind, routes, loss_name, device):
    model = tiny_model(kind, device)
    batch = tiny_batch(kind, loss_name, "last step", device)
    for route in routes:
        report = finite_difference_check(
            model, loss_name, batch, route=route, generator=torch.Generator().manual_seed(5)
        )
        assert report["coordinates"] == report["parameters"] == flat_params(model).numel()
        assert max(report["jvp"], report["vjp"], report["ggn"]) < 1e-6, (route, report)


def test_finite_difference_check_catches_a_wrong_linearization(monkeypatch):
    """The check can fail: break the hand-written R-forward (drop the W_hh R h term) and it must notice."""
    from qnwb import models

    model = tiny_model("rnn")
    batch = tiny_batch("rnn", "squared_error", "none")
    original = models.TanhRNNLinearization.jvp

    def broken(self, tangents):
        W_hh = self.layers[0][1]
        self.layers[0][1] = torch.zeros_like(W_hh)
        try:
            return original(self, tangents)
        finally:
            self.layers[0][1] = W_hh

    monkeypatch.setattr(models.TanhRNNLinearization, "jvp", broken)
    report = finite_difference_check(model, "squared_error", batch, route="model")
    assert report["jvp"] > 1e-2 and report["ggn"] > 1e-2


def test_operators_are_bound_to_the_parameters_they_were_built_with():
    model = tiny_model("rnn")
    batch = tiny_batch("rnn", "squared_error", "none")
    operators = [
        GGN(model, "squared_error", batch),
        Hessian(model, "squared_error", batch),
        EmpiricalFisher(model, "squared_error", batch),
    ]
    v = torch.randn(operators[0].n, dtype=torch.float64)
    before = [op.mv(v) for op in operators]
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)  # an optimizer step taken while CG still runs on the old batch
    for op, expected in zip(operators, before):
        torch.testing.assert_close(op.mv(v), expected, rtol=0, atol=0)


def resident_bytes():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    pytest.skip("no /proc/self/status here")


@pytest.mark.parametrize(
    "build, check_resident",
    [
        (
            lambda m, b: GGN(
                m, "squared_error", b, structural_distance="tanh", structural_weight=0.1
            ),
            True,
        ),
        (
            lambda m, b: GGN(m, "squared_error", b, route="jvp"),
            True,
        ),  # a cached autograd graph (C++ side)
        (
            lambda m, b: Hessian(m, "squared_error", b),
            True,
        ),  # a cached double-backward graph (C++ side)
        # The Fisher caches only Python-held tensors, which the weakref checks cover; its vmap transients make
        # the resident size wander by tens of MB after warm-up, more than a leaked cache would add at this size.
        (lambda m, b: EmpiricalFisher(m, "squared_error", b), False),
    ],
    ids=["ggn-model-structural", "ggn-jvp", "hessian", "fisher"],
)
def test_building_many_operators_does_not_grow_memory(build, check_resident):
    g = torch.Generator().manual_seed(0)
    model = TanhRNN(3, 48, 2, dtype=torch.float64, generator=g)
    x = torch.randn(128, 40, 3, generator=g, dtype=torch.float64)
    batch = (x, torch.randn(128, 40, 2, generator=g, dtype=torch.float64))
    v = torch.randn(flat_params(model).numel(), dtype=torch.float64)
    for _ in range(
        5
    ):  # warm-up: the allocator's arenas grow to their working size (vmap's transients need a few rounds)
        op = build(model, batch)
        op.mv(v)
        alive = weakref.ref(op)
        del op
        gc.collect()
        assert alive() is None  # nothing keeps an operator (and its cached graph or states) alive
    start = resident_bytes()
    built = []
    for _ in range(12):
        op = build(model, batch)
        op.mv(v)
        built.append(weakref.ref(op))
        del op
    gc.collect()
    assert all(ref() is None for ref in built)  # every operator, and so its cache, is gone
    one_batch_of_states = 128 * 40 * 48 * 8  # ~2 MB; one operator caches at least two such tensors
    # 12 leaked operators would add at least 24 of them; allow the allocator's noise half of that.
    if check_resident:
        assert resident_bytes() - start < 12 * one_batch_of_states, resident_bytes() - start


def test_bad_input_gets_clear_errors():
    rnn, mlp = tiny_model("rnn"), tiny_model("mlp")
    x, t = tiny_batch("rnn", "squared_error", "none")
    with pytest.raises(
        ValueError, match=r"targets of shape \(4, 5, 2\) do not match outputs of shape \(4, 5, 3\)"
    ):
        GGN(rnn, "squared_error", (x, t[..., :2]))
    with pytest.raises(ValueError, match=r"inputs: expected shape \(cases, time, 3\)"):
        GGN(rnn, "squared_error", (x[..., :2], t))
    ggn = GGN(rnn, "squared_error", (x, t))
    with pytest.raises(ValueError, match=f"1-D tensor of {ggn.n} elements"):
        ggn.mv(torch.zeros(ggn.n - 1, dtype=torch.float64))
    with pytest.raises(TypeError, match="float32"):
        ggn.mv(torch.zeros(ggn.n))
    one_output = MLP([3, 1], dtype=torch.float64)
    with pytest.raises(ValueError, match="at least 2 output units"):
        GGN(
            one_output,
            "softmax_cross_entropy",
            (torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, 1, dtype=torch.float64)),
        )
    xm, tm = tiny_batch("mlp", "squared_error", "none")
    with pytest.raises(ValueError, match="such as qnwb.models.TanhRNN"):
        GGN(mlp, "squared_error", (xm, tm), structural_distance="tanh", structural_weight=0.1)
    with pytest.raises(ValueError, match="structural_distance"):
        GGN(rnn, "squared_error", (x, t), structural_distance="cosine")
    with pytest.raises(ValueError, match="structural_weight"):
        GGN(rnn, "squared_error", (x, t), structural_distance="tanh", structural_weight=-1.0)
    with pytest.raises(ValueError, match="route"):
        GGN(rnn, "squared_error", (x, t), route="symbolic")
    with pytest.raises(ValueError, match="own linearize"):
        GGN(mlp, "squared_error", (xm, tm), route="model")
    with pytest.raises(TypeError, match="pair"):
        GGN(rnn, "squared_error", x)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        GGN(lambda q: q, "squared_error", (x, t))
    with pytest.raises(ValueError, match="samples"):
        ggn_diagonal_estimate(rnn, "squared_error", (x, t), samples=0)


@pytest.mark.parametrize("cases, steps", [(1, 1), (1, 4), (3, 1)])
@pytest.mark.parametrize("route", RNN_ROUTES)
def test_ggn_on_single_case_or_single_step_sequences(cases, steps, route):
    model = tiny_model("rnn")
    g = torch.Generator().manual_seed(7)
    x = torch.randn(cases, steps, 3, generator=g, dtype=torch.float64)
    t = torch.randn(cases, steps, 3, generator=g, dtype=torch.float64)
    ggn = GGN(
        model,
        "squared_error",
        (x, t),
        structural_distance="tanh",
        structural_weight=0.3,
        route=route,
    )
    reference = explicit_ggn(model, "squared_error", (x, t)) + 0.3 * explicit_structural(
        model, (x, t), "tanh"
    )
    torch.testing.assert_close(ggn.dense(), reference, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("route", RNN_ROUTES)
def test_operators_are_bound_to_the_batch_they_were_built_with(route):
    model = tiny_model("rnn")
    x, t = tiny_batch("rnn", "squared_error", "none")
    x1 = x[:1].clone()  # B = 1: the case where a reshape would not copy
    ggn, ggn1 = (
        GGN(model, "squared_error", (x, t), route=route),
        GGN(model, "squared_error", (x1, t[:1]), route=route),
    )
    v = torch.randn(ggn.n, dtype=torch.float64)
    before, before1 = ggn.mv(v), ggn1.mv(v)
    x.mul_(-2.0)  # a data loader reusing its buffer
    x1.mul_(-2.0)
    torch.testing.assert_close(ggn.mv(v), before, rtol=0, atol=0)
    torch.testing.assert_close(ggn1.mv(v), before1, rtol=0, atol=0)


def test_structural_weight_accepts_numbers_of_any_kind_and_refuses_the_rest():
    import numpy as np

    model = tiny_model("rnn")
    batch = tiny_batch("rnn", "squared_error", "none")
    for w, expected in (
        (np.float32(0.5), 0.5),
        (torch.tensor(0.25, dtype=torch.float64), 0.25),
        (1, 1.0),
    ):
        ggn = GGN(model, "squared_error", batch, structural_distance="tanh", structural_weight=w)
        assert type(ggn.structural_weight) is float and ggn.structural_weight == expected
    with pytest.raises(TypeError, match="structural_weight"):
        GGN(model, "squared_error", batch, structural_distance="tanh", structural_weight=True)
    with pytest.raises(TypeError, match="structural_weight"):
        GGN(model, "squared_error", batch, structural_distance="tanh", structural_weight="0.1")
    with pytest.raises(ValueError, match="coordinates"):
        finite_difference_check(model, "squared_error", batch, coordinates=0)
    with pytest.raises(
        ValueError, match="inputs: are torch.float32 on cpu, the network.s parameters torch.float64"
    ):
        GGN(model, "squared_error", (batch[0].float(), batch[1]))


@pytest.mark.parametrize("chunk", [1, 3, 64])
@pytest.mark.parametrize("kind", ["rnn", "mlp"])
def test_streamed_empirical_fisher_diagonal_equals_the_full_one(chunk, kind):
    from qnwb.curvature import empirical_fisher_diagonal

    model = tiny_model(kind)
    batch = tiny_batch(kind, "softmax_cross_entropy", "scattered")
    torch.testing.assert_close(
        empirical_fisher_diagonal(model, "softmax_cross_entropy", batch, chunk=chunk),
        EmpiricalFisher(model, "softmax_cross_entropy", batch).diagonal(),
        rtol=1e-12,
        atol=1e-15,
    )
    with pytest.raises(ValueError, match="chunk"):
        empirical_fisher_diagonal(model, "softmax_cross_entropy", batch, chunk=0)
