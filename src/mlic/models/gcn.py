"""GCN-generated classifiers: ML-GCN and attention + GCN (``mlgcn``, ``attn_gcn``).

``mlgcn`` -- Chen, Wei, Wang, Guo, "Multi-Label Image Recognition with Graph Convolutional
Networks", CVPR 2019 (arXiv:1904.03582; official code github.com/megvii-research/ML-GCN).
The image gives one feature ``x`` by global max pooling of the last backbone map; the
label word vectors (300-d GloVe) go through a 2-layer GCN (300 -> 1024 -> D, LeakyReLU(0.2)
between, no bias) over the re-weighted co-occurrence graph (threshold tau=0.4, re-weight
p=0.2, symmetric normalisation), which outputs one classifier per class ``W [C, D]``;
logits ``= x W^T``. Paper recipe: ResNet-101, 448 px random crops + flips, multilabel
soft-margin loss (= mean BCE), SGD momentum 0.9, weight decay 1e-4, 100 epochs with the
learning rate divided by 10 every 40 epochs; the official code trains the GCN at lr 0.1
and the backbone at 0.1x that (``lrp``), batch 32, gradient-norm clip 10, decays every
parameter (biases and BatchNorm too: ``optim.decay_norm_and_bias=true``), keeps the epoch
with the best test mAP, and trains VOC's "difficult"-only labels as positives (mlic ignores
them). Published results: the ``mlgcn`` registry entry (``mlic models --paper``).

``attn_gcn`` -- seed 000, "Multi-Label Image Classification with Attention Mechanism and
Graph Convolutional Networks" (journal article; we have only its abstract). The abstract
fixes: ResNet features; an attention mechanism that makes one attention map per label
and "weighted features"; a GCN over a directed label graph that maps the label graph to
"inter-dependent object classifiers" (ML-GCN style); classification from "weighted fusion
features" of the ResNet output and the attention output. OUR reconstruction of the
unstated details (see DESIGN.md, "The seed systems"):

* attention: a 1x1 convolution ``D -> C`` without bias (a per-class bias is a constant
  over positions, which the softmax cancels) gives C maps, softmax over the h*w positions;
  the label feature ``f_c = sum_p a_cp F_p`` is the attention-weighted sum of the map.
  Computed through ``scaled_dot_product_attention`` with the conv kernels as the C queries
  (scale 1, so it is exactly the conv + softmax), explicitly only when the maps are asked;
* "weighted fusion": ``fused_c = alpha_c f_c + (1 - alpha_c) g`` with ``g`` the global
  max-pooled feature (ML-GCN's image feature) and ``alpha = sigmoid(gate)`` learnable,
  one per class by default (``gate="class"``; ``"scalar"`` shares one), initialised at
  0.5. A convex gate keeps the fused feature on the scale of the backbone features, so
  the GCN classifiers see inputs like ML-GCN's, and with alpha -> 0 the model *is* ML-GCN;
* graph and GCN exactly as ML-GCN (same classifier generator, same tau/p);
* ``logit_c = <W_c, fused_c>`` (no bias, as ML-GCN);
* training recipe: ML-GCN's (the abstract gives none). No published figure is recorded
  in the registry: the abstract gives none.

Choices that are OURS in both models, and ablations:

* the last graph convolution is initialised at zero, so the generated classifiers and the
  logits start at 0 (see ``GCNClassifierGenerator``; measured reason in its comment);
* ``adjacency="paper"`` (default, Eqs. 7-8) or ``"official"`` (the released ``gen_A``: column
  re-weighting with p = 0.25, self loop 1, transposed normalisation), see
  :func:`mlic.data.labels.mlgcn_adjacency`;
* ``attn_gcn(gcn=False)``: learnable classifiers instead of GCN-generated ones (the "without
  GCN" ablation);
* ``pool="max"`` (default, ML-GCN's global max pooling) or ``"avg"``. Max pooling suits
  ResNet's post-ReLU map; on a map without a final activation (EfficientNet's linear
  bottleneck) the per-channel maximum is mostly a vector common to every image (on real VOC
  photos through Lite0: norm 78 against a per-image part of 41; average pooling: 6 against
  28), which moves every GCN-generated logit together. ``mlgcn_demo`` (Lite0) uses
  ``"avg"`` (the recipe gives the measurement); ``attn_gcn``, whose attention features carry
  most of the signal, measured worse with it and keeps ``"max"``;
* with ASL, the classifiers that a shared GCN generates rise together (ASL's negatives push
  back weakly, and its probability shift stops pushing once they pass 1 - clip): the demo
  recipes of both models use ML-GCN's BCE (``configs/mlgcn_demo.yaml`` says what was measured).

Both models keep the adjacency and (when given) the word vectors as buffers set from the
training split's :class:`~mlic.data.labels.LabelSet`; without word vectors they learn the
label embeddings instead. ``return_attention=True`` gives, for ``mlgcn``, class activation
maps of the generated classifiers (each classifier applied at every position) and, for
``attn_gcn``, its softmax attention maps.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from mlic.errors import ConfigError
from mlic.models._base import MultiLabelModel
from mlic.models._layers import (
    ClassWiseAttention,
    GCNStack,
    GlobalPool,
    LabelEmbedding,
    label_graph,
)
from mlic.models._papers import PaperResult
from mlic.models._registry import register_model

__all__ = ["GCNClassifierGenerator", "LearnedClassifiers", "MLGCN", "AttnGCN"]

# The ML-GCN training recipe (paper, Sec. 4.1, and the official code's defaults).
_MLGCN_PAPER: dict[str, Any] = {
    "loss": "bce",
    "optimizer": "sgd",
    "lr": 0.1,
    "backbone_lr_mult": 0.1,
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "epochs": 100,
    "lr_schedule": "step: /10 every 40 epochs",
    "batch_size": 32,
    "grad_clip": 10.0,
    "augmentation": "random crop + horizontal flip",
}


class GCNClassifierGenerator(nn.Module):
    """ML-GCN's classifier generator: label embeddings -> GCN over the label graph -> ``W [C, D]``.

    Holds the label embeddings (a word-vector buffer, or learnable without word vectors),
    the ML-GCN adjacency as the ``adjacency`` buffer (``labels.mlgcn_adjacency(tau, p,
    adjacency)``: ``"paper"`` Eqs. 7-8 or ``"official"`` the released ``gen_A``; an identity
    placeholder when ``labels`` is None, filled by the checkpoint) and the 2-layer GCN
    ``word_dim -> hidden_dim -> out_dim`` with LeakyReLU between.
    """

    def __init__(
        self,
        num_classes: int,
        out_dim: int,
        labels: Any | None = None,
        hidden_dim: int = 1024,
        word_dim: int = 300,
        learn_word_vectors: bool | None = None,
        tau: float = 0.4,
        p: float = 0.2,
        negative_slope: float = 0.2,
        adjacency: str = "paper",
    ) -> None:
        super().__init__()
        self.embedding = LabelEmbedding(num_classes, labels, word_dim, learn_word_vectors)
        self.register_buffer(
            "adjacency", label_graph(labels, num_classes, "mlgcn", tau, p, adjacency)
        )
        self.gcn = GCNStack((self.embedding.dim, hidden_dim, out_dim), negative_slope)
        # OURS: the last graph convolution starts at zero, so the generated classifiers and
        # the logits start at 0 (as a zero-initialised linear head); with the default init
        # most negatives start at p > 0.999, where ASL has no gradient (BENCHMARKS.md 9.2).
        nn.init.zeros_(self.gcn.layers[-1].linear.weight)

    @property
    def rebuild_kwargs(self) -> dict[str, Any]:
        """Embedding size and kind, so a checkpoint rebuilds identical shapes without labels."""
        return self.embedding.rebuild_kwargs

    def forward(self) -> torch.Tensor:
        words = self.embedding()  # [C, word_dim]
        return self.gcn(words, self.adjacency)  # [C, D]


class LearnedClassifiers(nn.Module):
    """Plain learnable per-class classifiers ``W [C, D]`` (``nn.Linear``'s initialisation):
    the "without GCN" ablation of a GCN-generated classifier head."""

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        bound = dim**-0.5
        self.weight = nn.Parameter(torch.empty(num_classes, dim).uniform_(-bound, bound))

    def forward(self) -> torch.Tensor:
        return self.weight  # [C, D]


class MLGCN(MultiLabelModel):
    """ML-GCN: global max pooling of the last map, classifiers generated by a GCN."""

    paper = _MLGCN_PAPER

    def __init__(
        self,
        num_classes: int,
        labels: Any | None = None,
        backbone: str = "resnet101",
        pretrained: bool | str = False,
        hidden_dim: int = 1024,
        word_dim: int = 300,
        learn_word_vectors: bool | None = None,
        tau: float = 0.4,
        p: float = 0.2,
        negative_slope: float = 0.2,
        adjacency: str = "paper",
        pool: str = "max",
        drop_path_rate: float = 0.0,
    ) -> None:
        """``pool``: the image feature by global ``"max"`` pooling (ML-GCN) or ``"avg"``."""
        super().__init__(num_classes, backbone, pretrained, (-1,), drop_path_rate)
        self.pool = GlobalPool(pool)
        self.classifiers = GCNClassifierGenerator(
            num_classes,
            self.backbone.channels[-1],
            labels,
            hidden_dim=hidden_dim,
            word_dim=word_dim,
            learn_word_vectors=learn_word_vectors,
            tau=tau,
            p=p,
            negative_slope=negative_slope,
            adjacency=adjacency,
        )
        self.rebuild_kwargs = self.classifiers.rebuild_kwargs

    def forward_head(
        self, features: list[torch.Tensor], return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        x = features[-1]  # [B, D, h, w]
        pooled = self.pool(x)  # [B, D]
        weight = self.classifiers()  # [C, D]
        logits = pooled @ weight.t()  # [B, C]
        if not return_attention:
            return logits
        cam = torch.einsum("bdhw,cd->bchw", x, weight)  # [B, C, h, w]
        return logits, cam


class AttnGCN(MultiLabelModel):
    """Class-wise spatial attention features, gated with the max-pooled feature, scored by GCN classifiers."""

    paper = {**_MLGCN_PAPER, "note": "seed 000 gives no recipe; ML-GCN's is used (ours)"}

    def __init__(
        self,
        num_classes: int,
        labels: Any | None = None,
        backbone: str = "resnet101",
        pretrained: bool | str = False,
        hidden_dim: int = 1024,
        word_dim: int = 300,
        learn_word_vectors: bool | None = None,
        tau: float = 0.4,
        p: float = 0.2,
        negative_slope: float = 0.2,
        gate: str = "class",
        gate_init: float = 0.0,
        adjacency: str = "paper",
        gcn: bool = True,
        pool: str = "max",
        drop_path_rate: float = 0.0,
    ) -> None:
        """``gcn=False`` is the "without GCN" ablation: learnable classifiers replace the
        GCN-generated ones (no word vectors, no graph). ``pool``: the global feature by
        ``"max"`` pooling (ML-GCN) or ``"avg"``."""
        super().__init__(num_classes, backbone, pretrained, (-1,), drop_path_rate)
        self.pool = GlobalPool(pool)
        if gate not in ("class", "scalar"):
            raise ConfigError(f"attn_gcn gate={gate!r}: choose 'class' (one per class) or 'scalar'")
        channels = self.backbone.channels[-1]
        # 1x1 conv -> one spatial attention map per class -> attention-pooled label features
        self.attention = ClassWiseAttention(channels, num_classes)
        # fusion weight alpha = sigmoid(gate): per class, or one shared scalar
        self.gate = nn.Parameter(torch.full((num_classes if gate == "class" else 1,), gate_init))
        if not gcn:
            self.classifiers: nn.Module = LearnedClassifiers(num_classes, channels)
            return
        self.classifiers = GCNClassifierGenerator(
            num_classes,
            channels,
            labels,
            hidden_dim=hidden_dim,
            word_dim=word_dim,
            learn_word_vectors=learn_word_vectors,
            tau=tau,
            p=p,
            negative_slope=negative_slope,
            adjacency=adjacency,
        )
        self.rebuild_kwargs = self.classifiers.rebuild_kwargs

    @property
    def fusion_weight(self) -> torch.Tensor:
        """alpha in (0, 1): the share of the attention feature in the fused feature, [C] or [1]."""
        return torch.sigmoid(self.gate)

    def forward_head(
        self, features: list[torch.Tensor], return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        x = features[-1]  # [B, D, h, w]
        local, maps = self.attention(x, need_weights=return_attention)  # [B, C, D], [B, C, h, w]
        glob = self.pool(x)  # [B, D]
        alpha = self.fusion_weight.unsqueeze(-1)  # [C or 1, 1]
        fused = alpha * local + (1.0 - alpha) * glob.unsqueeze(1)  # [B, C, D]
        weight = self.classifiers()  # [C, D]
        logits = (fused * weight).sum(dim=-1)  # [B, C]
        if maps is None:
            return logits
        return logits, maps  # [B, C, h, w]


_MLGCN_SOURCE = "ML-GCN (Chen et al., CVPR 2019, arXiv:1904.03582)"
_MLGCN_SELECTION = "the epoch with the best test mAP (official code)"
MLGCN_PUBLISHED = (
    PaperResult(
        "coco2014",
        83.0,
        f"{_MLGCN_SOURCE}, Table 1 and the official README",
        CF1=78.0,
        OF1=80.3,
        epochs=100,
        selection=_MLGCN_SELECTION,
    ),
    PaperResult(
        "voc2007",
        94.0,
        f"{_MLGCN_SOURCE}, Table 2 and the official README",
        epochs=100,
        selection=_MLGCN_SELECTION,
    ),
)


@register_model(published=MLGCN_PUBLISHED)
def mlgcn(num_classes: int, labels=None, **kwargs) -> MLGCN:
    """ML-GCN (Chen et al., CVPR 2019): GMP image feature x GCN-generated classifiers."""
    return MLGCN(num_classes, labels=labels, **kwargs)


@register_model
def attn_gcn(num_classes: int, labels=None, **kwargs) -> AttnGCN:
    """Seed 000: class-wise attention features fused with GMP, GCN-generated classifiers."""
    return AttnGCN(num_classes, labels=labels, **kwargs)
