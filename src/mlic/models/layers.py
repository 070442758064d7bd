"""Layers shared by the model families: the backbone-holding base class, pooling, graph layers.

Model files import from here instead of re-implementing: one place for the ML-GCN graph
convolution, the class-wise spatial attention, and the default_cfg convention.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from mlic.models.backbone import create_backbone

__all__ = ["MultiLabelModel", "make_default_cfg"]


def make_default_cfg(
    image_size: int, mean: Sequence[float], std: Sequence[float], **paper: Any
) -> dict[str, Any]:
    """The data-as-defaults dict every model exposes as ``model.default_cfg``."""
    return {
        "input_size": (3, image_size, image_size),
        "mean": tuple(mean),
        "std": tuple(std),
        "paper": dict(paper),
    }


class MultiLabelModel(nn.Module):
    """Base of every mlic model: a timm backbone + ``default_cfg``.

    Subclasses implement ``forward_head(features, return_attention)`` taking the list of
    backbone maps (shallow to deep, as selected by ``out_indices``) and returning logits
    [B, C] (and maps [B, C, h, w] when asked).
    """

    default_image_size: int = 448
    paper: dict[str, Any] = {}

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet101",
        pretrained: bool | str = False,
        out_indices: Sequence[int] = (-1,),
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.backbone = create_backbone(
            backbone, pretrained=pretrained, out_indices=out_indices, drop_path_rate=drop_path_rate
        )
        dc = self.backbone.data_config
        self.default_cfg = make_default_cfg(
            self.default_image_size, dc["mean"], dc["std"], **self.paper
        )

    @property
    def has_attention(self) -> bool:
        """True when ``forward(x, return_attention=True)`` gives label-wise maps."""
        return True

    def forward_head(
        self, features: list[torch.Tensor], return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def forward(
        self, x: torch.Tensor, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        # x: [B, 3, H, W] -> logits [B, C] (, maps [B, C, h, w])
        return self.forward_head(self.backbone(x), return_attention=return_attention)

    def param_groups(self, lr: float, backbone_lr_mult: float, weight_decay: float) -> list[dict]:
        """Backbone vs head parameter groups; no weight decay on norms and biases."""
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            is_backbone = name.startswith("backbone.")
            no_decay = p.ndim <= 1 or name.endswith(".bias")
            groups.setdefault((is_backbone, no_decay), []).append(p)
        out = []
        for (is_backbone, no_decay), params in groups.items():
            out.append(
                {
                    "params": params,
                    "lr": lr * (backbone_lr_mult if is_backbone else 1.0),
                    "weight_decay": 0.0 if no_decay else weight_decay,
                }
            )
        return out


# ----------------------------------------------------------------------------- label graph inputs
def label_graph(
    labels: Any | None, num_classes: int, kind: str = "mlgcn", tau: float = 0.4, p: float = 0.2
) -> torch.Tensor:
    """The label graph a model keeps as a buffer, from the training split's LabelSet.

    ``kind``: ``mlgcn`` (ML-GCN re-weighted, normalised adjacency with self loops),
    ``conditional`` (raw P(j|i)), or ``cooccurrence`` (counts). Without ``labels`` (a model
    rebuilt from a checkpoint, whose state dict then fills the buffer) a placeholder identity.
    """
    if labels is None:
        return torch.eye(num_classes)
    if kind == "mlgcn":
        return torch.from_numpy(labels.mlgcn_adjacency(tau=tau, p=p)).float()
    if kind == "conditional":
        return torch.from_numpy(labels.conditional).float()
    if kind == "cooccurrence":
        return torch.from_numpy(labels.cooccurrence).float()
    raise ValueError(
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
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.num_heads, d // self.num_heads).transpose(1, 2)  # [B, h, N, d/h]

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # query: [B, Lq, D], key/value: [B, Lk, D]
        q, k, v = self._split(self.q(query)), self._split(self.k(key)), self._split(self.v(value))
        drop = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            attn = torch.softmax(
                q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1
            )  # [B, h, Lq, Lk]
            out = torch.nn.functional.dropout(attn, drop, self.training) @ v
            weights = attn.mean(dim=1)  # [B, Lq, Lk]
        else:
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        out = out.transpose(1, 2).reshape(query.shape)  # [B, Lq, D]
        return self.proj(out), weights


class FeedForward(nn.Sequential):
    """Transformer MLP: Linear -> activation -> dropout -> Linear -> dropout."""

    def __init__(
        self, dim: int, hidden: int, dropout: float = 0.1, act: type[nn.Module] = nn.ReLU
    ) -> None:
        super().__init__(
            nn.Linear(dim, hidden),
            act(),
            nn.Dropout(dropout),
            nn.Linear(hidden, dim),
            nn.Dropout(dropout),
        )


class LabelQueryDecoderLayer(nn.Module):
    """Post-norm Transformer decoder layer whose queries are label embeddings.

    ``self_attention=False`` drops the query self-attention block entirely (no parameters),
    as in MSFormer's decoder; ``True`` is the standard DETR/Query2Label layer.
    Returns the updated queries and, when asked, cross-attention weights [B, C, L].
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        ffn_dim: int = 2048,
        dropout: float = 0.1,
        self_attention: bool = True,
    ) -> None:
        super().__init__()
        self.self_attn = CrossAttention(dim, num_heads, dropout) if self_attention else None
        self.norm_sa = nn.LayerNorm(dim) if self_attention else None
        self.cross_attn = CrossAttention(dim, num_heads, dropout)
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
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # queries: [B, C, D], memory: [B, L, D], memory_pos: [1 or B, L, D]
        if self.self_attn is not None:
            sa, _ = self.self_attn(queries, queries, queries)
            queries = self.norm_sa(queries + self.drop(sa))
        key = memory if memory_pos is None else memory + memory_pos
        ca, weights = self.cross_attn(queries, key, memory, need_weights=need_weights)
        queries = self.norm_ca(queries + self.drop(ca))
        queries = self.norm_ffn(queries + self.ffn(queries))
        return queries, weights


def tokens_to_maps(weights: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Attention over flattened positions [B, C, H*W] -> spatial maps [B, C, H, W]."""
    return weights.reshape(weights.shape[0], weights.shape[1], height, width)
