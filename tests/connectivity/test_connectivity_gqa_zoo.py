"""Grouped-query attention in the zoo transformer (``transformer(..., kv_heads=G)``).

Ground truths: the forward pass written out by hand (softmax(Q Kᵀ/√d) V with every key/value
head repeated for its group of query heads); and a permuted copy built by index from the
symmetry of grouped-query attention itself (groups σ, query heads within a group ρ_g,
query/key features τ_g, value features υ_g, the residual stream, the MLP hidden units), not
from the spec: it computes A's function in float64 and weight matching undoes it exactly.
"""

from __future__ import annotations

import math

import pytest
import torch

from ridgeline.connectivity import align, permutation_spec
from ridgeline.errors import ConfigError
from ridgeline.models import build_model, transformer
from ridgeline.outputs import as_logits


def _explicit_forward(model, x: torch.Tensor) -> torch.Tensor:
    """The zoo transformer's forward pass with attention written out (no SDPA)."""
    n = x.shape[0]
    z = model.embed(x.reshape(n, -1, model.patch)) + model.position
    for block in model.blocks:
        attn, h = block.attn, block.norm1(z)
        t, width = h.shape[1], h.shape[2]
        d = width // attn.heads
        q = attn.q(h).reshape(n, t, attn.heads, d).transpose(1, 2)
        k = attn.k(h).reshape(n, t, attn.kv_heads, d).transpose(1, 2)
        v = attn.v(h).reshape(n, t, attn.kv_heads, d).transpose(1, 2)
        r = attn.heads // attn.kv_heads
        k, v = k.repeat_interleave(r, dim=1), v.repeat_interleave(r, dim=1)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
        a = (weights @ v).transpose(1, 2).reshape(n, t, width)
        z = z + attn.out(a)
        z = z + block.fc2(block.act(block.fc1(block.norm2(z))))
    return model.head(model.norm(z).mean(dim=1))


