"""qnwb.models: stacked TanhRNN layers against dense references, the autoencoders and LeNet-like nets of the papers."""

import pytest
import torch
from references import explicit_ggn, explicit_structural  # the dense torch.func references

from qnwb.core import make_generator
from qnwb.curvature import GGN, finite_difference_check
from qnwb.init import esn_init_
from qnwb.models import AUTOENCODERS, DeepAutoencoder, LeNet, TanhRNN


def stacked(layers, device="cpu"):
    g = make_generator(layers)
    model = TanhRNN(3, 4, 2, n_layers=layers, dtype=torch.float64, generator=g)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(
                torch.randn(p.shape, generator=g, dtype=p.dtype) * (0.7 if p.dim() == 2 else 0.3)
            )
    return model.to(device)


def batch(device="cpu"):
    g = make_generator(9)
    x = torch.randn(3, 5, 3, generator=g, dtype=torch.float64)
    t = torch.randn(3, 5, 2, generator=g, dtype=torch.float64)
    t[:, :2] = float("nan")
    return x.to(device), t.to(device)


@pytest.mark.parametrize("layers", [2, 3])
@pytest.mark.parametrize("route", ["model", "linearize", "jvp"])
def test_stacked_ggn_with_structural_damping_equals_the_explicit_reference(layers, route, device):
    model, data = stacked(layers), batch()
    reference = explicit_ggn(model, "squared_error", data) + 0.2 * explicit_structural(
        model, data, "tanh"
    )
    ggn = GGN(
        stacked(layers, device),
        "squared_error",
        batch(device),
        structural_distance="tanh",
        structural_weight=0.2,
        route=route,
    )
    torch.testing.assert_close(ggn.dense().cpu(), reference, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("layers", [2, 3])
def test_stacked_finite_differences(layers):
    # Central differences err by O(eps^2 * third derivative); three stacked tanh layers have larger third
    # derivatives than one, so eps = 1e-5 here (round-off stays near 1e-11). Exactness is the dense test above.
    report = finite_difference_check(
        stacked(layers),
        "squared_error",
        batch(),
        eps=1e-5,
        route="model",
        generator=make_generator(0),
    )
    assert max(report["jvp"], report["vjp"], report["ggn"]) < 1e-6, report


def test_stacked_layout_and_names():
    model = TanhRNN(3, 4, 2, n_layers=3)
    names = [n for n, _ in model.named_parameters()]
    assert names == [
        "W_hx",
        "W_hh",
        "b_h",
        "h0",
        "W_hx_1",
        "W_hh_1",
        "b_h_1",
        "h0_1",
        "W_hx_2",
        "W_hh_2",
        "b_h_2",
        "h0_2",
        "W_zh",
        "b_z",
    ]
    assert model.W_hx_1.shape == (4, 4) and model.W_hx.shape == (4, 3)
    z, h, t = model(torch.randn(2, 6, 3), return_hidden=True, return_preactivations=True)
    assert z.shape == (2, 6, 2) and h.shape == t.shape == (2, 6, 12)
    torch.testing.assert_close(h, torch.tanh(t))
    single = TanhRNN(3, 4, 2)
    assert [n for n, _ in single.named_parameters()] == ["W_hx", "W_hh", "b_h", "h0", "W_zh", "b_z"]
    with pytest.raises(ValueError, match="n_layers"):
        TanhRNN(3, 4, 2, n_layers=0)


def test_esn_init_layer_zero_radius():
    model = esn_init_(
        TanhRNN(2, 30, 1, n_layers=2, dtype=torch.float64), generator=make_generator(0)
    )
    assert abs(torch.linalg.eigvals(model.W_hh).abs().max().item() - 1.1) < 1e-6


@pytest.mark.parametrize("name", sorted(AUTOENCODERS))
def test_autoencoders_of_table_6(name):
    model, loss = DeepAutoencoder.preset(name)
    sizes, expected_loss = AUTOENCODERS[name]
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    widths = [linears[0].in_features] + [m.out_features for m in linears]
    assert widths == list(sizes) + list(sizes[-2::-1])  # encoder, then its mirror
    assert loss == expected_loss
    kinds = [type(m).__name__ for m in model]
    code = 2 * (len(sizes) - 1) - 2  # position of the code layer's Linear
    assert (
        kinds[code] == "Linear" and kinds[code + 1] == "Linear"
    )  # a linear code: no sigmoid after it
    assert kinds[-1] == "Linear" and kinds.count("Sigmoid") == 2 * (len(sizes) - 1) - 2
    x = torch.rand(3, sizes[0])
    assert model(x).shape == x.shape and model.encode(x).shape == (3, sizes[-1])


@pytest.mark.parametrize(
    "dataset, shape, parameters",
    [("mnist", (1, 28, 28), 431_080), ("cifar10", (3, 32, 32), 145_578)],
)
@pytest.mark.parametrize("batch_norm", [False, True])
def test_lenet_like_nets_of_the_lsr1_appendix(dataset, shape, parameters, batch_norm):
    model = LeNet(dataset, batch_norm=batch_norm, generator=make_generator(0))
    assert model(torch.rand(4, *shape)).shape == (4, 10)
    norms = [m for m in model if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d))]
    assert len(norms) == ((3 if dataset == "mnist" else 4) if batch_norm else 0)
    if not batch_norm:
        assert sum(p.numel() for p in model.parameters()) == parameters
    convs = [m for m in model if isinstance(m, torch.nn.Conv2d)]
    expected_std = 0.1 if dataset == "mnist" else 0.01
    assert all(abs(c.weight.std().item() - expected_std) < 0.3 * expected_std for c in convs)
    with pytest.raises(ValueError, match="dataset"):
        LeNet("imagenet")


