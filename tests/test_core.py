"""qnwb.core against torch's own references: parameters_to_vector, vector_to_parameters, autograd."""

import random

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from qnwb.core import (
    FlatBuffer,
    assign_flat_,
    default_device,
    flat_grads,
    flat_params,
    make_generator,
    param_list,
    patch,
    rng_state,
    seed_everything,
    set_rng_state,
    unflatten,
)

shapes = st.lists(
    st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple), min_size=1, max_size=6
)


def tensors_of(shape_list, seed=0, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=dtype).to(device) for s in shape_list]


def small_net(device, dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(device, dtype)


@given(shapes)
def test_flat_params_is_parameters_to_vector(shape_list):
    tensors = tensors_of(shape_list)
    torch.testing.assert_close(flat_params(tensors), parameters_to_vector(tensors), rtol=0, atol=0)


@given(shapes, st.integers(0, 2**16))
def test_assign_flat_is_vector_to_parameters(shape_list, seed):
    ours, theirs = tensors_of(shape_list), tensors_of(shape_list)
    n = sum(t.numel() for t in ours)
    vec = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    assign_flat_(ours, vec)
    vector_to_parameters(vec, theirs)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(flat_params(ours), vec, rtol=0, atol=0)


@given(shapes)
def test_unflatten_gives_views_shaped_like_the_tensors(shape_list):
    tensors = tensors_of(shape_list)
    vec = torch.arange(sum(t.numel() for t in tensors), dtype=torch.float64)
    views = unflatten(vec, tensors)
    assert [v.shape for v in views] == [t.shape for t in tensors]
    vec.mul_(-1)  # writing through the vector shows in every view: they share its memory
    torch.testing.assert_close(parameters_to_vector(views), vec, rtol=0, atol=0)


def test_non_contiguous_and_reordered_tensors_are_copied_correctly():
    base = torch.randn(4, 6, dtype=torch.float64)
    transposed = [base.t(), torch.randn(3, dtype=torch.float64)]
    # parameters_to_vector itself refuses non-contiguous tensors; the reference is a row-major cat.
    torch.testing.assert_close(
        flat_params(transposed), torch.cat([t.reshape(-1) for t in transposed]), rtol=0, atol=0
    )
    flat = torch.randn(10, dtype=torch.float64)
    reversed_slices = [
        flat[5:],
        flat[:5],
    ]  # one storage, but out of order: must not be taken as a view
    out = flat_params(reversed_slices)
    assert out.data_ptr() != flat.data_ptr()
    torch.testing.assert_close(out, torch.cat([flat[5:], flat[:5]]))


def test_unflatten_views_carry_autograd_like_the_module(device):
    """Gradient w.r.t. a flat vector through functional_call equals the module's own gradient."""
    net = small_net(device)
    x = torch.randn(7, 3, dtype=torch.float64, device=device)
    net(x).tanh().sum().backward()
    names = [name for name, _ in net.named_parameters()]
    theta = flat_params(net).clone().requires_grad_(True)
    out = functional_call(net, dict(zip(names, unflatten(theta, net))), (x,))
    (grad,) = torch.autograd.grad(out.tanh().sum(), theta)
    torch.testing.assert_close(grad, flat_grads(net))


def test_flat_buffer_is_zero_copy_and_keeps_the_function(device):
    net = small_net(device)
    reference = small_net(device)  # same seed, same weights, never rebound
    x = torch.randn(9, 3, dtype=torch.float64, device=device)
    buffer = FlatBuffer(net)
    torch.testing.assert_close(net(x), reference(x), rtol=0, atol=0)
    assert flat_params(net).data_ptr() == buffer.data.data_ptr()

    net(x).square().sum().backward()
    reference(x).square().sum().backward()
    assert flat_grads(net).data_ptr() == buffer.grad.data_ptr()
    torch.testing.assert_close(buffer.grad, flat_grads(reference))

    # A torch.optim step on the module is a step on the flat vector, and vice versa.
    expected = buffer.data - 0.1 * buffer.grad
    torch.optim.SGD(net.parameters(), lr=0.1).step()
    torch.testing.assert_close(buffer.data, expected)
    assign_flat_(net, buffer.data)  # its own memory: a no-op
    torch.testing.assert_close(flat_params(net), expected)


def test_flat_buffer_survives_set_to_none_and_rebinds_on_zero_grad(device):
    net = small_net(device)
    buffer = FlatBuffer(net)
    x = torch.randn(4, 3, dtype=torch.float64, device=device)
    net(x).sum().backward()
    first = buffer.grad.clone()
    torch.optim.SGD(
        net.parameters(), lr=0.0
    ).zero_grad()  # set_to_none=True detaches .grad from the buffer
    net(x).sum().backward()
    assert flat_grads(net).data_ptr() != buffer.grad.data_ptr()
    torch.testing.assert_close(flat_grads(net), first)  # still correct, by copying
    buffer.zero_grad()
    net(x).sum().backward()
    assert flat_grads(net).data_ptr() == buffer.grad.data_ptr()
    torch.testing.assert_close(buffer.grad, first)


def test_missing_gradients_read_as_zeros():
    net = small_net("cpu")
    net(torch.randn(2, 3, dtype=torch.float64))[:, 0].sum().backward()
    net[2].bias.grad = None
    grads = flat_grads(net)
    assert grads.shape == parameters_to_vector(net.parameters()).shape
    assert torch.all(grads[-2:] == 0)


def test_tied_parameters_count_once():
    net = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Tanh(), nn.Linear(4, 4, bias=False))
    net[2].weight = net[0].weight
    assert flat_params(net).numel() == parameters_to_vector(net.parameters()).numel() == 16


