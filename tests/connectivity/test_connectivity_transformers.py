"""Transformers: attention-aware permutation specs, alignment with head permutations.

Ground truth: a random permutation of model A built independently of the tracer (random
head order, random feature order within every head, random residual and MLP orders, drawn
from the spec's structure and applied by index) computes A's function in float64 and is
undone exactly by weight matching (A's own weights come back, element for element).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ridgeline.connectivity import align, coerce_spec, permutation_spec
from ridgeline.connectivity.alignment import permute_model
from ridgeline.connectivity.heads import StructuredState
from ridgeline.models import transformer
from ridgeline.outputs import as_logits

transformers = pytest.importorskip("transformers")


class MHABlock(nn.Module):
    """A hand-written block around nn.MultiheadAttention (packed in-projection)."""

    def __init__(self, width: int = 12, heads: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(5, width)
        self.norm = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.head = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.embed(x)
        h = self.norm(z)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.head((z + a).mean(1))


def _gpt2(attn: str = "eager"):
    cfg = transformers.GPT2Config(n_embd=16, n_layer=2, n_head=4, vocab_size=40, n_positions=16,
                                  bos_token_id=0, eos_token_id=0, attn_implementation=attn)
    return transformers.GPT2LMHeadModel(cfg), torch.randint(0, 40, (3, 7))


def _bert(attn: str = "sdpa"):
    cfg = transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=4,
                                  intermediate_size=24, vocab_size=40, max_position_embeddings=16,
                                  num_labels=3, attn_implementation=attn)
    return transformers.BertForSequenceClassification(cfg), torch.randint(0, 40, (3, 7))


def _vit(attn: str = "sdpa"):
    cfg = transformers.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=4,
                                 intermediate_size=24, image_size=8, patch_size=4,
                                 num_channels=1, num_labels=3, attn_implementation=attn)
    return transformers.ViTForImageClassification(cfg), torch.randn(3, 1, 8, 8)


def _ridgeline():
    return transformer(40, 10, width=16, heads=4, depth=2), torch.randn(3, 40)


def _mha():
    return MHABlock(), torch.randn(3, 6, 5)


MODELS = {"gpt2-eager": lambda: _gpt2("eager"), "gpt2-sdpa": lambda: _gpt2("sdpa"),
          "bert-sdpa": _bert, "bert-eager": lambda: _bert("eager"), "vit-sdpa": _vit,
          "ridgeline": _ridgeline, "mha": _mha}


def _random_permutation(spec, seed: int) -> dict[str, torch.Tensor]:
    state = StructuredState(spec)
    g = torch.Generator().manual_seed(seed)
    for p in state.free:
        state.free[p] = torch.randperm(spec.perms[p], generator=g)
    for k in state.sigma:
        state.sigma[k] = torch.randperm(len(state.sigma[k]), generator=g)
    for k, t in state.tau.items():
        state.tau[k] = torch.stack([torch.randperm(t.shape[1], generator=g)
                                    for _ in range(t.shape[0])])
    for k, t in state.rho.items():  # query heads within the groups of grouped-query attention
        state.rho[k] = torch.stack([torch.randperm(t.shape[1], generator=g)
                                    for _ in range(t.shape[0])])
    return state.flat()


def _out(model, x):
    with torch.no_grad():
        return as_logits(model(x))


@pytest.mark.parametrize("name", list(MODELS))
def test_random_head_permutation_is_function_preserving_and_recovered_exactly(name):
    torch.manual_seed(0)
    with torch.device("cpu"):
        model, x = MODELS[name]()
    model = model.double().eval()
    if x.is_floating_point():
        x = x.double()
    spec = permutation_spec(model, example_input=x)
    heads = [e for e in spec.structure.values() if e[0] == "heads"]
    assert heads and all(e[1] is not None and e[4] for e in heads), spec.structure
    permuted = permute_model(model, spec, _random_permutation(spec, seed=1))
    ref = _out(model, x)
    scale = ref.abs().max()
    assert (_out(permuted, x) - ref).abs().max() <= 1e-5 * scale
    result = align(model, permuted, example_input=x)
    assert result.function_relative_error <= 1e-5
    aligned = dict(result.model.named_parameters())
    for key, value in model.named_parameters():
        assert torch.equal(aligned[key], value), key


def test_gpt2_spec_names_the_tied_unembedding_once_and_reads_the_fused_qkv_as_segments():
    model, x = _gpt2()
    spec = permutation_spec(model, example_input=x)
    assert "lm_head.weight" not in spec.axes  # tied to the token embedding: one tensor
    residual = spec.axes["transformer.wte.weight"][1]
    assert residual is not None and spec.axes["transformer.wte.weight"][0] is None
    assert spec.axes["transformer.wpe.weight"][1] == residual
    assert spec.axes["transformer.ln_f.weight"] == (residual,)
    fused = spec.axes["transformer.h.0.attn.c_attn.weight"][1]
    kind, parts, sizes = spec.structure[fused]
    assert kind == "cat" and sizes == (16, 16, 16)
    assert parts[0] == parts[1] != parts[2]  # Q and K share one permutation, V its own
    out_in = spec.axes["transformer.h.0.attn.c_proj.weight"][0]  # Conv1D: (in, out)
    assert out_in == parts[2]
    assert spec.structure[parts[0]][1] == spec.structure[parts[2]][1]  # one head order
    again = coerce_spec(spec, model)  # a structured spec passed back in keeps its structure
    assert again.structure == spec.structure and again.perms == spec.perms


@pytest.mark.parametrize("name", ["ridgeline", "gpt2-eager", "mha", "vit-sdpa"])
def test_activation_matching_recovers_a_random_head_permutation(name):
    torch.manual_seed(0)
    model, x = MODELS[name]()
    model = model.double().eval()
    if x.is_floating_point():
        x = x.double()
    spec = permutation_spec(model, example_input=x)
    permuted = permute_model(model, spec, _random_permutation(spec, seed=3))
    data = (torch.randint(0, 40, (64, *x.shape[1:])) if not x.is_floating_point()
            else torch.randn(64, *x.shape[1:], dtype=torch.float64))
    result = align(model, permuted, method="activations", data=data)
    assert result.function_relative_error <= 1e-5
    aligned = dict(result.model.named_parameters())
    for key, value in model.named_parameters():
        assert torch.allclose(aligned[key], value, rtol=0, atol=0), key


class GQA(nn.Module):
    """Grouped-query attention over a residual stream: G key/value heads, each read by r
    query heads, d features per head; K/V repeated by ``enable_gqa=True`` (SDPA) or by
    Hugging Face's ``repeat_kv`` (expand + reshape)."""

    def __init__(self, form: str, groups: int = 2, repeat: int = 3, dim: int = 3) -> None:
        super().__init__()
        self.form, self.g, self.r, self.d = form, groups, repeat, dim
        width = 12
        self.embed = nn.Linear(5, width)
        self.q = nn.Linear(width, groups * repeat * dim)
        self.k, self.v = nn.Linear(width, groups * dim), nn.Linear(width, groups * dim)
        self.out = nn.Linear(groups * repeat * dim, width)
        self.head = nn.Linear(width, 2)

    def forward(self, x):
        n, t, _ = x.shape
        g, r, d = self.g, self.r, self.d
        z = self.embed(x)
        q = self.q(z).reshape(n, t, g * r, d).transpose(1, 2)
        k = self.k(z).reshape(n, t, g, d).transpose(1, 2)
        v = self.v(z).reshape(n, t, g, d).transpose(1, 2)
        if self.form == "sdpa":
            a = nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        else:  # transformers' repeat_kv
            k = k[:, :, None].expand(n, g, r, t, d).reshape(n, g * r, t, d)
            v = v[:, :, None].expand(n, g, r, t, d).reshape(n, g * r, t, d)
            a = nn.functional.scaled_dot_product_attention(q, k, v)
        a = self.out(a.transpose(1, 2).reshape(n, t, g * r * d))
        return self.head((z + a).mean(1))


