"""ridgeline.models.transformer: built from its arguments, every instrument through SDPA."""

from __future__ import annotations

import pytest
import torch

from ridgeline import Objective
from ridgeline.curvature import ggn, top_eigenvalues
from ridgeline.errors import ConfigError, ShapeMismatchError
from ridgeline.gradients import forward_gradient
from ridgeline.kernels import empirical_ntk
from ridgeline.models import PatchTransformer, build_model, transformer
from ridgeline.outputs import ATTENTION_NOTE


def tiny(seed=0, **kwargs):
    torch.manual_seed(seed)
    options = {"patch": 4, "width": 8, "depth": 1, "heads": 2, **kwargs}
    return transformer(12, 3, **options).double().eval()


def data(n=6, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 12, generator=gen, dtype=torch.float64),
            torch.randint(0, 3, (n,), generator=gen))


def test_transformer_is_rebuilt_from_its_recorded_arguments():
    model = transformer(40, 10)
    assert isinstance(model, PatchTransformer)
    arch = model.ridgeline_architecture
    assert arch["factory"] == "transformer"
    assert arch["kwargs"] == {"in_features": 40, "out_features": 10, "patch": 4, "width": 64,
                              "depth": 2, "heads": 4, "mlp_ratio": 2, "norm": "layer",
                              "pool": "mean", "kv_heads": None}
    rebuilt = build_model(arch["factory"], **arch["kwargs"])
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(3, 40)
    torch.testing.assert_close(rebuilt.eval()(x), model.eval()(x))
    block = model.blocks[0]
    assert [type(getattr(block.attn, n)).__name__ for n in "q k v out".split()] == ["Linear"] * 4
    assert model(torch.randn(2, 1, 40)).shape == (2, 10)  # (N, 1, L) signals are flattened


def test_cls_pooling_and_no_norm_variants_run():
    for options in ({"pool": "cls"}, {"norm": "none"}):
        assert tiny(**options)(data()[0]).shape == (6, 3)


def test_bad_arguments_are_refused_with_what_fits():
    with pytest.raises(ConfigError,
                       match=r"patch=3 does not divide in_features=40.*\[1, 2, 4, 5, 8\]"):
        transformer(40, 10, patch=3)
    with pytest.raises(ConfigError, match="width=30 is not divisible by heads=4"):
        transformer(40, 10, width=30)
    with pytest.raises(ConfigError, match="pool must be 'mean' or 'cls'"):
        transformer(40, 10, pool="max")
    with pytest.raises(ShapeMismatchError, match="reads 12 features per example but got 16"):
        Objective(tiny(), (torch.randn(4, 16, dtype=torch.float64),
                           torch.zeros(4, dtype=torch.long)))


def test_top_eigenvalue_equals_dense_autograd_hessian_through_sdpa():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = tiny()
    x, y = data()
    spectrum = top_eigenvalues(model, (x, y), k=2, tol=1e-9)
    assert ATTENTION_NOTE in spectrum.notes
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss_of(flat):
        params, offset = {}, 0
        for name, shape in zip(names, shapes):
            params[name] = flat[offset:offset + shape.numel()].reshape(shape)
            offset += shape.numel()
        out = torch.func.functional_call(model, params, (x,))
        return torch.nn.functional.cross_entropy(out, y)

    with sdpa_kernel([SDPBackend.MATH]):  # the truth needs a double backward too
        dense = torch.autograd.functional.hessian(loss_of, flat0, vectorize=True)
    truth = torch.linalg.eigvalsh((dense + dense.T) / 2).flip(0)[:2]
    torch.testing.assert_close(spectrum.values, truth, rtol=1e-7, atol=1e-10)


def test_forward_mode_instruments_agree_with_reverse_mode_through_sdpa():
    model = tiny()
    x, y = data()
    torch.testing.assert_close(empirical_ntk(model, x, method="ntk_vp"),
                               empirical_ntk(model, x, method="jacobian"), rtol=1e-10, atol=1e-10)
    objective = Objective(model, (x, y))
    operator = ggn(objective)
    assert ATTENTION_NOTE in operator.notes
    v = torch.randn(operator.shape[0], dtype=torch.float64)
    assert float(v @ operator.matvec(v)) >= 0  # PSD
    estimate = forward_gradient(objective, num_guesses=4, seed=0)
    gradient = torch.cat([g.reshape(-1) for g in objective.grad().values()])
    guesses = torch.cat([u.reshape(4, -1) for u in estimate.guesses.values()], dim=1)
    torch.testing.assert_close(estimate.directional_derivatives[0], guesses @ gradient,
                               rtol=1e-10, atol=1e-12)
    assert ATTENTION_NOTE in estimate.notes
