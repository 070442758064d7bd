"""Layers shared by the model families: pooling, label graphs, attention, GCN, a fast linear.

Model files import from here instead of re-implementing: one place for the ML-GCN graph
convolution, the class-wise spatial attention and the Transformer blocks.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from mlic.errors import ConfigError
from mlic.host import onednn_linear_min_rows

__all__ = ["Linear", "linear"]

log = logging.getLogger("mlic")

# Below this many rows a plain BLAS matmul is as fast as the oneDNN route on this CPU
# (measured per CPU kind: mlic.host.onednn_linear_min_rows). Decided once, at import:
# torch.compile does not trace the decision.
_MIN_ROWS = onednn_linear_min_rows()
ONEDNN_LINEAR_MIN_ROWS = _MIN_ROWS or 0
_HAS_ONEDNN = torch.backends.mkldnn.is_available() and _MIN_ROWS is not None


def _onednn_linear_applies(x: torch.Tensor) -> bool:
    """True where routing a linear through oneDNN's convolution is measured to be faster."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.dim() >= 2
        and _HAS_ONEDNN
        and torch.backends.mkldnn.enabled
        and not torch.jit.is_scripting()
        and not torch.jit.is_tracing()
        and not torch.compiler.is_exporting()  # torch.export / ONNX: keep a plain linear
        and x.numel() >= ONEDNN_LINEAR_MIN_ROWS * x.shape[-1]
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` that on CPU runs large fp32 matmuls through oneDNN instead of BLAS.

    Why: PyTorch's CPU matmul calls MKL, which takes its AVX2 path on AMD CPUs, while oneDNN
    (the convolution engine) uses AVX-512 there (BENCHMARKS.md section 5). The rows
    ``[N, D_in]`` are viewed (no copy) as a channels_last image ``[1, D_in, 1, N]`` and
    multiplied by the weight as a 1x1 convolution: the same product, backward included.
    Elsewhere (GPU, other dtypes, few rows, tracing, ``torch.export``/ONNX) it is ``F.linear``.
    """
    if not _onednn_linear_applies(x):
        return nn.functional.linear(x, weight, bias)
    lead, d_in = x.shape[:-1], x.shape[-1]
    rows = x.reshape(1, 1, -1, d_in).permute(0, 3, 1, 2)  # [1, D_in, 1, N] channels_last view
    out = nn.functional.conv2d(rows, weight[:, :, None, None], bias)  # [1, D_out, 1, N]
    return out.permute(0, 2, 3, 1).reshape(*lead, weight.shape[0])  # [..., D_out]


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict keys) whose forward is :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class GlobalPool(nn.Module):
    """One vector per image from a map: global max (ML-GCN) or average pooling.

    [B, D, h, w] -> [B, D]. Max pooling suits post-ReLU maps (ResNet); on maps without a
    final activation (EfficientNet's linear bottleneck) it picks one signed outlier per
    channel, which is why the GCN models offer ``pool="avg"``. No parameters: the choice is
    checked once here, not in every forward.
    """

    KINDS = ("max", "avg")

    def __init__(self, kind: str = "max") -> None:
        super().__init__()
        if kind not in self.KINDS:
            raise ConfigError(f"pool={kind!r}: choose one of {', '.join(self.KINDS)}")
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "max":
            return x.amax(dim=(2, 3))  # [B, D]
        return x.mean(dim=(2, 3))  # [B, D]

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"


# ----------------------------------------------------------------------------- label graph inputs
def label_graph(
    labels: Any | None,
    num_classes: int,
    kind: str = "mlgcn",
    tau: float = 0.4,
    p: float = 0.2,
    variant: str = "paper",
) -> torch.Tensor:
    """The label graph a model keeps as a buffer, from the training split's LabelSet.

    ``kind``: ``mlgcn`` (ML-GCN re-weighted, normalised adjacency with self loops; ``variant``
    ``paper`` = Eqs. 7-8, ``official`` = the released code's ``gen_A``, see
    :func:`mlic.data.labels.mlgcn_adjacency`),
    ``conditional`` (raw P(j|i)), or ``cooccurrence`` (counts). Without ``labels`` (a model
    rebuilt from a checkpoint, whose state dict then fills the buffer) a placeholder identity.
    """
    if labels is None:
        return torch.eye(num_classes)
    if kind == "mlgcn":
        return torch.from_numpy(labels.mlgcn_adjacency(tau=tau, p=p, variant=variant)).float()
    if kind == "conditional":
        return torch.from_numpy(labels.conditional).float()
    if kind == "cooccurrence":
        return torch.from_numpy(labels.cooccurrence).float()
    raise ConfigError(
        f"unknown label graph kind {kind!r}; choose mlgcn, conditional or cooccurrence"
    )


class LabelEmbedding(nn.Module):
    """Per-class input vectors [C, D]: fixed word vectors (a buffer) or learnable.

    With ``labels.word_vectors`` present they are registered as a buffer (saved with the
    checkpoint, not trained, as in ML-GCN/SSGRL); otherwise a learnable ``[C, dim]``
    parameter. ``learnable`` forces the latter. Record :attr:`rebuild_kwargs` in the owning
    model so a checkpoint rebuilds the same kind and size without the LabelSet.
    """

    def __init__(
        self,
        num_classes: int,
        labels: Any | None = None,
        dim: int = 300,
        learnable: bool | None = None,
    ) -> None:
        super().__init__()
        vectors = None if labels is None else getattr(labels, "word_vectors", None)
        if learnable is None:
            learnable = vectors is None
            missing = getattr(labels, "word_vectors_missing", None)
            if missing:  # only models with label embeddings say it, and only then
                log.warning("%s -- this model learns its label embeddings instead", missing)
        if vectors is not None:
            dim = int(vectors.shape[1])
        self.dim = dim
        self.learnable = learnable
        if learnable:
            init = (
                torch.from_numpy(vectors).float()
                if vectors is not None
                else torch.randn(num_classes, dim) * 0.1
            )
            self.weight = nn.Parameter(init)
        else:
            init = (
                torch.from_numpy(vectors).float()
                if vectors is not None
                else torch.zeros(num_classes, dim)
            )
            self.register_buffer("weight", init)

    @property
    def rebuild_kwargs(self) -> dict[str, Any]:
        return {"word_dim": self.dim, "learn_word_vectors": self.learnable}

    def forward(self) -> torch.Tensor:
        return self.weight  # [C, D]


class GraphConvolution(nn.Module):
    """Kipf & Welling graph convolution ``H' = A H W`` (+ bias), as used by ML-GCN."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=bias)

    def forward(self, h: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        # h: [..., C, D_in], adj: [C, C] or [B, C, C] -> [..., C, D_out]
        return torch.matmul(adj, self.linear(h))


class CrossAttention(nn.Module):
    """Multi-head attention of queries over keys/values through ``scaled_dot_product_attention``.

    Returns the output and, when asked, the head-averaged attention weights
    ``[B, Lq, Lk]`` (computed explicitly only then, so the fast fused kernel is used otherwise).
    """

    def __init__(self, dim: int, num_heads: int = 8, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q = Linear(dim, dim)
        self.k = Linear(dim, dim)
        self.v = Linear(dim, dim)
        self.proj = Linear(dim, dim)
        self.dropout = dropout  # on the attention weights

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.num_heads, d // self.num_heads).transpose(1, 2)  # [B, h, N, d/h]

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, need_weights: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # q: [B, h, Lq, d/h], k/v: [B, h, Lk, d/h] -> [B, h, Lq, d/h] (, [B, Lq, Lk])
        drop = self.dropout if self.training else 0.0
        if not need_weights:
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=drop), None
        attn = torch.softmax(
            q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1
        )  # [B, h, Lq, Lk]
        out = torch.nn.functional.dropout(attn, drop, self.training) @ v
        return out, attn.mean(dim=1)  # [B, Lq, Lk]

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        need_weights: bool = False,
        segments: tuple[Sequence[int], Sequence[int]] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | list[torch.Tensor] | None]:
        """``segments=(query_lengths, key_lengths)``: the sequences hold several independent
        sets packed end to end (segment i of the queries attends only to segment i of the
        keys). The projections then run as one large matmul over all of them -- faster than
        one call per set -- and the attention per pair; weights come back as a list."""
        # query: [B, Lq, D], key/value: [B, Lk, D]
        q, k, v = self._split(self.q(query)), self._split(self.k(key)), self._split(self.v(value))
        if segments is None:
            out, weights = self._attend(q, k, v, need_weights)
        else:
            q_len, k_len = segments
            pairs = [
                self._attend(qi, ki, vi, need_weights)
                for qi, ki, vi in zip(
                    q.split(list(q_len), dim=2),
                    k.split(list(k_len), dim=2),
                    v.split(list(k_len), dim=2),
                    strict=True,
                )
            ]
            out = torch.cat([o for o, _ in pairs], dim=2)  # [B, h, Lq, d/h]
            weights = [w for _, w in pairs] if need_weights else None
        out = out.transpose(1, 2).reshape(query.shape)  # [B, Lq, D]
        return self.proj(out), weights


class FeedForward(nn.Sequential):
    """Transformer MLP: Linear -> activation -> dropout -> Linear -> dropout."""

    def __init__(
        self, dim: int, hidden: int, dropout: float = 0.1, act: type[nn.Module] = nn.ReLU
    ) -> None:
        super().__init__(
            Linear(dim, hidden),
            act(),
            nn.Dropout(dropout),
            Linear(hidden, dim),
            nn.Dropout(dropout),
        )


class LabelQueryDecoderLayer(nn.Module):
    """Post-norm Transformer decoder layer whose queries are label embeddings.

    ``self_attention=False`` drops the query self-attention block entirely (no parameters),
    as in MSFormer's decoder; ``True`` is the standard DETR/Query2Label layer.
    ``attn_dropout`` (default: ``dropout``) is the dropout on the attention weights; at 0 the
    CPU's fused flash-attention kernel runs (PyTorch has none with dropout on CPU).
    Returns the updated queries and, when asked, cross-attention weights [B, C, L].
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        ffn_dim: int = 2048,
        dropout: float = 0.1,
        self_attention: bool = True,
        attn_dropout: float | None = None,
    ) -> None:
        super().__init__()
        attn_drop = dropout if attn_dropout is None else attn_dropout
        self.self_attn = CrossAttention(dim, num_heads, attn_drop) if self_attention else None
        self.norm_sa = nn.LayerNorm(dim) if self_attention else None
        self.cross_attn = CrossAttention(dim, num_heads, attn_drop)
        self.norm_ca = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, ffn_dim, dropout)
        self.norm_ffn = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(
        self,
        queries: torch.Tensor,
        memory: torch.Tensor,
        memory_pos: torch.Tensor | None = None,
        need_weights: bool = False,
        segments: tuple[Sequence[int], Sequence[int]] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | list[torch.Tensor] | None]:
        """``segments=(query_lengths, memory_lengths)``: several query sets and memories
        packed end to end, set i attending to memory i only (see :class:`CrossAttention`)."""
        # queries: [B, C, D], memory: [B, L, D], memory_pos: [1 or B, L, D]
        if self.self_attn is not None:
            self_segments = None if segments is None else (segments[0], segments[0])
            sa, _ = self.self_attn(queries, queries, queries, segments=self_segments)
            queries = self.norm_sa(queries + self.drop(sa))
        key = memory if memory_pos is None else memory + memory_pos
        ca, weights = self.cross_attn(
            queries, key, memory, need_weights=need_weights, segments=segments
        )
        queries = self.norm_ca(queries + self.drop(ca))
        queries = self.norm_ffn(queries + self.ffn(queries))
        return queries, weights


def tokens_to_maps(weights: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Attention over flattened positions [B, C, H*W] -> spatial maps [B, C, H, W]."""
    return weights.reshape(weights.shape[0], weights.shape[1], height, width)


class GCNStack(nn.Module):
    """A stack of graph convolutions over label nodes, as in ML-GCN (Chen et al., CVPR 2019).

    ``dims = (D_in, D_1, ..., D_out)`` gives ``len(dims) - 1`` :class:`GraphConvolution`
    layers ``H_{l+1} = A H_l W_l`` with LeakyReLU(``negative_slope``) between layers and none
    after the last one (its output is used as-is, e.g. as classifier weights). ``adj`` may be
    one static graph ``[C, C]`` or a per-image graph ``[B, C, C]`` (then ``h`` is ``[B, C, D]``).
    ML-GCN's layers have no bias, hence the default.
    """

    def __init__(
        self,
        dims: Sequence[int],
        negative_slope: float = 0.2,
        bias: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if len(dims) < 2:
            raise ConfigError(f"GCNStack needs at least (in, out) dims, got {tuple(dims)}")
        self.layers = nn.ModuleList(
            GraphConvolution(d_in, d_out, bias=bias)
            for d_in, d_out in zip(dims[:-1], dims[1:], strict=True)
        )
        self.act = nn.LeakyReLU(negative_slope)
        self.drop = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        # h: [C, D_in] or [B, C, D_in], adj: [C, C] or [B, C, C] -> [(B,) C, D_out]
        for i, layer in enumerate(self.layers):
            if i > 0:
                h = self.drop(self.act(h))  # [(B,) C, D_i]
            h = layer(h, adj)  # [(B,) C, D_{i+1}]
        return h


class ClassWiseLinear(nn.Module):
    """One linear classifier per class: ``logit_c = <W_c, x_c> + b_c`` for label features x [B, C, D].

    The "element-wise" / grouped classifier of SSGRL-style heads, where every class has its
    own feature vector and its own weights (unlike a shared ``nn.Linear`` that maps one pooled
    vector to all C logits). Initialised like ``nn.Linear`` (uniform in +-1/sqrt(D)).
    """

    def __init__(self, num_classes: int, dim: int, bias: bool = True) -> None:
        super().__init__()
        bound = dim**-0.5
        self.weight = nn.Parameter(torch.empty(num_classes, dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(num_classes).uniform_(-bound, bound)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., C, D] -> [..., C]
        out = (x * self.weight).sum(dim=-1)  # [..., C]
        return out if self.bias is None else out + self.bias


def sine_position_encoding(
    height: int,
    width: int,
    dim: int,
    temperature: float = 10000.0,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Fixed 2-D sine/cosine positional encoding of an ``height x width`` grid, as tokens [H*W, D].

    The DETR/Query2Label form: the first ``D/2`` channels encode the row, the last ``D/2``
    the column; each half holds sin/cos pairs of the position (normalised to (0, 2*pi]) at
    geometrically spaced frequencies ``temperature ** (2k / (D/2))``. Normalising by the grid
    size makes the encoding independent of the input resolution. Rows are flattened row-major,
    matching ``x.flatten(2)`` of a ``[B, D, H, W]`` map. ``dim`` must be divisible by 4.
    """
    if dim % 4:
        raise ConfigError(f"sine position encoding needs dim divisible by 4, got {dim}")
    half = dim // 2
    eps = 1e-6
    scale = 2 * torch.pi
    ys = torch.arange(1, height + 1, device=device, dtype=torch.float32) / (height + eps) * scale
    xs = torch.arange(1, width + 1, device=device, dtype=torch.float32) / (width + eps) * scale
    k = torch.arange(half, device=device, dtype=torch.float32)
    freqs = temperature ** (2 * torch.div(k, 2, rounding_mode="floor") / half)  # [D/2]

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos[:, None] / freqs  # [N, D/2]
        # even channels sin, odd channels cos, interleaved
        return torch.stack((angles[:, 0::2].sin(), angles[:, 1::2].cos()), dim=2).flatten(1)

    pos_y = encode(ys)[:, None, :].expand(height, width, half)  # [H, W, D/2]
    pos_x = encode(xs)[None, :, :].expand(height, width, half)  # [H, W, D/2]
    return torch.cat((pos_y, pos_x), dim=-1).reshape(height * width, dim).to(dtype)  # [H*W, D]


class TransformerEncoderLayer(nn.Module):
    """Post-norm Transformer encoder layer over image tokens, positions added to queries and keys.

    DETR-style: ``q = k = x + pos``, ``v = x`` (the positional encoding steers where a token
    looks without being mixed into the values), then residual + LayerNorm, FFN, residual +
    LayerNorm. Attention goes through :class:`CrossAttention` (fused SDPA kernel; on CPU only
    with ``attn_dropout=0``, as PyTorch's CPU flash kernel has no dropout).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        ffn_dim: int = 2048,
        dropout: float = 0.1,
        attn_dropout: float | None = None,
    ) -> None:
        super().__init__()
        self.attn = CrossAttention(
            dim, num_heads, dropout if attn_dropout is None else attn_dropout
        )
        self.norm_attn = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, ffn_dim, dropout)
        self.norm_ffn = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        pos: torch.Tensor | None = None,
        segments: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """``segments``: lengths of independent token sets packed end to end in ``x``
        (attention within each; every per-token layer runs once over all of them)."""
        # x: [B, L, D], pos: [1 or B, L, D] -> [B, L, D]
        qk = x if pos is None else x + pos  # [B, L, D]
        pairs = None if segments is None else (segments, segments)
        attn, _ = self.attn(qk, qk, x, segments=pairs)  # [B, L, D]
        x = self.norm_attn(x + self.drop(attn))  # [B, L, D]
        return self.norm_ffn(x + self.ffn(x))  # [B, L, D]


class ClassWiseAttention(nn.Module):
    """Class-wise spatial attention pooling: one softmax map per class -> label features [B, C, D].

    A 1x1 convolution ``D -> C`` scores every position for every class; a softmax over the
    ``h*w`` positions turns the scores into maps that sum to 1, and the label feature of
    class c is the map-weighted sum ``f_c = sum_p a_cp x_p`` (the attention pooling of
    WILDCAT / SSGRL / ADD-GCN's semantic attention). No bias: a per-class constant over
    positions cancels in the softmax. Runs through ``scaled_dot_product_attention`` with the
    C conv kernels as queries (scale 1, so it is exactly conv + softmax); the maps are
    computed explicitly only when asked for.
    """

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.score = nn.Conv2d(dim, num_classes, kernel_size=1, bias=False)

    def forward(
        self, x: torch.Tensor, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # x: [B, D, h, w] -> label features [B, C, D] (, maps [B, C, h, w])
        b, d, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # [B, N, D]
        queries = self.score.weight.view(1, -1, d).to(tokens.dtype)  # [1, C, D]
        if need_weights:
            attn = torch.softmax(queries @ tokens.transpose(1, 2), dim=-1)  # [B, C, N]
            return attn @ tokens, tokens_to_maps(attn, h, w)  # [B, C, D], [B, C, h, w]
        q = queries.expand(b, -1, -1).unsqueeze(1)  # [B, 1, C, D]
        feats = torch.nn.functional.scaled_dot_product_attention(
            q, tokens.unsqueeze(1), tokens.unsqueeze(1), scale=1.0
        )  # [B, 1, C, D]
        return feats.squeeze(1), None