def _gqa_by_hand(model: GQA, seed: int, features: bool = True) -> GQA:
    """A copy of the GQA block permuted by index, from the symmetry itself (not the spec):
    σ over the G groups (K head g, V head g and query heads g·r … g·r + r − 1 together),
    ρ_g over the query heads of group g, τ_g (shared by K head g and group g's query
    heads) and υ_g (V head g and group g's output-projection blocks), and the residual."""
    g, r, d = model.g, model.r, model.d
    gen = torch.Generator().manual_seed(seed)
    sigma = torch.randperm(g, generator=gen)
    rho = torch.stack([torch.randperm(r, generator=gen) for _ in range(g)])
    tau = torch.stack([torch.randperm(d, generator=gen) for _ in range(g)])
    ups = torch.stack([torch.randperm(d, generator=gen) for _ in range(g)])
    if not features:
        tau = ups = torch.arange(d).repeat(g, 1)
    res = torch.randperm(12, generator=gen)
    q_rows = torch.tensor([(int(sigma[a]) * r + int(rho[a, i])) * d + int(tau[a, j])
                           for a in range(g) for i in range(r) for j in range(d)])
    o_cols = torch.tensor([(int(sigma[a]) * r + int(rho[a, i])) * d + int(ups[a, j])
                           for a in range(g) for i in range(r) for j in range(d)])
    k_rows = torch.tensor([int(sigma[a]) * d + int(tau[a, j]) for a in range(g) for j in range(d)])
    v_rows = torch.tensor([int(sigma[a]) * d + int(ups[a, j]) for a in range(g) for j in range(d)])
    out = GQA(model.form, g, r, d).to(model.embed.weight.dtype)
    with torch.no_grad():
        out.embed.weight.copy_(model.embed.weight[res])
        out.embed.bias.copy_(model.embed.bias[res])
        for name, rows in (("q", q_rows), ("k", k_rows), ("v", v_rows)):
            getattr(out, name).weight.copy_(getattr(model, name).weight[rows][:, res])
            getattr(out, name).bias.copy_(getattr(model, name).bias[rows])
        out.out.weight.copy_(model.out.weight[res][:, o_cols])
        out.out.bias.copy_(model.out.bias[res])
        out.head.weight.copy_(model.head.weight[:, res])
        out.head.bias.copy_(model.head.bias)
    return out


