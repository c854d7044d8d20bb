"""qnwb.diagnostics.hidden: hidden states, saturation and back-propagated errors of TanhRNN against dense references."""

import math

import pytest
import torch

from qnwb.core import make_generator
from qnwb.diagnostics.hidden import (
    compare_hidden_states,
    comparison_figure,
    gradient_norm_figure,
    hidden_heatmap_figure,
    probe_hidden_states,
    saturation_figure,
)
from qnwb.init import Centering, esn_init_
from qnwb.losses import matching_loss
from qnwb.models import TanhRNN
from qnwb.tasks import make_task


def rnn(
    n_in=3, n_hidden=5, n_out=2, layers=1, seed=0, scale=0.5, dtype=torch.float64, device="cpu"
):
    "A small random RNN whose units are neither linear nor saturated (|h| mostly in 0.1–0.9)."
    net = TanhRNN(n_in, n_hidden, n_out, layers, dtype=dtype, generator=make_generator(seed))
    g = make_generator(seed + 100)
    with torch.no_grad():
        for p in net.parameters():
            fan_in = p.shape[1] if p.dim() == 2 else 4.0
            p.copy_(scale * torch.randn(p.shape, generator=g, dtype=torch.float64) / fan_in**0.5)
    return net.to(device)


def data(B=4, T=6, n_in=3, n_out=2, seed=1, holes=True):
    g = make_generator(seed)
    x = torch.randn(B, T, n_in, generator=g, dtype=torch.float64)
    t = torch.randn(B, T, n_out, generator=g, dtype=torch.float64)
    if holes:  # targets missing at some steps, as in the pathological tasks
        t[:, : T // 2] = math.nan
        t[0, -1, 0] = math.nan
    return x, t


def reference_errors(net, x, t, loss):
    "∂(Σ_b L_b)/∂h_t by torch.func.grad of the loss with a perturbation added to each state, written naively per step."
    B, T, _ = x.shape
    L, H = net.n_layers, net.n_hidden
    params = [p.detach() for p in net.parameters()]

    def total(eps):
        below = [x[:, s] for s in range(T)]  # fine here: a reference, not library code
        for l in range(L):
            W_hx, W_hh, b_h, h0 = params[4 * l : 4 * l + 4]
            h, out = h0.expand(B, H), []
            for s in range(T):
                h = torch.tanh(below[s] @ W_hx.T + h @ W_hh.T + b_h) + eps[l, s]
                out.append(h)
            below = out
        W_zh, b_z = params[-2:]
        z = torch.stack([h @ W_zh.T + b_z for h in below], 1)
        return matching_loss(loss).value(z, t) * B

    return torch.func.grad(total)(torch.zeros(L, T, B, H, dtype=x.dtype)).permute(2, 0, 1, 3)


def bptt_errors(net, x, t, loss):
    "The same by the hand-written recursion δ_t = W_zhᵀ ∂L/∂z_t + W_hhᵀ(s_{t+1} ⊙ δ_{t+1}) (+ the layer above)."
    B, T, _ = x.shape
    L, H = net.n_layers, net.n_hidden
    with torch.no_grad():
        z, hidden = net(x, return_hidden=True)
        hidden = hidden.view(B, T, L, H)
        dz = matching_loss(loss).grad(z, t) * B
        params = [p.detach() for p in net.parameters()]
        W_zh = params[-2]
        delta = torch.zeros(B, L, T, H, dtype=x.dtype)
        for l in range(L - 1, -1, -1):
            W_hh = params[4 * l + 1]
            slope = 1 - hidden[:, :, l].square()
            for s in range(T - 1, -1, -1):
                if l == L - 1:
                    d = dz[:, s] @ W_zh
                else:
                    W_hx_above = params[4 * (l + 1)]
                    d = (delta[:, l + 1, s] * (1 - hidden[:, s, l + 1].square())) @ W_hx_above
                if s < T - 1:
                    d = d + (delta[:, l, s + 1] * slope[:, s + 1]) @ W_hh
                delta[:, l, s] = d
    return delta


@pytest.mark.parametrize("layers", [1, 3])
@pytest.mark.parametrize(
    "loss", ["squared_error", "sigmoid_cross_entropy", "softmax_cross_entropy"]
)
def test_errors_equal_dense_references(layers, loss):
    net = rnn(layers=layers)
    x, t = data()
    if loss == "sigmoid_cross_entropy":
        t = torch.where(torch.isnan(t), t, (t > 0).double())
    if loss == "softmax_cross_entropy":
        t = torch.where(torch.isnan(t), t, torch.softmax(torch.nan_to_num(t), -1))
    probe = probe_hidden_states(net, inputs=x, targets=t, loss=loss)
    hidden = net(x, return_hidden=True)[1].detach()
    assert (
        0.05 < float(hidden.abs().mean()) < 0.9 and float(hidden.abs().max()) < 0.999
    )  # neither linear nor saturated
    expected = reference_errors(net, x, t, loss)
    assert float(expected.abs().max()) > 1e-3
    torch.testing.assert_close(probe.grads, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(probe.grads, bptt_errors(net, x, t, loss), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(probe.grad_norms, torch.linalg.vector_norm(expected, dim=-1))
    # each sequence's errors are those of its own loss: probing one sequence alone gives its row
    alone = probe_hidden_states(net, inputs=x[2:3], targets=t[2:3], loss=loss)
    torch.testing.assert_close(alone.grads[0], probe.grads[2], rtol=1e-10, atol=1e-12)
    assert probe.loss == pytest.approx(
        float(matching_loss(loss).value(net(x), t).detach()), rel=1e-12
    )


def test_errors_give_the_models_own_bias_gradients():
    "∂L/∂b_h = Σ_b Σ_t ∂L/∂h_t ⊙ (1 − h_t²), with ∂L/∂b_h from autograd through TanhRNN.forward."
    net = rnn(layers=2)
    x, t = data()
    probe = probe_hidden_states(net, inputs=x, targets=t, loss="squared_error")
    matching_loss("squared_error").value(net(x), t).backward()
    for l in range(2):
        combined = (probe.grads[:, l] * (1 - probe.hidden[:, l].square())).sum((0, 1)) / x.shape[0]
        torch.testing.assert_close(combined, net.layer(l)[2].grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("threshold", [0.3, 0.6, 0.95])
def test_saturation_is_a_direct_count(threshold):
    net = rnn(layers=2, n_hidden=7, scale=3.0)
    x, _ = data(B=5, T=8)
    probe = probe_hidden_states(net, inputs=x, threshold=threshold)
    hidden = net(x, return_hidden=True)[1].detach().view(5, 8, 2, 7)
    for l in range(2):
        for s in range(8):
            count = sum(
                abs(float(hidden[b, s, l, u])) > threshold for b in range(5) for u in range(7)
            )
            assert float(probe.saturation[l, s]) == pytest.approx(count / 35)
    assert 0 < float(probe.saturation.mean()) < 1
    torch.testing.assert_close(probe.saturation_per_layer, probe.saturation.mean(1))
    assert (
        probe.grads is None
        and probe.grad_norms is None
        and probe.loss is None
        and probe.threshold == threshold
    )


@pytest.mark.parametrize("layers", [1, 2, 4])
def test_hidden_states_of_every_layer_are_the_models(layers):
    net = rnn(layers=layers, n_hidden=4)
    x, t = data(T=9)
    probe = probe_hidden_states(net, inputs=x, targets=t, loss="squared_error")
    assert probe.hidden.shape == (4, layers, 9, 4) and probe.grads.shape == (4, layers, 9, 4)
    assert (probe.sequences, probe.n_layers, probe.steps, probe.n_hidden) == (4, layers, 9, 4)
    expected = net(x, return_hidden=True)[1].detach().view(4, 9, layers, 4).transpose(1, 2)
    assert torch.equal(probe.hidden, expected)
    assert probe.hidden.device.type == "cpu" and probe.settings["n_layers"] == layers


def test_the_probe_leaves_the_model_alone():
    net = rnn(layers=2)
    x, t = data()
    net.W_hh.grad = torch.full_like(net.W_hh, 7.0)  # a gradient already there stays as it is
    net.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    probe_hidden_states(net, inputs=x, targets=t, loss="squared_error")
    with torch.no_grad():  # inside no_grad the errors are still computed
        inside = probe_hidden_states(net, inputs=x, targets=t, loss="squared_error")
    assert inside.grads is not None and float(inside.grads.abs().max()) > 0
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(net.W_hh.grad, torch.full_like(net.W_hh, 7.0))
    assert all(p.grad is None for name, p in net.named_parameters() if name != "W_hh")
    assert not net.training and all(p.requires_grad for p in net.parameters())
    net.requires_grad_(False)  # frozen parameters: the errors do not need them
    frozen = probe_hidden_states(net, inputs=x, targets=t, loss="squared_error")
    torch.testing.assert_close(frozen.grads, inside.grads, rtol=0, atol=0)


def test_tasks_seeds_centering_and_conversion():
    task = make_task("addition", 20)
    net = TanhRNN(2, 8, 1, dtype=torch.float64)
    esn_init_(net, input_scale=0.1, output_bias=1.0, generator=make_generator(0))
    a = probe_hidden_states(net, "addition", T=20, sequences=3, seed=5)
    b = probe_hidden_states(net, task, sequences=3, seed=5)
    x, t = task.batch(3, make_generator(5), dtype=torch.float64)
    assert torch.equal(a.inputs, x)
    torch.testing.assert_close(a.targets, t, equal_nan=True)
    assert torch.equal(a.hidden, b.hidden) and torch.equal(a.grads, b.grads)
    assert (a.task, a.T, a.seed, a.sequences, a.settings["loss"]) == (
        "addition",
        20,
        5,
        3,
        "squared_error",
    )
    assert "addition, T = 20, 3 sequences, seed 5" in a.describe()
    assert probe_hidden_states(net, task).sequences == 4  # the default
    other = probe_hidden_states(net, task, sequences=3, seed=6)
    assert not torch.equal(other.inputs, a.inputs)
    sample_x, sample_t = task.batch(200, make_generator(9), dtype=torch.float64)
    centering = Centering(sample_x, sample_t)
    centred = probe_hidden_states(net, task, sequences=3, seed=5, centering=centering)
    torch.testing.assert_close(centred.inputs, centering.inputs(x))
    manual = probe_hidden_states(
        net, inputs=centering.inputs(x), targets=centering.targets(t), loss="squared_error"
    )
    torch.testing.assert_close(centred.grads, manual.grads, rtol=0, atol=0)
    # float32 inputs are converted to the model's dtype; `sequences` takes the first cases of given inputs
    given = probe_hidden_states(net, inputs=x.float(), sequences=2)
    assert (
        given.inputs.dtype == torch.float64
        and given.sequences == 2
        and given.task is None
        and given.seed is None
    )
    float_net = TanhRNN(2, 8, 1, dtype=torch.float32, generator=make_generator(0))
    assert probe_hidden_states(float_net, task, sequences=2).hidden.dtype == torch.float32


def test_bad_input_is_a_clear_error():
    net = rnn()
    x, t = data()
    cases = [
        (dict(inputs=x, threshold=1.0), ValueError, "threshold: must be in (0.0, 1.0)"),
        (dict(inputs=x, threshold=0.0), ValueError, "threshold"),
        (dict(inputs=x, threshold=-0.5), ValueError, "threshold"),
        (dict(inputs=x[:0]), ValueError, "inputs: no sequences"),
        (dict(inputs=x[..., :2]), ValueError, "inputs: expected shape (cases, steps, 3)"),
        (dict(inputs=x[0]), ValueError, "inputs: expected shape"),
        (dict(inputs=x[:, :0]), ValueError, "inputs: expected shape"),
        (dict(inputs=x.long()), TypeError, "inputs: expected a floating-point tensor"),
        (dict(inputs=x, sequences=0), ValueError, "sequences"),
        (dict(inputs=x, sequences=5), ValueError, "sequences: 5 is more than the 4 cases"),
        (dict(inputs=x, targets=t), ValueError, "loss: targets given without a task"),
        (
            dict(inputs=x, targets=t[..., :1], loss="squared_error"),
            ValueError,
            "targets: expected shape (4, 6, 2)",
        ),
        (dict(), ValueError, "give exactly one of"),
        (dict(task="addition", inputs=x), ValueError, "give exactly one of"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error) as info:
            probe_hidden_states(net, **kwargs)
        assert message in str(info.value), (kwargs.keys(), str(info.value))
    add = TanhRNN(2, 4, 1)
    with pytest.raises(ValueError, match="T: a task given by name"):
        probe_hidden_states(add, "addition")
    with pytest.raises(ValueError, match="T: 30 contradicts"):
        probe_hidden_states(add, make_task("addition", 20), T=30)
    with pytest.raises(ValueError, match="is not one of"):
        probe_hidden_states(add, "no such task", T=20)
    with pytest.raises(ValueError, match="model: .* has 8 inputs"):
        probe_hidden_states(add, make_task("temporal_order", 20))
    with pytest.raises(TypeError, match="task: expected"):
        probe_hidden_states(add, 3)
    with pytest.raises(TypeError, match="model: expected a qnwb.models.TanhRNN"):
        probe_hidden_states(torch.nn.Linear(2, 2), inputs=x)


def test_compare_two_settings_on_the_same_sequences():
    task = make_task("addition", 15)
    net = TanhRNN(2, 6, 1, dtype=torch.float64)
    esn_init_(net, input_scale=0.1, generator=make_generator(0))
    other = TanhRNN(2, 6, 1, dtype=torch.float64)
    esn_init_(other, input_scale=0.1, spectral_radius=3.0, generator=make_generator(1))
    kept = {k: v.clone() for k, v in net.state_dict().items()}
    first, second = compare_hidden_states(
        net, None, other.state_dict(), task, sequences=3, seed=2, labels=("a", "b")
    )
    for k, v in net.state_dict().items():
        assert torch.equal(v, kept[k])
    assert (first.label, second.label) == ("a", "b") and torch.equal(first.inputs, second.inputs)
    assert torch.equal(first.hidden, probe_hidden_states(net, task, sequences=3, seed=2).hidden)
    assert torch.equal(second.grads, probe_hidden_states(other, task, sequences=3, seed=2).grads)
    as_model = compare_hidden_states(net, other, None, task, sequences=3, seed=2)
    assert torch.equal(as_model[0].hidden, second.hidden) and torch.equal(
        as_model[1].hidden, first.hidden
    )
    # a bad setting is an error, and the model is still restored
    broken = {k: v.clone() for k, v in other.state_dict().items()}
    broken.pop("b_z")
    with pytest.raises(RuntimeError, match="b_z"):
        compare_hidden_states(net, other.state_dict(), broken, task)
    for k, v in net.state_dict().items():
        assert torch.equal(v, kept[k])
    with pytest.raises(ValueError, match="second: a TanhRNN"):
        compare_hidden_states(net, None, TanhRNN(2, 7, 1, dtype=torch.float64), task)
    with pytest.raises(TypeError, match="first: expected a state dict"):
        compare_hidden_states(net, 3, None, task)
    with pytest.raises(ValueError, match="labels"):
        compare_hidden_states(net, None, None, task, labels=("x",))


def test_heatmap_figure_draws_each_sequence_and_layer():
    net = rnn(layers=2)
    x, t = data(B=5)
    probe = probe_hidden_states(net, inputs=x, targets=t, loss="squared_error", label="probe")
    figure = hidden_heatmap_figure(probe)
    names = [trace.name for trace in figure.data]
    assert names == [f"sequence {s}, layer {l}" for l in range(2) for s in range(3)]
    for trace in figure.data:
        s, l = int(trace.name.split()[1][:-1]), int(trace.name.split()[-1])
        assert torch.equal(
            torch.tensor(trace.z, dtype=torch.float64), probe.hidden[s, l]
        )  # time down, units across
        assert trace.visible == (l == 0) and "step %{y}" in trace.hovertemplate
    buttons = figure.layout.updatemenus[0].buttons
    assert [b.label for b in buttons] == ["layer 0", "layer 1"]
    assert list(buttons[1].args[0]["visible"]) == [False] * 3 + [True] * 3
    assert (
        figure.layout.yaxis.title.text == "time step" and figure.layout.xaxis.title.text == "unit"
    )
    assert "probe" in figure.layout.title.text
    chosen = hidden_heatmap_figure(probe, sequences=[4, 1], layers=[1])
    assert [t.name for t in chosen.data] == [
        "sequence 4, layer 1",
        "sequence 1, layer 1",
    ] and not chosen.layout.updatemenus
    for bad in ([5], [], [-1]):
        with pytest.raises(ValueError, match="sequences: need indices in"):
            hidden_heatmap_figure(probe, sequences=bad)
    with pytest.raises(ValueError, match="layer: must be an int in"):
        hidden_heatmap_figure(probe, layers=[2])


def test_saturation_and_error_norm_figures():
    net = rnn(layers=2, scale=3.0)
    x, t = data()
    a = probe_hidden_states(net, inputs=x, targets=t, loss="squared_error", label="a")
    b = probe_hidden_states(
        net, inputs=x, targets=t, loss="squared_error", label="b", threshold=0.5
    )
    figure = saturation_figure(a, b)
    assert [tr.name for tr in figure.data] == [
        "a, layer 0",
        "a, layer 1",
        "b, layer 0",
        "b, layer 1",
    ]
    for tr, (p, l) in zip(figure.data, [(a, 0), (a, 1), (b, 0), (b, 1)]):
        assert tr.y == tuple(p.saturation[l].tolist())
    assert "0.5, 0.95" in figure.layout.title.text and figure.layout.xaxis.title.text == "time step"
    norms = gradient_norm_figure(a, per_sequence=True)
    assert figure.layout.yaxis.range == (0, 1) and norms.layout.yaxis.type == "log"
    assert len(norms.data) == 2 * (1 + 4)
    mean0, seq3 = norms.data[0], norms.data[4]
    assert mean0.name == "a, layer 0" and seq3.name == "a, layer 0, sequence 3"
    torch.testing.assert_close(
        torch.tensor(mean0.y, dtype=torch.float64), a.grad_norms[:, 0].mean(0)
    )
    torch.testing.assert_close(torch.tensor(seq3.y, dtype=torch.float64), a.grad_norms[3, 0])
    torch.testing.assert_close(
        torch.tensor(mean0.customdata, dtype=torch.float64)[:, 1], a.grad_norms[:, 0].amax(0)
    )
    assert len(gradient_norm_figure(a, b).data) == 4
    single = probe_hidden_states(rnn(), inputs=x, targets=t, loss="squared_error")
    assert [tr.name for tr in saturation_figure(single).data] == ["layer 0"]
    with pytest.raises(ValueError, match="no targets"):
        gradient_norm_figure(probe_hidden_states(net, inputs=x))
    for builder in (saturation_figure, gradient_norm_figure):
        with pytest.raises(ValueError, match="at least one"):
            builder()


def test_comparison_figure():
    task = make_task("addition", 12)
    net = TanhRNN(2, 6, 1, dtype=torch.float64)
    esn_init_(net, input_scale=0.1, generator=make_generator(0))
    other = TanhRNN(2, 6, 1, dtype=torch.float64)
    esn_init_(other, input_scale=0.1, spectral_radius=2.0, generator=make_generator(1))
    first, second = compare_hidden_states(
        net, None, other, task, sequences=3, labels=("init", "later")
    )
    figure = comparison_figure(first, second, sequence=2)
    names = [tr.name for tr in figure.data]
    assert names == [
        "init",
        "later",
        "later − init",
        "saturated: init",
        "‖∂L/∂h‖: init",
        "saturated: later",
        "‖∂L/∂h‖: later",
    ]
    torch.testing.assert_close(
        torch.tensor(figure.data[0].z, dtype=torch.float64), first.hidden[2, 0]
    )
    torch.testing.assert_close(
        torch.tensor(figure.data[2].z, dtype=torch.float64),
        second.hidden[2, 0] - first.hidden[2, 0],
    )
    torch.testing.assert_close(
        torch.tensor(figure.data[6].y, dtype=torch.float64), second.grad_norms[:, 0].mean(0)
    )
    assert (
        figure.data[5].y == tuple(second.saturation[0].tolist())
        and figure.data[5].line.dash == "dash"
    )
    assert figure.layout.yaxis5.type == "log" and "sequence 2, layer 0" in figure.layout.title.text
    no_targets = compare_hidden_states(net, None, other, inputs=first.inputs)
    assert len(comparison_figure(*no_targets).data) == 5
    with pytest.raises(ValueError, match="same sequences"):
        comparison_figure(first, probe_hidden_states(net, task, sequences=3, seed=1))
    with pytest.raises(ValueError, match="layer"):
        comparison_figure(first, second, layer=1)
    with pytest.raises(ValueError, match="sequences"):
        comparison_figure(first, second, sequence=3)


def test_on_every_device(device):
    net = rnn(layers=2, device=device)
    x, t = data()
    probe = probe_hidden_states(
        net, inputs=x.to(device), targets=t.to(device), loss="squared_error"
    )
    assert probe.hidden.device.type == "cpu" and probe.settings["device"].startswith(device.type)
    torch.testing.assert_close(
        probe.grads, reference_errors(rnn(layers=2), x, t, "squared_error"), rtol=1e-9, atol=1e-11
    )
