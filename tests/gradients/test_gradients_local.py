"""LocalGuess: block split, local-loss gradients vs plain autograd, heads, FLOP ratio."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from ridgeline.errors import ConfigError, UnsupportedOperationError
from ridgeline.gradients import LocalGuess, forward_gradient
from ridgeline.gradients.local import count_macs, sequential_atoms
from ridgeline.models import mlp, resnet

# heads of tiny test networks exceed the 10 % budget on purpose (tested separately)
pytestmark = pytest.mark.filterwarnings("ignore:the auxiliary heads cost")


@pytest.fixture
def data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 12, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (40,), generator=gen)
    return x, y


@pytest.fixture
def net():
    torch.manual_seed(0)
    return mlp(12, [9, 8], 4).double()  # Flatten, L(1), ReLU, L(3), ReLU, L(5)


def test_mlp_splits_into_one_block_per_linear_layer(net):
    guess = LocalGuess(net)
    assert guess.block_names() == [["0", "1", "2"], ["3", "4"], ["5"]]
    assert guess.block_params() == [["1.weight", "1.bias"], ["3.weight", "3.bias"],
                                    ["5.weight", "5.bias"]]
    assert LocalGuess(net, blocks=2).block_names() == [["0", "1", "2", "3", "4"], ["5"]]
    assert LocalGuess(net, blocks=[1, 2]).block_names() == [["0", "1", "2"], ["3", "4", "5"]]


def test_local_guesses_equal_block_local_autograd_gradients(net, data):
    """u_b = ∇_{θ_b} CE(head_b(block_b(z_{b-1})), y) with z_{b-1} fixed; last block: global loss."""
    x, y = data
    guess = LocalGuess(net, train_heads=False)
    fg = forward_gradient(net, (x, y), guess=guess)
    heads = guess.heads
    with torch.no_grad():
        z1_in = net[0](x)
    z1 = net[2](net[1](z1_in))
    local1 = F.cross_entropy(heads[0](z1), y)
    g1 = torch.autograd.grad(local1, [net[1].weight, net[1].bias])
    z2 = net[4](net[3](z1.detach()))
    local2 = F.cross_entropy(heads[1](z2), y)
    g2 = torch.autograd.grad(local2, [net[3].weight, net[3].bias])
    g3 = torch.autograd.grad(F.cross_entropy(net(x), y), [net[5].weight, net[5].bias])
    expected = dict(zip(["1.weight", "1.bias", "3.weight", "3.bias", "5.weight", "5.bias"],
                        [*g1, *g2, *g3]))
    for name, value in expected.items():
        torch.testing.assert_close(fg.guesses[name][0], value, rtol=1e-10, atol=1e-12)
    assert fg.directional_derivatives.shape == (3, 1)


def test_local_estimate_projects_each_block_gradient_on_its_guess(net, data):
    x, y = data
    fg = forward_gradient(net, (x, y), guess=LocalGuess(net, train_heads=False))
    params = dict(net.named_parameters())
    grads = dict(zip(params, torch.autograd.grad(F.cross_entropy(net(x), y), list(params.values()))))
    blocks = [["1.weight", "1.bias"], ["3.weight", "3.bias"], ["5.weight", "5.bias"]]
    for b, block in enumerate(blocks):
        g = torch.cat([grads[n].reshape(-1) for n in block])
        u = torch.cat([fg.guesses[n][0].reshape(-1) for n in block])
        assert float(fg.directional_derivatives[b, 0]) == pytest.approx(float(g @ u), rel=1e-9)
        expected = (g @ u) / (u @ u) * u
        got = torch.cat([fg.estimate[n].reshape(-1) for n in block])
        torch.testing.assert_close(got, expected.detach(), rtol=1e-9, atol=1e-12)
    # the last block's guess is its exact gradient, so its estimate is exact
    torch.testing.assert_close(fg.estimate["5.weight"], grads["5.weight"], rtol=1e-9, atol=1e-12)


def test_head_flop_ratio_is_counted_and_small():
    torch.manual_seed(0)
    net = mlp(40, [256, 256], 10)
    guess = LocalGuess(net).build(torch.zeros(2, 40))
    model_macs = 40 * 256 + 256 * 256 + 256 * 10
    assert guess.flops["model_macs"] == model_macs
    assert guess.flops["head_macs"] == 2 * 256 * 10
    assert guess.flops["ratio"] == pytest.approx(5120 / model_macs)
    assert guess.flops["ratio"] < 0.10
    wide = LocalGuess(net, head="mlp").build(torch.zeros(2, 40))
    w = wide.head_width
    assert 1 <= w <= 64
    assert wide.flops["head_macs"] == 2 * (256 * w + w * 10)
    assert wide.flops["ratio"] <= 0.10


def test_count_macs_of_a_conv_matches_the_formula():
    conv = nn.Conv1d(3, 5, 3, padding=1)
    assert count_macs(conv, torch.zeros(2, 3, 20)) == 5 * 20 * 3 * 3


def test_heads_over_budget_warn():
    torch.manual_seed(0)
    net = mlp(4, [3], 10)  # heads as large as the net itself
    with pytest.warns(UserWarning, match="budget"):
        LocalGuess(net, head="mlp", head_width=16).build(torch.zeros(1, 4))


def test_resnet_is_split_into_stages_with_pooled_heads():
    torch.manual_seed(0)
    net = resnet(widths=(8, 16), norm="layer").double()
    names = [n for n, _ in sequential_atoms(net)]
    assert names[:2] == ["add_channel", "stem.0"] and names[-1] == "head"
    guess = LocalGuess(net, train_heads=False)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(12, 40, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (12,), generator=gen)
    fg = forward_gradient(net, (x, y), guess=guess)
    assert guess.num_blocks == 5  # stem, block, downsample conv, block, linear head
    assert guess.flops["ratio"] < 0.10
    covered = sorted(n for block in guess.block_params() for n in block)
    assert covered == sorted(n for n, _ in net.named_parameters())
    assert all(torch.isfinite(t).all() for t in fg.estimate.values())
    params = dict(net.named_parameters())
    grads = dict(zip(params, torch.autograd.grad(F.cross_entropy(net(x), y), list(params.values()))))
    torch.testing.assert_close(fg.estimate["head.weight"], grads["head.weight"], rtol=1e-8, atol=1e-10)


def test_fit_trains_the_heads_and_raises_local_alignment(data):
    x, y = data
    torch.manual_seed(1)
    net = mlp(12, [16, 16], 4).double()
    guess = LocalGuess(net, lr=1e-2, seed=0)
    guess.fit((x, y), epochs=0)
    _, _, before = guess.local_gradients(dict(net.named_parameters()), x, y, guesses=False)
    guess.fit((x, y), epochs=30, batch_size=20)
    _, _, after = guess.local_gradients(dict(net.named_parameters()), x, y, guesses=False)
    assert bool((after < before).all()), (before, after)


def test_heads_are_trained_alongside_estimates(net, data):
    x, y = data
    guess = LocalGuess(net, lr=1e-2)
    forward_gradient(net, (x, y), guess=guess)
    first = [p.detach().clone() for p in guess.heads.parameters()]
    forward_gradient(net, (x, y), guess=guess)
    assert any(not torch.equal(a, b) for a, b in zip(first, guess.heads.parameters()))
    frozen = LocalGuess(net, train_heads=False)
    forward_gradient(net, (x, y), guess=frozen)
    kept = [p.detach().clone() for p in frozen.heads.parameters()]
    forward_gradient(net, (x, y), guess=frozen)
    assert all(torch.equal(a, b) for a, b in zip(kept, frozen.heads.parameters()))


def test_local_guess_errors(net, data):
    with pytest.raises(ConfigError, match="num_guesses must be 1"):
        forward_gradient(net, data, guess=LocalGuess(net), num_guesses=2)
    with pytest.raises(ConfigError, match="at most 3 blocks"):
        LocalGuess(net, blocks=4)
    with pytest.raises(ConfigError, match="summing to 3"):
        LocalGuess(net, blocks=[1, 1])
    with pytest.raises(ConfigError, match="head"):
        LocalGuess(net, head="transformer")

    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(12, 4)

        def forward(self, x):
            return self.a(x)

    with pytest.raises(UnsupportedOperationError, match="nn.Sequential"):
        LocalGuess(Custom())