@pytest.mark.parametrize("form", ["sdpa", "repeat_kv"])
def test_grouped_query_attention_permutes_groups_query_heads_and_features(form):
    """Ground truth: a permutation of the groups, of the query heads within each group and
    of the features within each head, applied by index from the symmetry of grouped-query
    attention, computes A's function and is undone exactly by weight matching."""
    torch.manual_seed(0)
    model, x = GQA(form).double(), torch.randn(3, 5, 5, dtype=torch.float64)
    spec = permutation_spec(model, example_input=x)
    q, out = spec.axes["q.weight"][0], spec.axes["out.weight"][1]
    k, v = spec.axes["k.weight"][0], spec.axes["v.weight"][0]
    group = spec.structure[k][1]
    assert group is not None and spec.structure[k] == ("heads", group, 2, 3, True)
    assert spec.structure[v] == ("heads", group, 2, 3, True)
    rho = spec.structure[q][6]
    assert rho is not None
    assert spec.structure[q] == ("grouped", group, 2, 3, 3, k, rho)
    assert spec.structure[out] == ("grouped", group, 2, 3, 3, v, rho)
    assert spec.query_groups == {rho: (2, 3)} and spec.head_groups == {group: 2}
    assert any("grouped-query" in n and "left in place: nothing" in n for n in spec.notes)
    again = coerce_spec(spec, model)  # passed back in, the structure is kept and checked
    assert again.structure == spec.structure and again.perms == spec.perms
    from ridgeline.connectivity import PermutationSpec
    from ridgeline.errors import ConfigError

    broken = dict(spec.structure)
    broken[q] = ("grouped", group, 2, 3, 3, q, rho)  # base: itself, not a K/V "heads"
    with pytest.raises(ConfigError, match="shares the features"):
        coerce_spec(PermutationSpec(spec.perms, spec.axes, structure=broken), model)
    permuted = _gqa_by_hand(model, seed=2)
    ref = _out(model, x)
    assert (_out(permuted, x) - ref).abs().max() <= 1e-12 * ref.abs().max()
    assert (_out(permute_model(model, spec, _random_permutation(spec, seed=7)), x)
            - ref).abs().max() <= 1e-12 * ref.abs().max()
    result = align(model, permuted, example_input=x)
    assert result.function_relative_error <= 1e-5
    aligned = dict(result.model.named_parameters())
    for key, value in model.named_parameters():
        assert torch.equal(aligned[key], value), key
    from ridgeline.connectivity.heads import kick  # a restart's start: a valid permutation

    kicked = permute_model(model, spec, kick(spec, result.permutations, seed=0, fraction=1.0))
    assert (_out(kicked, x) - ref).abs().max() <= 1e-12 * ref.abs().max()


