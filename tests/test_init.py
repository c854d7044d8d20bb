"""qnwb.init: the initialisations' defining properties, and centring."""

import pytest
import torch

from qnwb.core import make_generator
from qnwb.init import Centering, dense_init_, esn_init_, sparse_init_
from qnwb.models import MLP, TanhRNN
from qnwb.tasks import Addition, Multiplication


@pytest.mark.parametrize("hidden, radius", [(100, 1.1), (40, 0.9), (15, 1.1)])
def test_esn_init_has_the_spectral_radius_and_fan_in_of_table_4(hidden, radius):
    rnn = esn_init_(
        TanhRNN(2, hidden, 1, dtype=torch.float64),
        spectral_radius=radius,
        generator=make_generator(hidden),
    )
    eigenvalues = torch.linalg.eigvals(rnn.W_hh)
    assert abs(eigenvalues.abs().max().item() - radius) < 1e-6
    assert ((rnn.W_hh != 0).sum(1) == 15).all()  # 15 incoming recurrent weights per unit
    assert (rnn.b_h == 0).all() and (rnn.h0 == 0).all()


def test_esn_init_scales_and_output_bias():
    rnn = esn_init_(
        TanhRNN(3, 200, 50, dtype=torch.float64),
        input_scale=0.1,
        output_scale=0.1,
        output_bias=0.75,
        generator=make_generator(0),
    )
    assert abs(rnn.W_hx.std().item() - 0.1) < 0.01 and abs(rnn.W_zh.std().item() - 0.1) < 0.005
    assert (rnn.b_z == 0.75).all()
    small = esn_init_(TanhRNN(2, 200, 1, dtype=torch.float64), generator=make_generator(1))
    assert (
        abs(small.W_hx.std().item() - 0.001) < 0.0002
    )  # Table 4's default for addition and multiplication


def test_esn_init_is_seeded_and_float32_models_keep_the_radius():
    a = esn_init_(TanhRNN(2, 60, 1), generator=make_generator(3))
    b = esn_init_(TanhRNN(2, 60, 1), generator=make_generator(3))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert abs(torch.linalg.eigvals(a.W_hh.double()).abs().max().item() - 1.1) < 1e-5


def test_sparse_init_connects_each_unit_to_15_inputs():
    net = sparse_init_(
        MLP([784, 400, 200, 100, 50, 25, 6], dtype=torch.float64), generator=make_generator(0)
    )
    linears = [m for m in net if isinstance(m, torch.nn.Linear)]
    for layer in linears:
        assert ((layer.weight != 0).sum(1) == 15).all() and (layer.bias == 0).all()
    nonzero = torch.cat([layer.weight[layer.weight != 0] for layer in linears])
    assert abs(nonzero.std().item() - 1.0) < 0.05  # unit Gaussian
    tanh = sparse_init_(
        MLP([30, 20], dtype=torch.float64), units="tanh", scale=2.0, generator=make_generator(0)
    )
    reference = sparse_init_(MLP([30, 20], dtype=torch.float64), generator=make_generator(0))
    torch.testing.assert_close(
        tanh[0].weight, 0.25 * 2.0 * reference[0].weight
    )  # ×0.25 for tanh, × the scale
    assert (tanh[0].bias == 0.5).all()
    few = sparse_init_(MLP([6, 4], dtype=torch.float64), generator=make_generator(0))
    assert ((few[0].weight != 0).sum(1) == 6).all()  # fewer than 15 inputs: all of them


def test_dense_init_draws_matrices_and_zeroes_vectors():
    rnn = dense_init_(
        TanhRNN(10, 300, 10, dtype=torch.float64), std=0.01, generator=make_generator(0)
    )
    assert abs(rnn.W_hh.std().item() - 0.01) < 0.0005
    assert all((p == 0).all() for p in (rnn.b_h, rnn.h0, rnn.b_z))


def test_dense_init_takes_the_scale_as_a_std_or_a_variance_and_defaults_to_adaqns_variance_reading():
    def weights(**scale):
        return dense_init_(
            TanhRNN(10, 300, 10, dtype=torch.float64), generator=make_generator(0), **scale
        ).W_hh

    # the same draw scaled by the same number, whichever name the scale comes under
    assert torch.equal(weights(variance=0.01), weights(std=0.1))
    assert torch.equal(weights(), weights(variance=0.01))  # "N(0, 0.01)" read as a variance
    torch.testing.assert_close(weights(std=0.01), weights(std=0.1) / 10, rtol=1e-14, atol=0)
    with pytest.raises(ValueError, match="not both"):
        weights(std=0.1, variance=0.01)
    with pytest.raises(ValueError, match="variance"):
        weights(variance=-0.01)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="spectral_radius"):
        esn_init_(TanhRNN(2, 20, 1), spectral_radius=0)
    with pytest.raises(ValueError, match="fan_in"):
        sparse_init_(MLP([4, 2]), fan_in=0)
    with pytest.raises(ValueError, match="units"):
        sparse_init_(MLP([4, 2]), units="relu")
    with pytest.raises(TypeError, match="needs a TanhRNN"):
        esn_init_(MLP([4, 2]))
    with pytest.raises(ValueError, match="std"):
        dense_init_(MLP([4, 2]), std=-1.0)


@pytest.mark.parametrize("task", [Addition(40), Multiplication(40)])
def test_centring_gives_zero_mean_inputs_and_targets(task):
    x, y = task.batch(512, make_generator(0), dtype=torch.float64)
    centring = Centering(x, y)
    xc, yc = centring.inputs(x), centring.targets(y)
    torch.testing.assert_close(
        xc.mean((0, 1)), torch.zeros(2, dtype=torch.float64), atol=1e-12, rtol=0
    )
    torch.testing.assert_close(
        torch.nanmean(yc[:, -1]), torch.tensor(0.0, dtype=torch.float64), atol=1e-12, rtol=0
    )
    assert torch.isnan(yc[:, :-1]).all()  # no target stays no target
    torch.testing.assert_close(centring.restore(yc)[:, -1], y[:, -1])
    x2, _ = task.batch(512, make_generator(1), dtype=torch.float64)
    assert centring.inputs(x2).mean().abs() < 0.05  # the means carry over to new batches
