"""Every instrument on Hugging Face models as they come (GPT-2, BERT, ViT from tiny configs).

Truths are built independently of ridgeline: a hand-written token cross-entropy, Hessian-
vector products by plain double backward on an *eager-attention* copy of the model (no
torch.func, no SDPA), Jacobians row by row with torch.autograd.grad, gradients by
backward().
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

from ridgeline import Objective  # noqa: E402
from ridgeline.connectivity import interpolate  # noqa: E402
from ridgeline.curvature import top_eigenvalues  # noqa: E402
from ridgeline.errors import ShapeMismatchError  # noqa: E402
from ridgeline.gradients import forward_gradient  # noqa: E402
from ridgeline.kernels import empirical_ntk, plan_ntk  # noqa: E402
from ridgeline.outputs import ATTENTION_NOTE  # noqa: E402

VOCAB, CLASSES = 50, 3


def build(family: str, attention: str = "sdpa", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if family == "gpt2":
        config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=2,
                                         n_head=2, bos_token_id=0, eos_token_id=0,
                                         attn_implementation=attention)
        model = transformers.GPT2LMHeadModel(config)
    elif family == "bert":
        config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, intermediate_size=64,
                                         max_position_embeddings=16, num_labels=CLASSES,
                                         attn_implementation=attention)
        model = transformers.BertForSequenceClassification(config)
    else:
        config = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=32,
                                        num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=64, num_labels=CLASSES,
                                        attn_implementation=attention)
        model = transformers.ViTForImageClassification(config)
    return model.double().eval()


def eager_copy(model: torch.nn.Module, family: str) -> torch.nn.Module:
    twin = build(family, "eager")
    twin.load_state_dict(model.state_dict())
    return twin


def data(family: str, n: int = 4, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    if family == "gpt2":
        tokens = torch.randint(0, VOCAB, (n, 7), generator=gen)
        return tokens[:, :-1], tokens[:, 1:].clone()
    if family == "bert":
        return torch.randint(0, VOCAB, (n, 6), generator=gen), torch.randint(0, CLASSES, (n,),
                                                                            generator=gen)
    return (torch.randn(n, 1, 8, 8, generator=gen, dtype=torch.float64),
            torch.randint(0, CLASSES, (n,), generator=gen))


def hand_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """−log softmax(logits)_y averaged over the targets that are not −100, by hand."""
    logits = model(x).logits
    logp = logits - logits.logsumexp(dim=-1, keepdim=True)
    keep = y != -100
    picked = logp.gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return -(picked * keep).sum() / keep.sum()


FAMILIES = ["gpt2", "bert", "vit"]


# ----------------------------------------------------------------------------- loss
@pytest.mark.parametrize("family", FAMILIES)
def test_loss_equals_hand_written_token_cross_entropy(family):
    model = build(family)
    x, y = data(family, n=7)
    if family == "gpt2":  # ignored positions and uneven batches: the mean is over tokens
        y[0, :4] = -100
        y[3, 2] = -100
    with torch.no_grad():
        truth = hand_loss(model, x, y)
    for batch_size in (None, 3):
        objective = Objective(model, (x, y), batch_size=batch_size)
        assert float(objective.loss()) == pytest.approx(float(truth), rel=1e-12)
    loss, accuracy = Objective(model, (x, y), batch_size=2).loss_and_accuracy()
    logits = model(x).logits
    keep = y != -100
    hand_accuracy = float(((logits.argmax(-1) == y) & keep).sum()) / float(keep.sum())
    assert accuracy == pytest.approx(hand_accuracy, rel=1e-12)


def test_token_targets_of_the_wrong_shape_are_refused_naming_both_shapes():
    model = build("gpt2")
    x, y = data("gpt2")
    with pytest.raises(ShapeMismatchError, match=r"\(4, 6, 50\).*\(4, 5\).*\(4, 6\)"):
        Objective(model, (x, y[:, :-1]))
    with pytest.raises(ShapeMismatchError, match="token targets"):
        Objective(model, (x, y[:, 0]))


# ----------------------------------------------------------------------------- curvature
def explicit_hvp(model, x, y):
    """H v by double backward through the eager model (torch.autograd, no torch.func)."""
    params = [p for p in model.parameters() if p.requires_grad]
    loss = hand_loss(model, x, y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    flat = torch.cat([g.reshape(-1) for g in grads])

    def hvp(v):
        v = torch.as_tensor(np.asarray(v).reshape(-1), dtype=flat.dtype)
        out = torch.autograd.grad(flat, params, v, retain_graph=True)
        return torch.cat([o.reshape(-1) for o in out]).numpy()

    return hvp, flat.numel()


@pytest.mark.parametrize("family", FAMILIES)
def test_top_eigenvalue_matches_scipy_eigsh_on_explicit_hvps(family):
    from scipy.sparse.linalg import LinearOperator, eigsh

    model = build(family)  # attn_implementation="sdpa": F.scaled_dot_product_attention
    x, y = data(family, n=3)
    spectrum = top_eigenvalues(model, (x, y), k=1, tol=1e-8)
    assert ATTENTION_NOTE in spectrum.notes
    hvp, size = explicit_hvp(eager_copy(model, family), x, y)
    truth = eigsh(LinearOperator((size, size), matvec=hvp, dtype=np.float64), k=1, which="LA",
                  tol=1e-10, return_eigenvectors=False)[0]
    assert float(spectrum.values[0]) == pytest.approx(truth, rel=1e-6)


# ----------------------------------------------------------------------------- NTK
def explicit_jacobian(model, x):
    """(N·O, P) Jacobian of the flattened logits, one torch.autograd.grad per row."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(x.shape[0]):
        out = model(x[i:i + 1]).logits.reshape(-1)
        for o in range(out.numel()):
            grads = torch.autograd.grad(out[o], params, retain_graph=True, allow_unused=True)
            rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                                   for p, g in zip(params, grads)]))
    return torch.stack(rows).reshape(x.shape[0], -1, rows[0].numel())