@pytest.mark.parametrize("form", ["sdpa", "repeat_kv"])
def test_multi_query_attention_moves_the_query_heads_and_their_shared_features(form):
    """One key/value head (multi-query attention), by SDPA's enable_gqa or by an expand:
    ground truth from the symmetry itself (the query heads ρ, one q/k feature order τ shared
    by K's outputs and every query head's block, one value order υ shared by V's outputs and
    every output-projection block, the residual) keeps the function in float64 and is undone
    exactly by weight matching; activation matching keeps the function too."""
    torch.manual_seed(0)
    model, x = GQA(form, groups=1, repeat=4, dim=3).double(), torch.randn(3, 5, 5).double()
    spec = permutation_spec(model, example_input=x)
    q, out = spec.axes["q.weight"][0], spec.axes["out.weight"][1]
    k, v = spec.axes["k.weight"][0], spec.axes["v.weight"][0]
    group, rho = spec.structure[q][1], spec.structure[q][6]
    assert group is not None and rho is not None
    assert spec.structure[k] == ("heads", group, 1, 3, True)
    assert spec.structure[v] == ("heads", group, 1, 3, True)
    assert spec.structure[q] == ("grouped", group, 1, 4, 3, k, rho)
    assert spec.structure[out] == ("grouped", group, 1, 4, 3, v, rho)
    assert spec.axes["k.bias"] == (k,) and spec.query_groups == {rho: (1, 4)}
    mqa = [n for n in spec.notes if "multi-query" in n]
    assert len(mqa) == 2 and all("features (they move" in n and "left in place: nothing" in n
                                 for n in mqa)
    assert not any("by themselves" in n for n in spec.notes)
    assert coerce_spec(spec, model).structure == spec.structure
    permuted = _gqa_by_hand(model, seed=4)
    assert not torch.equal(permuted.k.weight, model.k.weight)
    ref = _out(model, x)
    assert (_out(permuted, x) - ref).abs().max() <= 1e-12 * ref.abs().max()
    result = align(model, permuted, example_input=x)
    assert result.function_relative_error <= 1e-12
    for key, value in model.named_parameters():
        assert torch.equal(dict(result.model.named_parameters())[key], value), key
    data = torch.randn(64, 5, 5, dtype=torch.float64)
    by_acts = align(model, permuted, method="activations", data=data)
    assert by_acts.function_relative_error <= 1e-5 and not by_acts.unmatched
    for key, value in model.named_parameters():
        assert torch.equal(dict(by_acts.model.named_parameters())[key], value), key


class GainedMQA(GQA):
    """Multi-query attention whose query heads carry a learned gain each (an (H, 1, 1)
    parameter on the head axis by itself: the heads cannot move)."""

    def __init__(self) -> None:
        super().__init__("sdpa", groups=1, repeat=4, dim=3)
        self.gain = nn.Parameter(torch.rand(4, 1, 1) + 0.5)

    def forward(self, x):
        n, t, _ = x.shape
        z = self.embed(x)
        q = self.q(z).reshape(n, t, 4, 3).transpose(1, 2) * self.gain
        k = self.k(z).reshape(n, t, 1, 3).transpose(1, 2)
        v = self.v(z).reshape(n, t, 1, 3).transpose(1, 2)
        a = nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return self.head((z + self.out(a.transpose(1, 2).reshape(n, t, 12))).mean(1))