@pytest.mark.parametrize(
    "params, error, words",
    [
        (torch.zeros(3), TypeError, "not a single tensor"),
        ([], ValueError, "no tensors"),
        (nn.Tanh(), ValueError, "no tensors"),
        ([torch.zeros(2, dtype=torch.int64)], TypeError, "floating-point"),
        ([torch.zeros(2), torch.zeros(2, dtype=torch.float64)], TypeError, "one dtype"),
        ([{"lr": 0.1}], ValueError, "'params' entry"),
        (["weights"], TypeError, "expected a torch.Tensor"),
    ],
)
def test_param_list_refuses_what_makes_no_flat_vector(params, error, words):
    with pytest.raises(error, match=words):
        param_list(params)


def test_param_list_refuses_a_tensor_twice_and_reads_param_groups_in_order():
    a, b, c = (torch.zeros(i + 1) for i in range(3))
    with pytest.raises(ValueError, match="listed twice"):
        param_list([a, b, a])
    assert [t.numel() for t in param_list([{"params": [a, b]}, {"params": c}])] == [1, 2, 3]


def test_vectors_that_do_not_fit_are_refused():
    tensors = tensors_of([(2, 3), (4,)])
    with pytest.raises(ValueError, match="10 elements"):
        assign_flat_(tensors, torch.zeros(9, dtype=torch.float64))
    with pytest.raises(ValueError, match="10 elements"):
        unflatten(torch.zeros(2, 5, dtype=torch.float64), tensors)
    with pytest.raises(TypeError, match="float32"):
        assign_flat_(tensors, torch.zeros(10))
    with pytest.raises(TypeError, match="1-D torch.Tensor"):
        unflatten([0.0] * 10, tensors)


@pytest.mark.cuda
def test_mixed_devices_are_refused():
    with pytest.raises(ValueError, match="one device"):
        param_list([torch.zeros(2), torch.zeros(2, device="cuda")])
    with pytest.raises(TypeError, match="cuda"):
        assign_flat_([torch.zeros(2)], torch.zeros(2, device="cuda"))


def test_default_device_auto_env_and_errors(monkeypatch):
    monkeypatch.delenv("QNWB_DEVICE", raising=False)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    assert default_device().type == auto
    assert default_device("auto").type == auto
    assert default_device(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setenv("QNWB_DEVICE", "cpu")
    assert default_device() == torch.device("cpu")
    with pytest.raises(ValueError, match="is not a device"):
        default_device("gpu")
    with pytest.raises(ValueError, match="not supported"):
        default_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            default_device("cuda")
        monkeypatch.setenv("QNWB_DEVICE", "cuda")
        with pytest.raises(ValueError, match="CUDA is not available"):
            default_device()


@pytest.mark.cuda
def test_default_device_refuses_a_missing_gpu_index():
    with pytest.raises(ValueError, match="CUDA device"):
        default_device(f"cuda:{torch.cuda.device_count()}")


def draws():
    return random.random(), float(np.random.rand()), torch.rand(2).tolist()


def test_seed_everything_repeats_every_stream():
    seed_everything(123)
    first = draws()
    seed_everything(123)
    assert draws() == first
    seed_everything(124)
    assert draws() != first


def test_rng_state_round_trip():
    seed_everything(5)
    draws()
    state = rng_state()
    expected = draws()
    draws()
    set_rng_state(state)
    assert draws() == expected


def test_make_generator_is_independent_of_the_global_stream(device):
    seed_everything(0)
    a = torch.rand(4, generator=make_generator(9, device), device=device)
    torch.rand(100)
    b = torch.rand(4, generator=make_generator(9, device), device=device)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize(
    "seed, error", [(-1, ValueError), (2**32, ValueError), (1.5, TypeError), (True, TypeError)]
)
def test_bad_seeds_are_refused(seed, error):
    with pytest.raises(error, match="seed"):
        seed_everything(seed)
    with pytest.raises(error, match="seed"):
        make_generator(seed)


class _Holder:  # module-level: a postponed annotation names it in this module's globals
    pass


def test_patch_attaches_a_decorated_method_whose_class_is_named_by_a_postponed_annotation():
    @patch
    @torch.no_grad()
    def peek(self: "_Holder", x: int) -> bool:
        return torch.is_grad_enabled() or x > 0

    @patch(as_classmethod=True)
    def made(cls: "type[_Holder]") -> "_Holder":
        return cls()

    assert _Holder.made().peek(0) is False
    assert _Holder.peek.__qualname__ == "_Holder.peek" and _Holder.__dict__["made"].__func__ is made
    with pytest.raises(TypeError, match="must be annotated with a class"):
        patch(torch.no_grad()(lambda self: None))