@pytest.mark.parametrize("heads,kv_heads", [(4, None), (4, 4), (4, 2), (6, 2), (4, 1)])
def test_forward_pass_equals_the_explicit_grouped_query_formula(heads, kv_heads):
    torch.manual_seed(0)
    model = transformer(40, 10, width=24, heads=heads, depth=2, kv_heads=kv_heads).double()
    x = torch.randn(5, 40, dtype=torch.float64)
    g = heads if kv_heads is None else kv_heads
    assert model.blocks[0].attn.k.weight.shape == (24 // heads * g, 24)
    assert model.blocks[0].attn.v.weight.shape == (24 // heads * g, 24)
    with torch.no_grad():
        assert torch.allclose(model(x), _explicit_forward(model, x), rtol=0, atol=1e-12)


def test_default_kv_heads_keeps_the_multi_head_model_parameter_for_parameter():
    """kv_heads=None and kv_heads=heads build the model of before: same names, shapes and,
    from the same seed, the same values and outputs."""
    x = torch.randn(3, 40)
    built = []
    for kwargs in ({}, {"kv_heads": 4}):
        torch.manual_seed(3)
        built.append(transformer(40, 10, width=16, heads=4, depth=2, **kwargs))
    a, b = built
    assert [k for k, _ in a.named_parameters()] == [k for k, _ in b.named_parameters()]
    for (_, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q)
    assert all(p.shape == (16, 16) for n, p in a.named_parameters() if n.endswith("k.weight"))
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_kv_heads_that_do_not_divide_heads_are_refused():
    with pytest.raises(ConfigError, match=r"kv_heads=3 does not divide heads=4.*\[1, 2, 4\]"):
        transformer(40, 10, width=16, heads=4, kv_heads=3)
    with pytest.raises(ConfigError, match="kv_heads=0"):
        transformer(40, 10, width=16, heads=4, kv_heads=0)
    with pytest.raises(ConfigError, match="does not divide"):  # through the registry too
        build_model("transformer", in_features=40, out_features=10, width=16, heads=4,
                    kv_heads=3)


def _permuted_by_hand(model, seed: int):
    """A copy of the zoo GQA transformer permuted by index from the symmetry itself."""
    gen = torch.Generator().manual_seed(seed)
    width = model.embed.weight.shape[0]
    res = torch.randperm(width, generator=gen)
    out = transformer(40, 10, width=width, heads=model.blocks[0].attn.heads,
                      depth=len(model.blocks), kv_heads=model.blocks[0].attn.kv_heads)
    out = out.to(model.embed.weight.dtype)
    src, dst = dict(model.named_parameters()), dict(out.named_parameters())
    with torch.no_grad():
        dst["embed.weight"].copy_(src["embed.weight"][res])
        dst["embed.bias"].copy_(src["embed.bias"][res])
        dst["position"].copy_(src["position"][..., res])
        for name in ("norm.weight", "norm.bias"):
            dst[name].copy_(src[name][res])
        dst["head.weight"].copy_(src["head.weight"][:, res])
        dst["head.bias"].copy_(src["head.bias"])
        for i, block in enumerate(model.blocks):
            h, g = block.attn.heads, block.attn.kv_heads
            r, d = h // g, width // h
            sigma = torch.randperm(g, generator=gen)
            rho = torch.stack([torch.randperm(r, generator=gen) for _ in range(g)])
            tau = torch.stack([torch.randperm(d, generator=gen) for _ in range(g)])
            ups = torch.stack([torch.randperm(d, generator=gen) for _ in range(g)])
            hid = torch.randperm(block.fc1.weight.shape[0], generator=gen)
            q_rows = torch.tensor([(int(sigma[a]) * r + int(rho[a, b])) * d + int(tau[a, j])
                                   for a in range(g) for b in range(r) for j in range(d)])
            o_cols = torch.tensor([(int(sigma[a]) * r + int(rho[a, b])) * d + int(ups[a, j])
                                   for a in range(g) for b in range(r) for j in range(d)])
            k_rows = torch.tensor([int(sigma[a]) * d + int(tau[a, j])
                                   for a in range(g) for j in range(d)])
            v_rows = torch.tensor([int(sigma[a]) * d + int(ups[a, j])
                                   for a in range(g) for j in range(d)])
            p = f"blocks.{i}."
            for norm in ("norm1", "norm2"):
                for kind in ("weight", "bias"):
                    dst[p + f"{norm}.{kind}"].copy_(src[p + f"{norm}.{kind}"][res])
            for name, rows in (("q", q_rows), ("k", k_rows), ("v", v_rows)):
                dst[p + f"attn.{name}.weight"].copy_(src[p + f"attn.{name}.weight"][rows][:, res])
                dst[p + f"attn.{name}.bias"].copy_(src[p + f"attn.{name}.bias"][rows])
            dst[p + "attn.out.weight"].copy_(src[p + "attn.out.weight"][res][:, o_cols])
            dst[p + "attn.out.bias"].copy_(src[p + "attn.out.bias"][res])
            dst[p + "fc1.weight"].copy_(src[p + "fc1.weight"][hid][:, res])
            dst[p + "fc1.bias"].copy_(src[p + "fc1.bias"][hid])
            dst[p + "fc2.weight"].copy_(src[p + "fc2.weight"][res][:, hid])
            dst[p + "fc2.bias"].copy_(src[p + "fc2.bias"][res])
    return out.eval()


def _out(model, x):
    with torch.no_grad():
        return as_logits(model(x))


def test_tracer_derives_the_grouped_query_spec_of_the_zoo_transformer():
    torch.manual_seed(0)
    model, x = transformer(40, 10, width=16, heads=4, depth=2, kv_heads=2), torch.randn(3, 40)
    spec = permutation_spec(model, example_input=x)
    for i in range(2):
        p = f"blocks.{i}.attn."
        q, k = spec.axes[p + "q.weight"][0], spec.axes[p + "k.weight"][0]
        v, out = spec.axes[p + "v.weight"][0], spec.axes[p + "out.weight"][1]
        group = spec.structure[k][1]
        assert group is not None
        assert spec.structure[k] == ("heads", group, 2, 4, True)
        assert spec.structure[v] == ("heads", group, 2, 4, True)
        rho = spec.structure[q][6]
        assert rho is not None and spec.query_groups[rho] == (2, 2)
        assert spec.structure[q] == ("grouped", group, 2, 2, 4, k, rho)
        assert spec.structure[out] == ("grouped", group, 2, 2, 4, v, rho)
    grouped = [n for n in spec.notes if "grouped-query" in n]
    assert len(grouped) == 4 and all("left in place: nothing" in n for n in grouped)


def _assert_weight_matching_undoes(model, permuted, x):
    """The hand-made permutation moved the key weights but kept the function, and weight
    matching brings every parameter back exactly."""
    assert not torch.equal(permuted.blocks[0].attn.k.weight, model.blocks[0].attn.k.weight)
    ref = _out(model, x)
    assert (_out(permuted, x) - ref).abs().max() <= 1e-12 * ref.abs().max()
    result = align(model, permuted, example_input=x)
    assert result.function_relative_error <= 1e-5
    aligned = dict(result.model.named_parameters())
    for key, value in model.named_parameters():
        assert torch.equal(aligned[key], value), key


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (6, 2)])
def test_weight_matching_undoes_a_hand_made_grouped_query_permutation_exactly(heads, kv_heads):
    torch.manual_seed(0)
    model = transformer(40, 10, width=24, heads=heads, depth=2, kv_heads=kv_heads)
    model = model.double().eval()
    x = torch.randn(4, 40, dtype=torch.float64)
    permuted = _permuted_by_hand(model, seed=1)
    _assert_weight_matching_undoes(model, permuted, x)