def test_multi_query_heads_that_cannot_move_keep_their_shared_features_in_place():
    """Ground truth: with the query heads pinned by a per-head parameter, a shared feature
    order would need the heads' own structure: the tracer leaves the attention features in
    place, and a random permutation of the spec still computes A's function (float64) and
    is undone exactly by weight matching."""
    torch.manual_seed(0)
    model, x = GainedMQA().double(), torch.randn(3, 5, 5, dtype=torch.float64)
    spec = permutation_spec(model, example_input=x)
    assert spec.axes["gain"] == (None, None, None)
    for name in ("q.weight", "k.weight", "v.weight"):
        assert spec.axes[name][0] is None, name
    assert spec.axes["out.weight"][1] is None and spec.axes["embed.weight"][0] is not None
    permuted = permute_model(model, spec, _random_permutation(spec, seed=1))
    ref = _out(model, x)
    assert (_out(permuted, x) - ref).abs().max() <= 1e-12 * ref.abs().max()
    result = align(model, permuted, example_input=x)
    for key, value in model.named_parameters():
        assert torch.equal(dict(result.model.named_parameters())[key], value), key


def test_activation_matching_recovers_a_grouped_query_permutation():
    torch.manual_seed(1)
    model = GQA("sdpa").double()
    permuted = _gqa_by_hand(model, seed=3)
    data = torch.randn(64, 5, 5, dtype=torch.float64)
    result = align(model, permuted, method="activations", data=data)
    assert result.function_relative_error <= 1e-5 and not result.unmatched
    aligned = dict(result.model.named_parameters())
    for key, value in model.named_parameters():
        assert torch.equal(aligned[key], value), key


def test_grouped_query_models_with_other_groupings_are_refused_before_matching():
    from ridgeline.errors import ConfigError

    a = GQA("sdpa", groups=2, repeat=3, dim=3).double()  # q: 18 features, k/v: 6
    b = GQA("sdpa", groups=3, repeat=3, dim=2).double()  # same shapes, other heads
    with pytest.raises(ConfigError, match="different heads"):
        align(a, b, example_input=torch.randn(2, 4, 5, dtype=torch.float64))


def test_heads_behind_an_unknown_operation_name_it_and_suggest_a_spec():
    from ridgeline.errors import UnsupportedOperationError

    class Rolled(GQA):
        def forward(self, x):
            n, t, _ = x.shape
            q = torch.roll(self.q(self.embed(x)).reshape(n, t, 6, 3), 1, dims=2)
            return self.head(q.reshape(n, t, 18)[..., :12].mean(1))

    with pytest.raises(UnsupportedOperationError, match=r"aten\.roll.*spec="):
        permutation_spec(Rolled("sdpa"), example_input=torch.randn(2, 4, 5))


def test_models_with_other_head_counts_are_refused_before_matching():
    from ridgeline.errors import ConfigError

    a = transformer(40, 10, width=16, heads=4, depth=1)
    b = transformer(40, 10, width=16, heads=2, depth=1)  # same shapes, other heads
    with pytest.raises(ConfigError, match="different heads"):
        align(a, b, example_input=torch.randn(2, 40))