@pytest.mark.parametrize("family", FAMILIES)
def test_empirical_ntk_equals_explicit_jacobian_contraction(family):
    model = build(family)
    x, _ = data(family, n=3)
    if family == "gpt2":
        x = x[:, :2]  # O = T·V outputs per sequence: keep the explicit Jacobian small
    jac = explicit_jacobian(eager_copy(model, family), x)  # (N, O, P)
    truth = torch.einsum("iop,jop->ij", jac, jac)
    for method in ("jacobian", "ntk_vp"):
        kernel = empirical_ntk(model, x, method=method)
        torch.testing.assert_close(kernel, truth, rtol=1e-8, atol=1e-8 * float(truth.abs().max()))
    assert ATTENTION_NOTE in plan_ntk(model, x, method="jacobian").notes


# ----------------------------------------------------------------------------- forward gradient
@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_forward_gradient_mean_of_many_guesses_is_the_backprop_gradient(family):
    model = build(family)
    x, y = data(family, n=3)
    twin = eager_copy(model, family)
    hand_loss(twin, x, y).backward()
    truth = torch.cat([p.grad.reshape(-1) for p in twin.parameters()])
    guesses = 1000
    estimate = forward_gradient(model, (x, y), num_guesses=guesses, seed=0, chunk_size=250)
    assert ATTENTION_NOTE in estimate.notes
    g = estimate.flat()
    # ĝ = (1/K) Σ_k (∇L·v_k) v_k with v ~ N(0, I): along a fixed unit w, w·ĝ has mean w·∇L
    # and variance (‖∇L‖² + (w·∇L)²)/K. Check three directions at 5σ.
    gen = torch.Generator().manual_seed(7)
    directions = [truth / truth.norm()] + [torch.randn(truth.numel(), generator=gen,
                                                       dtype=truth.dtype) for _ in range(2)]
    for w in directions:
        w = w / w.norm()
        sigma = math.sqrt((truth.norm() ** 2 + (w @ truth) ** 2) / guesses)
        assert abs(float(w @ g - w @ truth)) < 5 * sigma


# ----------------------------------------------------------------------------- paths
@pytest.mark.parametrize("family", ["gpt2", "vit"])
def test_path_between_two_models_has_exact_endpoints(family):
    model_a, model_b = build(family, seed=0), build(family, seed=1)
    x, y = data(family, n=5)
    path = interpolate(model_a, model_b, (x, y), points=3)
    assert path.losses[0] == pytest.approx(float(hand_loss(model_a, x, y).detach()), rel=1e-12)
    assert path.losses[-1] == pytest.approx(float(hand_loss(model_b, x, y).detach()), rel=1e-12)
    mid = build(family, "eager")
    mid.load_state_dict({k: (model_a.state_dict()[k] + v) / 2 if v.is_floating_point() else v
                         for k, v in model_b.state_dict().items()})
    assert path.losses[1] == pytest.approx(float(hand_loss(mid, x, y).detach()), rel=1e-10)


@pytest.mark.parametrize("family", FAMILIES)
def test_sdpa_and_eager_attention_give_the_same_hessian_products(family):
    """attn_implementation="sdpa" (MATH backend switched on, noted) and "eager" (plain
    matmul-softmax, nothing to switch, no note) are the same function: same H v."""
    from ridgeline.curvature import hessian

    model = build(family)
    twin = eager_copy(model, family)
    x, y = data(family, n=3)
    sdpa_op, eager_op = hessian(model, (x, y)), hessian(twin, (x, y))
    assert ATTENTION_NOTE in sdpa_op.notes and ATTENTION_NOTE not in eager_op.notes
    v = torch.randn(sdpa_op.shape[0], dtype=torch.float64,
                    generator=torch.Generator().manual_seed(3))
    sdpa_hv, eager_hv = sdpa_op.matvec(v), eager_op.matvec(v)
    # HF's eager attention takes its softmax in float32 even for a float64 model (ViT's
    # outputs then differ by ~1e-9): compare at that precision, relative to the largest entry
    torch.testing.assert_close(sdpa_hv, eager_hv, rtol=1e-6,
                               atol=1e-7 * float(sdpa_hv.abs().max()))
