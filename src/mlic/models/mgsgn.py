"""MGSGN: Multi-scale Global-local Semantic Graph Network (``mgsgn``).

Seed 002: Kuang, Zhu, Li, "Multi-Label Image Classification with Multi-Scale Global-Local
Semantic Graph Network", ECML-PKDD 2023 (doi:10.1007/978-3-031-43418-1_4). We have only its
abstract, which fixes three parts:

* *multi-scale feature reconstruction*: cross-layer attention aggregates complementary
  information from different CNN levels;
* *channel dual-branch cross-attention*: relates the global information and the local
  features of the multi-scale feature and fuses them by "adaptive cross-fusion";
* *multi-perspective dynamic semantic representation*: a multi-perspective weighted cosine
  measure builds content-based label dependencies for each image, a dynamic semantic graph
  (combined with label-dependency modelling by a GCN).

Everything else is OUR reconstruction (DESIGN.md, "The seed systems"), from the works this
line of papers builds on (ML-GCN, Chen et al. CVPR 2019; ADD-GCN, Ye et al. ECCV 2020;
SE/GCNet channel gating):

* levels = ResNet layer2, layer3, layer4 (``out_indices=(-3, -2, -1)``), each projected to
  ``dim`` by 1x1 conv + BN + ReLU. Cross-layer attention: every level is resampled to the
  resolution of the middle level (layer3, 28x28 at 448 px; bilinear up, adaptive average
  pooling down), a 1x1 conv on their concatenation gives one score per level and position,
  softmax over the levels, weighted sum -> one multi-scale map [B, d, h, w]. OURS: the
  target resolution (the middle level keeps small objects resolvable at a moderate cost)
  and the per-position softmax over levels;
* channel dual-branch cross-attention, OURS, in two readings (``dual_branch``). The
  default, ``spatial``: global-to-local *spatial* cross-attention, the pooled context as the
  query over the positions, gating each position (``GlobalLocalSpatialCrossAttention``), so
  the global context changes where the label attention below looks. The earlier reading,
  ``channel``, follows; its global branch is a context vector added at every position, which
  cancels in the class-attention softmax (a per-class constant over positions) and so cannot
  help localise -- it is kept for comparison. ``channel``: global branch ``g = GAP(F)`` [B, d], local
  branch ``F`` [B, d, h, w]. Global -> local: an SE-style channel gate computed from ``g``
  re-weights the local map's channels; local -> global: a channel gate computed from the
  local branch's peak responses (global max pooling, the most salient local evidence)
  re-weights ``g``. Adaptive cross-fusion: ``w = softmax(2 learnable scalars)`` and
  ``out = w_0 * local' + w_1 * g'`` (``g'`` broadcast over positions), so every label
  feature below receives the gated global context;
* label features by class-wise attention (1x1 conv -> C maps, softmax over positions,
  attention pooling, as ADD-GCN's semantic attention): V [B, C, d]; these are the maps
  of ``return_attention=True``;
* dynamic graph (the abstract's weighted cosine, our parametrisation): K learnable
  perspectives ``P_k`` (one linear ``d -> perspective_dim`` each, K=``num_perspectives``,
  default 4), ``A_dyn[b]_ij = sum_k w_k cos(P_k v_i, P_k v_j)`` with ``w = softmax`` of K
  learnable scalars (so the weights sum to 1 and A_dyn is symmetric with unit diagonal).
  OURS: (a) the projected label vectors are centred over the C labels of the image before
  the cosine (``center_graph=True``; a Pearson correlation across label nodes). The label
  features of one image are attention poolings of the same non-negative map and share a
  large common component: their plain cosine is > 0.999 for every pair (measured at init
  on both test backbones), which would make the "dynamic" graph a uniform all-to-all
  average; centring keeps only what distinguishes the labels. The perspectives are
  therefore bias-free linears (a bias cancels in the centring). (b) negative similarities
  are cut by ReLU and the graph is symmetrically normalised ``D^-1/2 A D^-1/2`` (keeps it
  symmetric, unlike a row softmax; the unit diagonal makes every degree >= 1);
* static graph: the ML-GCN re-weighted co-occurrence graph of the training split
  (``label_graph(labels, C, "mlgcn", tau, p)``, buffer ``static_adjacency``). OURS: the
  graph used is the convex mix ``s * A_static + (1 - s) * A_dyn`` with ``s = sigmoid`` of a
  learnable scalar (starts at 0.5), rather than ADD-GCN's static-then-dynamic sequence;
* GCN: 2 layers ``d -> gcn_hidden -> d`` (``GCNStack``: ML-GCN's bias-free graph
  convolutions, LeakyReLU 0.2 between) on the per-image graph; OURS: residual ``Z = V +
  GCN(V)`` so the graph refines rather than replaces the visual label features;
* one linear classifier per class on Z (``ClassWiseLinear``);
* training recipe: the abstract gives none. OURS: ML-GCN's (SGD momentum 0.9, weight
  decay 1e-4 on every parameter, head lr 0.1 with the backbone at 0.1x, BCE, 448 px random
  crops + flips, batch 32, gradient-norm clip 10), with a cosine schedule over 50 epochs.

Ablation switches, one per module the abstract names (each removes exactly that module):

* ``cross_layer=False``: no multi-scale reconstruction; the deepest level alone, projected
  to ``dim`` by the same 1x1 conv + BN + ReLU (its map is layer4's grid, 14x14 at 448 px);
* ``dual_branch="none"``: no channel dual-branch cross-attention (the identity);
* ``dynamic_graph=False``: the static co-occurrence graph alone (no perspectives, no mix);
* ``static_graph=False``: the dynamic graph alone (no co-occurrence buffer, no mix);
  with both graphs off the GCN goes too and the classifiers read the label features V.

No published figure is recorded in the registry: the abstract gives none and does not name
its two data sets (``mlic models --paper``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from mlic.errors import ConfigError
from mlic.models._base import MultiLabelModel
from mlic.models._layers import ClassWiseAttention, ClassWiseLinear, GCNStack, label_graph
from mlic.models._registry import register_model

__all__ = [
    "MGSGN",
    "CrossLayerAttention",
    "ChannelDualCrossAttention",
    "GlobalLocalSpatialCrossAttention",
    "MultiPerspectiveGraph",
]

# OUR training recipe (the abstract gives none): ML-GCN's, see module docstring.
_PAPER: dict[str, Any] = {
    "loss": "bce",
    "optimizer": "sgd",
    "lr": 0.1,
    "backbone_lr_mult": 0.1,
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "epochs": 50,
    "lr_schedule": "cosine",
    "batch_size": 32,
    "grad_clip": 10.0,
    "augmentation": "random crop + horizontal flip",
    "source": "abstract only; recipe is ours (ML-GCN)",
}


def _conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class CrossLayerAttention(nn.Module):
    """Multi-scale reconstruction: project L levels to ``dim``, resample to the middle one, mix.

    Per position, a 1x1 conv on the concatenated levels scores each level; softmax over the
    levels gives weights [B, L, h, w] that sum to 1; the output is the weighted sum.
    """

    def __init__(self, in_channels: list[int], dim: int) -> None:
        super().__init__()
        self.proj = nn.ModuleList(_conv_bn_relu(c, dim) for c in in_channels)
        self.score = nn.Conv2d(len(in_channels) * dim, len(in_channels), kernel_size=1)
        self.target = len(in_channels) // 2

    def forward(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        # features: L maps [B, C_l, h_l, w_l] -> fused [B, d, h, w], level weights [B, L, h, w]
        size = features[self.target].shape[-2:]
        levels = []
        for proj, f in zip(self.proj, features, strict=True):
            x = proj(f)  # [B, d, h_l, w_l]
            if x.shape[-2:] != size:
                if x.shape[-2] > size[0]:
                    x = F.adaptive_avg_pool2d(x, size)  # [B, d, h, w]
                else:
                    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            levels.append(x)
        weights = torch.softmax(self.score(torch.cat(levels, dim=1)), dim=1)  # [B, L, h, w]
        stacked = torch.stack(levels, dim=1)  # [B, L, d, h, w]
        return (weights.unsqueeze(2) * stacked).sum(dim=1), weights  # [B, d, h, w]


def _mlp(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim))


class _GlobalLocalFusion(nn.Module):
    """What both dual-branch readings share: the local -> global channel gate computed from
    the local branch's peaks (global max pooling) and the adaptive cross-fusion
    ``softmax(alpha)_0 * local' + softmax(alpha)_1 * g'``."""

    def __init__(self, dim: int, reduction: int) -> None:
        super().__init__()
        self.hidden = max(dim // reduction, 1)
        self.local_to_global = _mlp(dim, self.hidden)
        self.fusion_logits = nn.Parameter(torch.zeros(2))

    @property
    def fusion_weights(self) -> torch.Tensor:
        return torch.softmax(self.fusion_logits, dim=0)  # [2]

    def fuse(self, x: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """``x`` the input map, ``local`` its global-gated version, both [B, d, h, w]."""
        g = x.mean(dim=(2, 3))  # [B, d] global branch
        glob = g * torch.sigmoid(self.local_to_global(x.amax(dim=(2, 3))))  # [B, d]
        w = self.fusion_weights.to(x.dtype)  # [2]
        return w[0] * local + w[1] * glob[:, :, None, None]  # [B, d, h, w]


class ChannelDualCrossAttention(_GlobalLocalFusion):
    """Global <-> local channel gating between the pooled and the per-position branch.

    global -> local: ``local' = F * sigmoid(MLP_g(GAP F))`` (channel gate from the context);
    local -> global: ``g' = GAP F * sigmoid(MLP_l(GMP F))`` (channel gate from local peaks);
    fusion: ``softmax(alpha)_0 * local' + softmax(alpha)_1 * g'``.
    """

    def __init__(self, dim: int, reduction: int = 4) -> None:
        super().__init__(dim, reduction)
        self.global_to_local = _mlp(dim, self.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, d, h, w] -> [B, d, h, w]
        gate = torch.sigmoid(self.global_to_local(x.mean(dim=(2, 3))))  # [B, d]
        return self.fuse(x, x * gate[:, :, None, None])


class GlobalLocalSpatialCrossAttention(_GlobalLocalFusion):
    """Dual-branch cross-attention in which the global context reweights *positions*.

    global -> local (spatial cross-attention): the pooled feature ``g`` is the query, every
    position ``x_p`` a key, and the scaled score ``s_p = <W_q g, W_k x_p> / sqrt(d_k)``
    gates that position, ``local'_p = x_p * (1 + tanh(s_p))`` (in (0, 2); ``W_q`` starts at 0,
    so the gate starts at 1 and the module at the identity); local -> global as in
    :class:`ChannelDualCrossAttention` (a channel gate on ``g`` from the local peaks); the same
    adaptive fusion. Unlike a context vector added at every position, a per-position gate
    changes where the class-wise attention looks: its scores are linear in the features, so a
    gate ``1 + tanh(s_p)`` rescales position p's score and moves the softmax.
    """

    def __init__(self, dim: int, reduction: int = 4, key_dim: int = 64) -> None:
        super().__init__(dim, reduction)
        self.query = nn.Linear(dim, key_dim, bias=False)
        self.key = nn.Conv2d(dim, key_dim, kernel_size=1, bias=False)
        nn.init.zeros_(self.query.weight)

    def spatial_gate(self, x: torch.Tensor) -> torch.Tensor:
        """The global-to-local gate per position [B, 1, h, w], in (0, 2)."""
        q = self.query(x.mean(dim=(2, 3)))  # [B, d_k]
        k = self.key(x)  # [B, d_k, h, w]
        score = torch.einsum("bk,bkhw->bhw", q, k) * q.shape[-1] ** -0.5  # [B, h, w]
        return (1.0 + torch.tanh(score)).unsqueeze(1)  # [B, 1, h, w]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, d, h, w] -> [B, d, h, w]
        return self.fuse(x, x * self.spatial_gate(x))


DUAL_BRANCH = ("spatial", "channel", "none")


class DeepestLevel(nn.Module):
    """The ``cross_layer=False`` ablation: the deepest backbone map alone, projected to ``dim``
    (the projection :class:`CrossLayerAttention` applies to that level), one level weight."""

    def __init__(self, in_channels: int, dim: int) -> None:
        super().__init__()
        self.proj = _conv_bn_relu(in_channels, dim)

    def forward(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        # features: [..., [B, C_L, h, w]] -> [B, d, h, w], level weights [B, 1, h, w] (all 1)
        x = self.proj(features[-1])  # [B, d, h, w]
        return x, x.new_ones(x.shape[0], 1, *x.shape[-2:])


class MultiPerspectiveGraph(nn.Module):
    """Per-image label graph from a weighted multi-perspective cosine similarity.

    ``A_ij = sum_k w_k cos(P_k v_i, P_k v_j)``, K perspectives ``P_k: d -> d'`` (one bias-free
    linear producing all K at once), ``w = softmax(omega)``. With ``center`` the projected
    vectors are centred over the labels of the image first (see the module docstring).
    """

    def __init__(
        self,
        dim: int,
        num_perspectives: int = 4,
        perspective_dim: int = 256,
        center: bool = True,
    ) -> None:
        super().__init__()
        self.k = num_perspectives
        self.center = center
        self.perspectives = nn.Linear(dim, num_perspectives * perspective_dim, bias=False)
        self.omega = nn.Parameter(torch.zeros(num_perspectives))

    @property
    def perspective_weights(self) -> torch.Tensor:
        return torch.softmax(self.omega, dim=0)  # [K]

    def similarity(self, v: torch.Tensor) -> torch.Tensor:
        """The raw weighted cosine graph [B, C, C] (symmetric, unit diagonal)."""
        b, c, _ = v.shape
        u = self.perspectives(v).view(b, c, self.k, -1).transpose(1, 2)  # [B, K, C, d']
        if self.center:
            u = u - u.mean(dim=2, keepdim=True)  # [B, K, C, d'], centred over the labels
        u = F.normalize(u, dim=-1)  # [B, K, C, d']
        cos = u @ u.transpose(-2, -1)  # [B, K, C, C]
        w = self.perspective_weights.to(cos.dtype)  # [K]
        return torch.einsum("k,bkij->bij", w, cos)  # [B, C, C]

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        # v: [B, C, d] label features -> normalised dynamic graph [B, C, C]
        a = torch.relu(self.similarity(v))  # [B, C, C]
        inv = a.sum(dim=-1).clamp_min(1e-6).rsqrt()  # [B, C]
        return inv[:, :, None] * a * inv[:, None, :]  # [B, C, C]


class MGSGN(MultiLabelModel):
    """Cross-layer fusion -> global/local channel cross-attention -> label features -> graph -> logits."""

    paper = _PAPER

    def __init__(
        self,
        num_classes: int,
        labels: Any | None = None,
        backbone: str = "resnet101",
        pretrained: bool | str = False,
        dim: int = 512,
        gcn_hidden: int = 1024,
        num_perspectives: int = 4,
        perspective_dim: int = 256,
        center_graph: bool = True,
        channel_reduction: int = 4,
        tau: float = 0.4,
        p: float = 0.2,
        adjacency: str = "paper",
        dual_branch: str = "spatial",
        cross_layer: bool = True,
        dynamic_graph: bool = True,
        static_graph: bool = True,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        """``dual_branch``: ``spatial`` (default) is :class:`GlobalLocalSpatialCrossAttention`,
        where the global context reweights positions; ``channel`` the earlier reading
        (:class:`ChannelDualCrossAttention`), whose global branch is constant over positions;
        ``none`` removes the module. ``cross_layer``, ``dynamic_graph``, ``static_graph``:
        False removes that module (the ablations, see the module docstring)."""
        levels = (-3, -2, -1) if cross_layer else (-1,)
        super().__init__(num_classes, backbone, pretrained, levels, drop_path_rate)
        if dual_branch not in DUAL_BRANCH:
            raise ConfigError(f"dual_branch={dual_branch!r}: choose one of {list(DUAL_BRANCH)}")
        self.cross_layer: nn.Module = (
            CrossLayerAttention(self.backbone.channels, dim)
            if cross_layer
            else DeepestLevel(self.backbone.channels[-1], dim)
        )
        branches = {
            "spatial": lambda: GlobalLocalSpatialCrossAttention(dim, channel_reduction),
            "channel": lambda: ChannelDualCrossAttention(dim, channel_reduction),
            "none": nn.Identity,
        }
        self.dual_branch: nn.Module = branches[dual_branch]()
        self.class_attention = ClassWiseAttention(dim, num_classes)
        self.dynamic_graph = (
            MultiPerspectiveGraph(dim, num_perspectives, perspective_dim, center_graph)
            if dynamic_graph
            else None
        )
        static = label_graph(labels, num_classes, "mlgcn", tau, p, adjacency)
        self.register_buffer("static_adjacency", static if static_graph else None)
        # the learnable static/dynamic mix exists only when there are two graphs to mix
        both = dynamic_graph and static_graph
        self.mix_logit = nn.Parameter(torch.zeros(1)) if both else None
        has_graph = dynamic_graph or static_graph
        self.gcn = GCNStack((dim, gcn_hidden, dim)) if has_graph else None
        self.dropout = nn.Dropout(drop_rate)
        self.classifier = ClassWiseLinear(num_classes, dim)

    def adjacency(self, v: torch.Tensor) -> torch.Tensor:
        """The graph the GCN uses: the mix of the static and the dynamic graph [B, C, C], or
        the one graph an ablation keeps ([C, C] static, [B, C, C] dynamic)."""
        if self.dynamic_graph is None:
            return self.static_adjacency.to(v.dtype)  # [C, C]
        dyn = self.dynamic_graph(v)  # [B, C, C]
        if self.static_adjacency is None:
            return dyn
        s = torch.sigmoid(self.mix_logit).to(v.dtype)  # [1]
        return s * self.static_adjacency.to(v.dtype) + (1.0 - s) * dyn  # [B, C, C]

    def forward_head(
        self, features: list[torch.Tensor], return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        x, _ = self.cross_layer(features)  # [B, d, h, w]
        x = self.dual_branch(x)  # [B, d, h, w]
        v, maps = self.class_attention(x, need_weights=return_attention)  # [B, C, d]
        z = v if self.gcn is None else v + self.gcn(v, self.adjacency(v))  # [B, C, d]
        logits = self.classifier(self.dropout(z))  # [B, C]
        if not return_attention:
            return logits
        return logits, maps


@register_model
def mgsgn(num_classes: int, labels=None, **kwargs) -> MGSGN:
    """MGSGN (seed 002, reconstruction): cross-layer + global/local attention + dynamic graph GCN."""
    return MGSGN(num_classes, labels=labels, **kwargs)