class Rotary(nn.Module):
    """Q/K rotated by position (rotary embeddings pair feature j with j + d/2)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.q, self.k = nn.Linear(3, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.v, self.out, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)
        freq = 1.0 / 10000 ** (torch.arange(0, 4, 2) / 4)
        angles = torch.outer(torch.arange(6.0), freq)
        self.register_buffer("cos", torch.cat([angles, angles], -1).cos(), persistent=False)
        self.register_buffer("sin", torch.cat([angles, angles], -1).sin(), persistent=False)

    def forward(self, x):
        n, t, _ = x.shape
        z = self.embed(x)

        def heads(y):
            return y.reshape(n, t, 2, 4).transpose(1, 2)

        def rotate(y):
            half = torch.cat([-y[..., 2:], y[..., :2]], dim=-1)
            return y * self.cos[:t] + half * self.sin[:t]

        q, k, v = rotate(heads(self.q(z))), rotate(heads(self.k(z))), heads(self.v(z))
        a = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.head(self.out(a.transpose(1, 2).reshape(n, t, 8)).mean(1))


def test_rotary_embeddings_keep_query_key_features_in_place_and_say_so():
    torch.manual_seed(0)
    model, x = Rotary().double(), torch.randn(3, 6, 3, dtype=torch.float64)
    spec = permutation_spec(model, example_input=x)
    qk = spec.axes["q.weight"][0]
    vo = spec.axes["v.weight"][0]
    assert spec.structure[qk][4] is False and spec.structure[qk][1] is not None
    assert spec.structure[vo][4] is True and spec.structure[vo][1] == spec.structure[qk][1]
    assert any("rotary" in note for note in spec.notes)
    permuted = permute_model(model, spec, _random_permutation(spec, seed=4))
    assert (_out(permuted, x) - _out(model, x)).abs().max() <= 1e-12
    result = align(model, permuted, example_input=x)
    for key, value in model.named_parameters():
        assert torch.equal(dict(result.model.named_parameters())[key], value), key


def test_weight_matching_started_at_the_answer_stays_there_with_heads():
    from ridgeline.connectivity.alignment import model_state, weight_matching

    torch.manual_seed(0)
    model, x = _ridgeline()
    spec = permutation_spec(model, example_input=x)
    other = transformer(40, 10, width=16, heads=4, depth=2)
    first, _, _ = weight_matching(model_state(model), model_state(other), spec)
    again, trace, converged = weight_matching(model_state(model), model_state(other), spec,
                                              init=first)
    assert converged and len(trace) == 1
    assert all(torch.equal(first[p], again[p]) for p in spec.perms)


@pytest.mark.parametrize("kv_heads,attn", [(4, "sdpa"), (2, "sdpa"), (2, "eager"),
                                           (1, "sdpa"), (1, "eager")])
def test_llama_rmsnorm_rotary_and_grouped_query_attention(kv_heads, attn):
    """Rotary embeddings keep the query/key features in place (heads still move); grouped-
    query attention (sdpa: enable_gqa; eager: repeat_kv) moves the key/value groups with
    their query heads, the query heads within each group and the value features; RMSNorm
    scales follow the residual stream."""
    cfg = transformers.LlamaConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=kv_heads,
                                   vocab_size=40, max_position_embeddings=32,
                                   attn_implementation=attn)
    torch.manual_seed(0)
    model, x = transformers.LlamaForCausalLM(cfg).double().eval(), torch.randint(0, 40, (2, 7))
    spec = permutation_spec(model, example_input=x)
    residual = spec.axes["model.norm.weight"][0]
    assert residual is not None
    assert spec.axes["model.layers.0.input_layernorm.weight"] == (residual,)
    assert any("rotary" in note for note in spec.notes)
    prefix = "model.layers.0.self_attn."
    q, k = spec.axes[prefix + "q_proj.weight"][0], spec.axes[prefix + "k_proj.weight"][0]
    v, o = spec.axes[prefix + "v_proj.weight"][0], spec.axes[prefix + "o_proj.weight"][1]
    if kv_heads == 4:
        assert q == k and spec.structure[qk := q][1] is not None
        assert spec.structure[qk][4] is False and spec.structure[v][4] is True
    elif kv_heads == 1:  # multi-query: rotary keeps q/k features; the value features move
        group, rho = spec.structure[q][1], spec.structure[q][6]
        assert k is None and group is not None and rho is not None
        assert spec.structure[v] == ("heads", group, 1, 4, True)
        assert spec.structure[q] == ("grouped", group, 1, 4, 4, None, rho)
        assert spec.structure[o] == ("grouped", group, 1, 4, 4, v, rho)
        assert any("multi-query" in note and "rotary" in note for note in spec.notes)
    else:
        group = spec.structure[k][1]
        assert spec.structure[k] == ("heads", group, 2, 4, False)  # rotary: features stay
        assert spec.structure[v] == ("heads", group, 2, 4, True)
        rho = spec.structure[q][6]
        assert group is not None and rho is not None
        assert spec.structure[q] == ("grouped", group, 2, 2, 4, k, rho)
        assert spec.structure[o] == ("grouped", group, 2, 2, 4, v, rho)
        assert any("grouped-query" in note and "rotary" in note for note in spec.notes)
    permutation = _random_permutation(spec, seed=5)
    assert all(not torch.equal(p, torch.arange(p.numel())) for p in permutation.values())
    permuted = permute_model(model, spec, permutation)
    ref = _out(model, x)
    # LlamaRMSNorm computes in float32 whatever the model's dtype: round-off ~1e-8
    assert (_out(permuted, x) - ref).abs().max() <= 1e-5 * ref.abs().max()
    result = align(model, permuted, example_input=x)
    assert result.function_relative_error <= 1e-5
    for key, value in model.named_parameters():
        assert torch.equal(dict(result.model.named_parameters())[key], value), key


def test_an_input_the_model_does_not_accept_is_refused_before_tracing():
    from ridgeline.errors import ShapeMismatchError

    model, _ = _gpt2()
    with pytest.raises(ShapeMismatchError, match="cannot be applied"):
        align(model, model, example_input=torch.randn(2, 7))  # floats, not token ids


def test_a_sequence_longer_than_the_positions_is_refused_by_the_tracer_too():
    """Tracing with fake tensors (use_cache=False) sees no token values: the call is checked
    for real first, so an input the model rejects still says so."""
    from ridgeline.errors import UnsupportedOperationError

    model, _ = _gpt2()  # 16 positions
    with pytest.raises(UnsupportedOperationError, match="index out of range.*example_input="):
        permutation_spec(model, example_input=torch.randint(0, 40, (2, 30)))


def test_a_hand_written_spec_with_heads_matches_the_traced_one():
    from ridgeline.connectivity import PermutationSpec
    from ridgeline.models.transformer import SelfAttention

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.attn, self.head = nn.Linear(3, 8), SelfAttention(8, 2), nn.Linear(8, 2)

        def forward(self, x):
            z = self.embed(x)
            return self.head((z + self.attn(z)).mean(1))

    torch.manual_seed(0)
    model, x = Net().double(), torch.randn(3, 5, 3, dtype=torch.float64)
    axes = {"embed.weight": ("R", None), "embed.bias": ("R",), "head.weight": (None, "R"),
            "head.bias": (None,), "attn.out.weight": ("R", "VO"), "attn.out.bias": ("R",)}
    for name, perm in (("q", "QK"), ("k", "QK"), ("v", "VO")):
        axes[f"attn.{name}.weight"], axes[f"attn.{name}.bias"] = (perm, "R"), (perm,)
    spec = PermutationSpec({"R": 8, "QK": 8, "VO": 8}, axes,
                           structure={"QK": ("heads", "H", 2, 4, True),
                                      "VO": ("heads", "H", 2, 4, True)})
    permuted = permute_model(model, spec, _random_permutation(spec, seed=6))
    result = align(model, permuted, spec=spec, example_input=x)
    assert result.function_relative_error <= 1e-12
    for key, value in model.named_parameters():
        assert torch.equal(dict(result.model.named_parameters())[key], value), key
    traced = permutation_spec(model, example_input=x)
    assert sorted(e for e in traced.structure.values()) == [
        ("heads", next(iter(traced.head_groups)), 2, 4, True)] * 2


def _tiny_pair():
    torch.manual_seed(0)
    model, x = _ridgeline()
    other = transformer(40, 10, width=16, heads=4, depth=2)
    return model.double().eval(), other.double().eval(), x.double()


def test_restarts_never_end_below_the_plain_run_and_report_the_true_inner_product():
    """Ground truth: Σ_k ⟨θ_A,k, π(θ_B)_k⟩ recomputed from the permuted model's tensors."""
    from ridgeline.connectivity.alignment import weight_matching

    model, other, x = _tiny_pair()
    spec = permutation_spec(model, example_input=x)
    pa = {k: v.detach() for k, v in model.named_parameters()}
    pb = {k: v.detach() for k, v in other.named_parameters()}
    for seed in (0, 1, 2):
        _, plain, _ = weight_matching(pa, pb, spec, seed=seed, restarts=1)
        perms, trace, _ = weight_matching(pa, pb, spec, seed=seed, restarts=6)
        assert trace[-1] >= plain[-1]
        permuted = {k: v.detach() for k, v in permute_model(other, spec, perms).named_parameters()}
        truth = sum(float((v * permuted[k]).sum()) for k, v in pa.items())
        assert abs(trace[-1] - truth) <= 1e-9 * abs(truth)