def test_esn_init_initialises_every_stacked_layer():
    model = esn_init_(
        TanhRNN(2, 30, 1, n_layers=3, dtype=torch.float64),
        input_scale=0.1,
        generator=make_generator(0),
    )
    for index in range(3):
        W_hx, W_hh, b_h, h0 = model.layer(index)
        assert (
            abs(torch.linalg.eigvals(W_hh).abs().max().item() - 1.1) < 1e-6
            and ((W_hh != 0).sum(1) == 15).all()
        )
        assert abs(W_hx.std().item() - 0.1) < 0.03 and (b_h == 0).all() and (h0 == 0).all()


def test_language_model_shape():
    model = TanhRNN.language_model(40)
    assert (model.n_in, model.n_out, model.n_hidden, model.n_layers) == (40, 40, 100, 5)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_curvature_products_on_lenet_leave_batch_norm_statistics_alone(batch_norm):
    """Too many parameters for a dense reference: symmetry, PSD, agreement of the routes, finite differences."""
    net = LeNet("mnist", batch_norm=batch_norm, generator=make_generator(0)).double()
    g = make_generator(1)
    x = torch.rand(6, 1, 28, 28, generator=g, dtype=torch.float64)
    y = torch.nn.functional.one_hot(torch.arange(6) % 10, 10).double()
    before = {name: b.clone() for name, b in net.named_buffers()}
    G, G2 = (
        GGN(net, "softmax_cross_entropy", (x, y), route="jvp"),
        GGN(net, "softmax_cross_entropy", (x, y), route="linearize"),
    )
    u, v = (torch.randn(G.n, generator=g, dtype=torch.float64) for _ in range(2))
    Gv, Gu = G.mv(v), G.mv(u)
    torch.testing.assert_close(u @ Gv, v @ Gu, rtol=1e-9, atol=1e-12)
    assert v @ Gv >= 0
    torch.testing.assert_close(G2.mv(v), Gv, rtol=1e-9, atol=1e-12)
    # ReLU and max-pool have kinks: a step eps along a random direction over 431k weights crosses some of them
    # (measured: Jv error 2e-3 at eps=1e-4, 1e-4 at 1e-6, 1e-9 at 1e-8), so this check takes a tiny step.
    report = finite_difference_check(
        net, "softmax_cross_entropy", (x, y), eps=1e-8, coordinates=12, generator=make_generator(2)
    )
    assert max(report["jvp"], report["vjp"], report["ggn"]) < 1e-6, report
    for name, b in net.named_buffers():  # a curvature product is not a training step
        assert torch.equal(b, before[name]), name
