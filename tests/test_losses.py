"""qnwb.losses against independent references: torch.nn.functional values, autograd, torch.func.hessian."""

import pytest
import torch
import torch.nn.functional as F
from torch.func import hessian

from qnwb.losses import (
    LOSSES,
    SigmoidCrossEntropy,
    SoftmaxCrossEntropy,
    SquaredError,
    matching_loss,
)

NAN = float("nan")
SHAPES = {"cases x units": (4, 3), "cases x time x units": (3, 5, 4)}
MASKS = ("none", "last step", "scattered")


def outputs_and_targets(loss, shape, mask, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = 1.5 * torch.randn(shape, generator=g, dtype=torch.float64)
    raw = torch.randn(shape, generator=g, dtype=torch.float64)
    t = {
        "squared_error": raw,
        "sigmoid_cross_entropy": torch.sigmoid(raw),
        "softmax_cross_entropy": torch.softmax(raw, -1),
    }[loss]
    if mask == "last step":
        t[..., :-1, :] = NAN  # for 2-D shapes: every case but the last has no target
    elif mask == "scattered":
        drop = torch.rand(shape, generator=g) < 0.4
        t = t.masked_fill(drop, NAN)
    return z, t


def reference_value(loss, z, t):
    """The loss from torch.nn.functional, element by element, NaN positions dropped; summed, then / cases."""
    present = ~torch.isnan(t)
    tt = torch.nan_to_num(t)
    if loss == "squared_error":
        return (0.5 * F.mse_loss(z, tt, reduction="none") * present).sum() / z.shape[0]
    if loss == "sigmoid_cross_entropy":
        return (
            F.binary_cross_entropy_with_logits(z, tt, reduction="none") * present
        ).sum() / z.shape[0]
    rows = present.all(-1)
    per_row = F.cross_entropy(
        z.reshape(-1, z.shape[-1]), tt.reshape(-1, z.shape[-1]), reduction="none"
    ).reshape(rows.shape)
    return (per_row * rows).sum() / z.shape[0]


def dense(linear_map, like):
    eye = torch.eye(like.numel(), dtype=like.dtype)
    return torch.stack([linear_map(e.view_as(like)).reshape(-1) for e in eye], dim=1)


cases = pytest.mark.parametrize("loss_name", sorted(LOSSES))
shapes = pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
masks = pytest.mark.parametrize("mask", MASKS)


@cases
@shapes
@masks
def test_value_matches_torch_functional(loss_name, shape, mask):
    z, t = outputs_and_targets(loss_name, shape, mask)
    torch.testing.assert_close(
        matching_loss(loss_name)(z, t), reference_value(loss_name, z, t), rtol=1e-12, atol=1e-12
    )


@cases
@shapes
@masks
def test_gradient_matches_autograd_and_stays_finite(loss_name, shape, mask):
    loss = matching_loss(loss_name)
    z, t = outputs_and_targets(loss_name, shape, mask)
    zz = z.clone().requires_grad_()
    loss(zz, t).backward()
    assert torch.isfinite(zz.grad).all()  # NaN targets never leak into gradients
    torch.testing.assert_close(loss.grad(z, t), zz.grad, rtol=1e-12, atol=1e-14)


@cases
@shapes
@masks
def test_hessian_products_and_square_root_match_torch_func(loss_name, shape, mask):
    loss = matching_loss(loss_name)
    z, t = outputs_and_targets(loss_name, shape, mask)
    reference = hessian(lambda q: loss(q, t))(z).reshape(z.numel(), z.numel())
    H = loss.hessian(z, t)
    torch.testing.assert_close(dense(H.mv, z), reference, rtol=1e-10, atol=1e-13)
    S = dense(H.sqrt_mv, z)
    torch.testing.assert_close(S @ S.T, reference, rtol=1e-10, atol=1e-13)
    assert torch.linalg.eigvalsh(reference).min() > -1e-12  # matching losses are convex in z


@cases
def test_hessian_does_not_depend_on_target_values_only_on_which_are_missing(loss_name):
    loss = matching_loss(loss_name)
    z, t1 = outputs_and_targets(loss_name, (3, 5, 4), "scattered", seed=1)
    _, t2 = outputs_and_targets(loss_name, (3, 5, 4), "none", seed=2)
    t2 = t2.masked_fill(torch.isnan(t1), NAN)
    u = torch.randn_like(z)
    torch.testing.assert_close(loss.hessian(z, t1).mv(u), loss.hessian(z, t2).mv(u), rtol=0, atol=0)


def test_softmax_class_indices_equal_one_hot_targets():
    loss = SoftmaxCrossEntropy()
    z = torch.randn(3, 4, 5, dtype=torch.float64)
    classes = torch.randint(0, 5, (3, 4))
    classes[0, :2] = -1  # no target
    onehot = F.one_hot(classes.clamp(min=0), 5).to(torch.float64)
    onehot[0, :2] = NAN
    torch.testing.assert_close(loss(z, classes), loss(z, onehot))
    torch.testing.assert_close(loss.grad(z, classes), loss.grad(z, onehot))
    u = torch.randn_like(z)
    torch.testing.assert_close(loss.hessian(z, classes).mv(u), loss.hessian(z, onehot).mv(u))
    torch.testing.assert_close(loss.float_targets(z, classes), onehot, equal_nan=True)


def test_sigmoid_loss_is_finite_for_large_outputs():
    z = torch.tensor([[800.0, -800.0]], dtype=torch.float64)
    t = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(
        SigmoidCrossEntropy()(z, t), torch.tensor(1600.0, dtype=torch.float64)
    )


@pytest.mark.parametrize(
    "loss, z, t, error, words",
    [
        (
            SquaredError(),
            torch.zeros(3, 2),
            torch.zeros(3, 3),
            ValueError,
            r"targets of shape \(3, 3\) do not match outputs of shape \(3, 2\)",
        ),
        (SquaredError(), torch.zeros(3), torch.zeros(3), ValueError, "case dimension first"),
        (
            SquaredError(),
            torch.zeros(3, 2, dtype=torch.int64),
            torch.zeros(3, 2),
            TypeError,
            "floating-point",
        ),
        (
            SquaredError(),
            torch.zeros(3, 2),
            [[0.0, 0.0]] * 3,
            TypeError,
            "targets must be a tensor",
        ),
        (
            SoftmaxCrossEntropy(),
            torch.zeros(3, 1),
            torch.zeros(3, 1),
            ValueError,
            "at least 2 output units",
        ),
        (
            SoftmaxCrossEntropy(),
            torch.zeros(3, 4),
            torch.zeros(4, dtype=torch.int64),
            ValueError,
            "class-index targets",
        ),
        (
            SoftmaxCrossEntropy(),
            torch.zeros(3, 4),
            torch.tensor([0, 1, 4]),
            ValueError,
            r"class indices must be in \[-1, 3\].*got 0\.\.4",
        ),
    ],
)
def test_bad_outputs_and_targets_get_clear_errors(loss, z, t, error, words):
    with pytest.raises(error, match=words):
        loss(z, t)


def test_matching_loss_by_name():
    assert isinstance(matching_loss("sigmoid_cross_entropy"), SigmoidCrossEntropy)
    same = SquaredError()
    assert matching_loss(same) is same
    with pytest.raises(ValueError, match="is not one of"):
        matching_loss("hinge")


@pytest.mark.cuda
def test_targets_on_another_device_are_refused():
    with pytest.raises(ValueError, match="targets are on cpu"):
        SquaredError()(torch.zeros(2, 2, device="cuda"), torch.zeros(2, 2))


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_softmax_with_soft_targets_that_do_not_sum_to_one(shape):
    """Rows summing to s != 1: the closed forms become s·p − t and s·(diag p − ppᵀ); autograd and torch.func agree."""
    loss = SoftmaxCrossEntropy()
    g = torch.Generator().manual_seed(4)
    z = torch.randn(shape, generator=g, dtype=torch.float64)
    t = (
        torch.rand(shape, generator=g, dtype=torch.float64) * 1.5
    )  # row sums anywhere in (0, 1.5·units)
    t[0] = NAN  # and a missing row
    zz = z.clone().requires_grad_()
    loss(zz, t).backward()
    torch.testing.assert_close(loss.grad(z, t), zz.grad, rtol=1e-12, atol=1e-14)
    reference = hessian(lambda q: loss(q, t))(z).reshape(z.numel(), z.numel())
    H = loss.hessian(z, t)
    torch.testing.assert_close(dense(H.mv, z), reference, rtol=1e-10, atol=1e-13)
    S = dense(H.sqrt_mv, z)
    torch.testing.assert_close(S @ S.T, reference, rtol=1e-10, atol=1e-13)


@cases
def test_huge_outputs_where_there_is_no_target_do_not_make_nan(loss_name):
    loss = matching_loss(loss_name)
    z = torch.tensor([[1e20, 0.5], [0.3, -0.2]], dtype=torch.float32)
    t = torch.tensor([[NAN, NAN], [0.2, 0.8]], dtype=torch.float32)
    zz = z.clone().requires_grad_()
    value = loss(zz, t)
    value.backward()
    assert (
        torch.isfinite(value)
        and torch.isfinite(zz.grad).all()
        and torch.isfinite(loss.grad(z, t)).all()
    )
    torch.testing.assert_close(value, loss(z[1:], t[1:]) / 2)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_softmax_takes_class_indices_of_any_integer_dtype(dtype):
    loss = SoftmaxCrossEntropy()
    z = torch.randn(4, 3, dtype=torch.float64)
    classes = torch.tensor([0, 2, 1, 2])
    torch.testing.assert_close(loss(z, classes.to(dtype)), loss(z, classes))


def test_softmax_refuses_bool_and_out_of_range_class_indices():
    loss = SoftmaxCrossEntropy()
    z = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match="class indices"):
        loss(z, torch.tensor([True, False, True]))
    with pytest.raises(ValueError, match=r"\[-1, 3\]"):
        loss(z, torch.tensor([0, -2, 1]))
