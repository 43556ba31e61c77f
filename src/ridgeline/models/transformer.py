"""A small pre-norm transformer encoder that reads a 1-D signal as a sequence of patches."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ridgeline.errors import ConfigError, ShapeMismatchError
from ridgeline.models.layers import norm_layer
from ridgeline.models.registry import model_factory

__all__ = ["transformer", "PatchTransformer", "SelfAttention", "EncoderBlock"]


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate ``q``, ``k``, ``v`` and ``out`` projections.

    softmax(Q Kᵀ/√d_h) V per head (``F.scaled_dot_product_attention``), heads concatenated
    and projected by ``out`` (Vaswani et al. 2017). No dropout, no mask.

    With ``kv_heads`` = G < ``heads`` = H it is grouped-query attention (Ainslie et al.
    2023): ``k`` and ``v`` project to G·d_h features (d_h = width/H), and query head
    g·(H/G) + i reads key/value head g (``F.scaled_dot_product_attention(...,
    enable_gqa=True)``, which repeats each key/value head H/G times). ``kv_heads=None``
    (or H) is plain multi-head attention, computed exactly as before.
    """

    def __init__(self, width: int, heads: int, kv_heads: int | None = None) -> None:
        super().__init__()
        kv_heads = heads if kv_heads is None else kv_heads
        if heads < 1 or kv_heads < 1 or width % heads or heads % kv_heads:
            raise ConfigError(f"attention needs heads dividing width and kv_heads dividing heads; "
                              f"got width={width}, heads={heads}, kv_heads={kv_heads}.")
        self.heads, self.kv_heads = heads, kv_heads
        kv_width = width // heads * kv_heads
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, kv_width)
        self.v = nn.Linear(width, kv_width)
        self.out = nn.Linear(width, width)

    def _split(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        n, t, d = x.shape
        return x.reshape(n, t, heads, d // heads).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q = self._split(self.q(x), self.heads)
        k, v = self._split(self.k(x), self.kv_heads), self._split(self.v(x), self.kv_heads)
        if self.kv_heads == self.heads:
            attended = F.scaled_dot_product_attention(q, k, v)  # (n, heads, t, d / heads)
        else:  # each key/value head read by heads/kv_heads consecutive query heads
            attended = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return self.out(attended.transpose(1, 2).reshape(n, t, d))


class EncoderBlock(nn.Module):
    """Pre-norm block: x + attn(norm1(x)), then x + fc2(gelu(fc1(norm2(x))))."""

    def __init__(self, width: int, heads: int, hidden: int, norm: str,
                 kv_heads: int | None = None) -> None:
        super().__init__()
        self.norm1 = norm_layer(norm, width)
        self.attn = SelfAttention(width, heads, kv_heads)
        self.norm2 = norm_layer(norm, width)
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class PatchTransformer(nn.Module):
    """Patches → linear embedding + learned positions [+ CLS token] → encoder blocks →
    final norm → mean over tokens (or the CLS token) → linear head."""

    def __init__(self, in_features: int, out_features: int, patch: int, width: int, depth: int,
                 heads: int, hidden: int, norm: str, pool: str,
                 kv_heads: int | None = None) -> None:
        super().__init__()
        self.in_features, self.patch, self.pool = in_features, patch, pool
        tokens = in_features // patch + (pool == "cls")
        self.embed = nn.Linear(patch, width)
        self.cls = nn.Parameter(torch.zeros(1, 1, width)) if pool == "cls" else None
        self.position = nn.Parameter(torch.randn(1, tokens, width) * 0.02)
        self.blocks = nn.ModuleList(EncoderBlock(width, heads, hidden, norm, kv_heads)
                                    for _ in range(depth))
        self.norm = norm_layer(norm, width)
        self.head = nn.Linear(width, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        x = x.reshape(n, -1)
        if x.shape[1] != self.in_features:
            raise ShapeMismatchError(
                f"the transformer reads {self.in_features} features per example but got "
                f"{x.shape[1]}; build it with in_features={x.shape[1]}.")
        z = self.embed(x.reshape(n, -1, self.patch))
        if self.cls is not None:
            z = torch.cat([self.cls.expand(n, -1, -1), z], dim=1)
        z = z + self.position
        for block in self.blocks:
            z = block(z)
        z = self.norm(z)
        return self.head(z[:, 0] if self.cls is not None else z.mean(dim=1))


@model_factory("transformer")
def transformer(in_features: int, out_features: int, *, patch: int = 4, width: int = 64,
                depth: int = 2, heads: int = 4, mlp_ratio: float = 2, norm: str = "layer",
                pool: str = "mean", kv_heads: int | None = None) -> PatchTransformer:
    """A small pre-norm transformer encoder for 1-D signals such as MNIST-1D.

    The (N, in_features) input is cut into in_features/patch patches, each embedded by a
    linear map to ``width`` features plus a learned position embedding; ``depth`` pre-norm
    blocks x ← x + Attn(LN(x)), x ← x + MLP(LN(x)) follow (``heads`` heads, MLP hidden
    width ``mlp_ratio · width``, GELU), then a final norm, the mean over tokens (or a
    learned CLS token, ``pool="cls"``) and a linear head (Vaswani et al. 2017; the ViT
    recipe of Dosovitskiy et al. 2021 on 1-D patches).

    Attention is ``F.scaled_dot_product_attention`` with separate ``q``, ``k``, ``v`` and
    ``out`` ``nn.Linear`` projections per block; there is no dropout. ``kv_heads`` = G <
    ``heads`` = H makes it grouped-query attention (Ainslie et al. 2023, as in Llama 2/3):
    ``k`` and ``v`` have G·width/H outputs, and each key/value head is shared by H/G
    consecutive query heads (query head g·H/G + i reads key/value head g). The default,
    ``kv_heads=None`` (= H), is plain multi-head attention: the same parameters, names and
    outputs as a model built without the argument.

    Parameters
    ----------
    in_features, out_features : int
    patch : int
        Features per token; must divide ``in_features`` (40 = 10 tokens of 4).
    width, depth, heads : int
        Token width (divisible by ``heads``), number of blocks, attention heads.
    kv_heads : int, optional
        Key/value heads (grouped-query attention); must divide ``heads``. ``None``: ``heads``.
    mlp_ratio : float
    norm : {"layer", "none"}
    pool : {"mean", "cls"}
    """
    if norm not in ("layer", "none"):
        raise ConfigError(f"transformer norm must be 'layer' or 'none', got {norm!r}.")
    if pool not in ("mean", "cls"):
        raise ConfigError(f"transformer pool must be 'mean' or 'cls', got {pool!r}.")
    if min(in_features, out_features, patch, width, depth, heads) < 1:
        raise ConfigError("transformer sizes must be positive; got "
                          f"in_features={in_features}, out_features={out_features}, patch={patch}, "
                          f"width={width}, depth={depth}, heads={heads}.")
    if in_features % patch:
        raise ConfigError(f"patch={patch} does not divide in_features={in_features}; choose a "
                          f"divisor such as {[p for p in range(1, 9) if in_features % p == 0]}.")
    if width % heads:
        raise ConfigError(f"width={width} is not divisible by heads={heads}; each head gets "
                          "width/heads features.")
    if kv_heads is not None and (kv_heads < 1 or heads % kv_heads):
        divisors = [g for g in range(1, heads + 1) if heads % g == 0]
        raise ConfigError(f"kv_heads={kv_heads} does not divide heads={heads}; grouped-query "
                          "attention shares each key/value head among heads/kv_heads query "
                          f"heads, so choose one of {divisors}.")
    hidden = max(1, round(mlp_ratio * width))
    return PatchTransformer(in_features, out_features, patch, width, depth, heads, hidden, norm,
                            pool, kv_heads)