def test_activation_matching_undoes_a_hand_made_grouped_query_permutation():
    torch.manual_seed(2)
    model = transformer(40, 10, width=16, heads=4, depth=2, kv_heads=2).double().eval()
    permuted = _permuted_by_hand(model, seed=5)
    data = torch.randn(64, 40, dtype=torch.float64)
    result = align(model, permuted, method="activations", data=data)
    assert result.function_relative_error <= 1e-5 and not result.unmatched
    aligned = dict(result.model.named_parameters())
    for key, value in model.named_parameters():
        assert torch.equal(aligned[key], value), key


def test_grouped_and_multi_head_transformers_are_not_aligned_with_each_other():
    from ridgeline.errors import ArchitectureMismatchError

    a = transformer(40, 10, width=16, heads=4, depth=1, kv_heads=2)
    b = transformer(40, 10, width=16, heads=4, depth=1)
    with pytest.raises(ArchitectureMismatchError, match="k.weight"):
        align(a, b, example_input=torch.randn(2, 40))


def test_a_grouped_query_transformer_is_rebuilt_from_its_recorded_arguments():
    torch.manual_seed(0)
    model = transformer(40, 10, width=16, heads=4, depth=1, kv_heads=2).eval()
    arch = model.ridgeline_architecture
    assert arch["factory"] == "transformer" and arch["kwargs"]["kv_heads"] == 2
    rebuilt = build_model(arch["factory"], **arch["kwargs"]).eval()
    rebuilt.load_state_dict(model.state_dict())  # strict: same names and shapes
    x = torch.randn(3, 40)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))


def test_multi_query_zoo_transformer_permutes_query_heads_and_shared_features_exactly():
    """kv_heads=1: ground truth built from the symmetry (query heads ρ, one q/k order τ of
    K's outputs and every query block, one value order υ of V's outputs and every output
    block, the residual stream, the MLP) keeps the function in float64; weight matching
    undoes it exactly and activation matching keeps the function."""
    torch.manual_seed(3)
    model = transformer(40, 10, width=16, heads=4, depth=2, kv_heads=1).double().eval()
    x = torch.randn(4, 40, dtype=torch.float64)
    spec = permutation_spec(model, example_input=x)
    for i in range(2):
        p = f"blocks.{i}.attn."
        q, k = spec.axes[p + "q.weight"][0], spec.axes[p + "k.weight"][0]
        v, out = spec.axes[p + "v.weight"][0], spec.axes[p + "out.weight"][1]
        group, rho = spec.structure[q][1], spec.structure[q][6]
        assert spec.structure[k] == spec.structure[v] == ("heads", group, 1, 4, True)
        assert spec.structure[q] == ("grouped", group, 1, 4, 4, k, rho)
        assert spec.structure[out] == ("grouped", group, 1, 4, 4, v, rho)
    notes = [n for n in spec.notes if "multi-query" in n]
    assert len(notes) == 4 and all("features (they move" in n for n in notes)
    permuted = _permuted_by_hand(model, seed=6)
    _assert_weight_matching_undoes(model, permuted, x)
    data = torch.randn(64, 40, dtype=torch.float64)
    by_acts = align(model, permuted, method="activations", data=data)
    assert by_acts.function_relative_error <= 1e-5 and not by_acts.unmatched
