"""The one logits rule, token cross-entropy and token-weighted dataset means."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ridgeline import Objective
from ridgeline.curvature import hessian
from ridgeline.errors import DataError, ShapeMismatchError
from ridgeline.losses import cross_entropy, loss_weight
from ridgeline.outputs import as_logits


class Wrapped(nn.Module):
    """A tiny token model whose forward returns its logits wrapped as ``kind`` says."""

    def __init__(self, kind: str = "tensor", vocab: int = 7, width: int = 3) -> None:
        super().__init__()
        self.kind = kind
        self.embed = nn.Embedding(vocab, width)
        self.mix = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens):
        logits = self.head(torch.tanh(self.mix(self.embed(tokens))))
        if self.kind == "dict":
            return {"hidden": logits * 0, "logits": logits}
        if self.kind == "tuple":
            return (logits, logits * 0)
        if self.kind == "nested":
            return ({"logits": logits},)
        return logits


def tokens(n=9, t=5, vocab=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, vocab, (n, t + 1), generator=gen)
    return seq[:, :-1], seq[:, 1:].clone()


def test_as_logits_rule_tensor_mapping_model_output_tuple():
    t = torch.randn(2, 3)
    assert as_logits(t) is t
    assert as_logits({"logits": t, "loss": t.sum()}) is t
    assert as_logits((t, "anything")) is t
    assert as_logits([{"logits": t}]) is t
    transformers = pytest.importorskip("transformers")
    out = transformers.modeling_outputs.CausalLMOutput(logits=t)
    assert as_logits(out) is t


def test_as_logits_refuses_mappings_without_logits_naming_the_keys():
    with pytest.raises(ShapeMismatchError, match=r"keys \['last_hidden_state'\] but no 'logits'"):
        as_logits({"last_hidden_state": torch.zeros(1)})
    with pytest.raises(ShapeMismatchError, match="returned a str"):
        as_logits("logits")
    with pytest.raises(ShapeMismatchError, match="empty tuple"):
        as_logits(())


@pytest.mark.parametrize("kind", ["dict", "tuple", "nested"])
def test_objective_on_wrapped_outputs_equals_the_plain_tensor_model(kind):
    torch.manual_seed(0)
    plain = Wrapped().double()
    wrapped = Wrapped(kind).double()
    wrapped.load_state_dict(plain.state_dict())
    x, y = tokens()
    assert float(Objective(wrapped, (x, y)).loss()) == float(Objective(plain, (x, y)).loss())


def hand_mean_token_loss(model, x, y):
    logp = torch.log_softmax(model(x), dim=-1)
    keep = y != -100
    picked = logp.gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return -(picked * keep).sum() / keep.sum()


def test_token_cross_entropy_matches_pytorch_flattened_with_ignore_index():
    logits = torch.randn(3, 4, 5, dtype=torch.float64)
    targets = torch.randint(0, 5, (3, 4))
    targets[1, :3] = -100
    truth = nn.functional.cross_entropy(logits.reshape(-1, 5), targets.reshape(-1))
    assert float(cross_entropy(logits, targets)) == pytest.approx(float(truth), rel=1e-14)
    assert loss_weight(cross_entropy, targets) == 12 - 3


def test_dataset_mean_weights_batches_by_tokens_that_count_equals_explicit_hessian():
    """Uneven batches with different numbers of ignored tokens: the loss and every Hessian
    product equal those of the mean over all counted tokens (dense autograd Hessian)."""
    torch.manual_seed(0)
    model = Wrapped().double()
    x, y = tokens(n=7)
    y[0, :4] = -100
    y[5, 1:] = -100
    y[6, :] = -100  # a batch of its own with no term (batch_size=3: examples 6..6)
    with torch.no_grad():
        truth = hand_mean_token_loss(model, x, y)
    objective = Objective(model, (x, y), batch_size=3)
    assert float(objective.loss()) == pytest.approx(float(truth), rel=1e-13)

    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss_of(flat):
        params, offset = {}, 0
        for name, shape in zip(names, shapes):
            size = shape.numel()
            params[name] = flat[offset:offset + size].reshape(shape)
            offset += size
        out = torch.func.functional_call(model, params, (x,))
        logp = torch.log_softmax(out, dim=-1)
        keep = y != -100
        picked = logp.gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        return -(picked * keep).sum() / keep.sum()

    dense = torch.autograd.functional.hessian(loss_of, flat0)
    operator = hessian(objective)
    torch.testing.assert_close(operator.dense(), (dense + dense.T) / 2, rtol=1e-10, atol=1e-12)


def test_token_targets_all_ignored_are_refused_before_any_work():
    model = Wrapped().double()
    x, y = tokens(n=3)
    with pytest.raises(DataError, match="every target is -100"):
        Objective(model, (x, torch.full_like(y, -100)))


def test_class_targets_of_the_wrong_shape_are_refused():
    model = nn.Linear(4, 3).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    with pytest.raises(ShapeMismatchError, match=r"logits of shape \(5, 3\) and class targets "
                                                  r"of shape \(5, 2\)"):
        Objective(model, (x, torch.zeros(5, 2, dtype=torch.long)))


def test_training_statistics_weight_batches_by_tokens_equal_the_hand_written_mean():
    """With lr = 0 the model never moves, so the epoch's running train loss and accuracy
    (token-weighted over uneven mini-batches with ignored tokens) equal the hand-written
    token means over the whole data."""
    import ridgeline

    torch.manual_seed(0)
    model = Wrapped("tuple").double()
    x, y = tokens(n=11)
    y[0, :4] = -100
    y[7, 1:] = -100
    with torch.no_grad():
        truth = float(hand_mean_token_loss(lambda t: model(t)[0], x, y))
        keep = y != -100
        hits = ((model(x)[0].argmax(-1) == y) & keep).sum()
    result = ridgeline.train(model, (x, y), epochs=1, lr=0.0, momentum=0.0, batch_size=4,
                             progress=False)
    last = result.history[-1]
    assert last["train_loss"] == pytest.approx(truth, rel=1e-12)
    assert last["train_accuracy"] == pytest.approx(float(hits) / float(keep.sum()), rel=1e-12)


def test_subspace_model_of_layers_without_bias_equals_the_model_at_z_zero():
    from ridgeline.subspace import SubspaceModel

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(1, 3, 3, bias=False), nn.Flatten(), nn.Linear(3 * 6, 2))
    x = torch.randn(4, 1, 8)
    torch.testing.assert_close(SubspaceModel(model, dim=5)(x), model(x))


def test_recorded_hessian_blocks_by_is_grads_batched_equal_single_products():
    """The accelerator path of the cached Hessian (is_grads_batched), run on the CPU, against
    one product per vector."""
    from ridgeline.curvature.operators import _RecordedGradient

    torch.manual_seed(0)
    model = Wrapped().double()
    x, y = tokens(n=5)
    objective = Objective(model, (x, y))
    params = objective.params()
    recorded = _RecordedGradient(objective, {}, params, x, y)
    block = {n: torch.randn(3, *p.shape, dtype=torch.float64) for n, p in params.items()}
    together = recorded._product(block, batched=True)
    for i in range(3):
        one = recorded({n: t[i] for n, t in block.items()})
        for name in params:
            torch.testing.assert_close(together[name][i], one[name], rtol=1e-12, atol=1e-14)