def test_restarted_alignment_keeps_the_function_and_default_restarts_follow_the_spec():
    from ridgeline.connectivity.alignment import weight_matching
    from ridgeline.connectivity.heads import default_restarts, kick
    from ridgeline.models import mlp

    model, other, x = _tiny_pair()
    spec = permutation_spec(model, example_input=x)
    assert default_restarts(spec) > 1
    result = align(model, other, example_input=x, restarts=5)
    assert result.function_relative_error <= 1e-5
    # a kick is a valid structured permutation: the kicked model computes B's function
    kicked = permute_model(other, spec, kick(spec, result.permutations, seed=3))
    assert (_out(kicked, x) - _out(other, x)).abs().max() <= 1e-9 * _out(other, x).abs().max()
    # plain specs (MLPs) keep Git Re-Basin's single run by default: identical permutations
    torch.manual_seed(0)
    net_a, net_b = mlp(6, [8, 8], 3), mlp(6, [8, 8], 3)
    spec_mlp = permutation_spec(net_a, example_input=torch.randn(2, 6))
    assert default_restarts(spec_mlp) == 1
    pa = {k: v.detach() for k, v in net_a.named_parameters()}
    pb = {k: v.detach() for k, v in net_b.named_parameters()}
    default, _, _ = weight_matching(pa, pb, spec_mlp)
    single, _, _ = weight_matching(pa, pb, spec_mlp, restarts=1)
    assert all(torch.equal(default[p], single[p]) for p in spec_mlp.perms)
    _, plain, _ = weight_matching(pa, pb, spec_mlp, restarts=1)
    _, restarted, _ = weight_matching(pa, pb, spec_mlp, restarts=4)
    assert restarted[-1] >= plain[-1]


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_bad_restarts_are_refused_before_matching(bad):
    from ridgeline.errors import ConfigError

    model, other, x = _tiny_pair()
    with pytest.raises(ConfigError, match="restarts"):
        align(model, other, example_input=x, restarts=bad)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_hf_models_are_traced_with_use_cache_false_for_every_input_of_that_shape(name):
    """Ground truth: the model called with use_cache=False on another batch of the same
    shape; the graph (make_fx in fake mode, transformers' own tracing path) recomputes it,
    so no decision was taken on the traced batch's values."""
    from ridgeline.connectivity.permutation_spec import traced

    torch.manual_seed(0)
    if name == "gpt2":
        model, x = _gpt2("sdpa")
    else:
        cfg = transformers.LlamaConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2,
                                       vocab_size=40, max_position_embeddings=32)
        model, x = transformers.LlamaForCausalLM(cfg), torch.randint(0, 40, (2, 7))
    model = model.double().eval()
    result = traced(model, x)
    assert not any("traced as called" in note for note in result.spec.notes)
    state = {k: v.detach() for k, v in [*model.named_parameters(), *model.named_buffers()]}
    other = torch.randint(0, 40, x.shape, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        out = result.graph_module({k: state[k] for k in result.names
                                   if k in dict(model.named_parameters())},
                                  {k: state[k] for k in result.names
                                   if k not in dict(model.named_parameters())}, other)
        truth = model(other, use_cache=False).logits
    assert torch.equal(out[0] if isinstance(out, (tuple, list)) else out, truth)


def test_a_model_that_fails_with_use_cache_false_is_traced_as_called_and_says_so():
    class Picky(nn.Module):
        """Takes use_cache, but reads a data-dependent size (torch.nonzero): make_fx's fake
        mode cannot record it, its real mode can."""

        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x, use_cache: bool = True):
            count = torch.nonzero(x[:, 0] > -1e9).sum()
            return self.fc2(torch.relu(self.fc1(x)) + 0 * count)

    model, x = Picky().double(), torch.randn(3, 4, dtype=torch.float64)
    spec = permutation_spec(model, example_input=x)
    assert spec.axes["fc1.weight"][0] is not None
    assert any("traced as called" in note and "use_cache" in note for note in spec.notes)
