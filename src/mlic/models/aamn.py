"""AAMN: Attention-Augmented Memory Network (``aamn``).

Seed 001: Zhou, Hou, Chen, Hu, Su, "Attention-Augmented Memory Network for Image Multi-Label
Classification", ACM TOMM 2023 (doi:10.1145/3570166). We have only its abstract and reference
list. The abstract fixes three modules on CNN features:

* a *channel-relation exploration* module that captures inter-channel relationships;
* a *spatial-relation enhancement* module that models second-order statistics of the
  features and long-range dependencies between pixels;
* a *categorical memory* module that stores contextual information of every category
  gathered from the dataset and uses it to augment the current input feature.

Everything below that is not in that list is OUR reconstruction (DESIGN.md, "The seed
systems"), taken from the works the paper cites:

* channel relations = DANet's channel attention module (Fu et al., CVPR 2019, ref. [15]):
  affinity ``X X^T`` between the channel maps [B, D, D], softmax per row, ``gamma_c *
  (attn @ X) + X`` with ``gamma_c`` learnable and initialised at 0 so the module starts as
  the identity and cannot disturb the pretrained features early on. OURS: the affinity is
  scaled by ``1/sqrt(h*w)`` (the attention convention, via ``scaled_dot_product_attention``)
  instead of DANet's ``max - energy`` trick, which keeps the softmax out of saturation
  without inverting the affinity;
* spatial relations = DANet's position attention / non-local block (refs. [15], [46]), the
  "second-order" affinity between all pairs of pixels [B, N, N] (the pairwise products
  are second-order statistics of the features, cf. second-order pooling, refs. [3], [74]):
  1x1 query/key projections to ``D/spatial_reduction``, a 1x1 value projection, softmax
  over positions, ``gamma_s * out + X`` with ``gamma_s`` initialised at 0. OURS: the two
  relation modules run in sequence (channel, then spatial) rather than DANet's parallel sum,
  so the spatial affinity is computed on channel-enhanced features;
* the backbone's last map is first reduced to ``dim`` channels (1x1 conv + BN + ReLU;
  ``dim=None`` keeps the backbone width). OURS, to keep the D x D channel affinity and the
  memory small (2048 -> 512 at ResNet-101);
* label features by class-wise attention (1x1 conv -> C maps, softmax over positions,
  attention pooling; refs. [11], [5], [71]): f [B, C, d]. These maps are the ones returned
  by ``return_attention=True``;
* categorical memory = Categorical Memory Networks (Deng et al. 2020, ref. [10]) applied
  per label: a persistent buffer ``memory`` [C, d] with one prototype per class. OURS: the
  prototype of class c is the running (momentum ``memory_momentum``, default 0.9) mean of
  the class-c label features ``f_c`` of the *training* images in which c is present
  (target 1; targets 0 and -1 do not contribute), set directly on the first batch that
  contains the class (``initialized`` buffer) so no prototype drifts up from zero.
  The update runs only in training, outside autograd, from the detached label features of
  the last training forward (see "Training hook" below). Reading: every label feature
  queries the C prototypes by scaled dot-product attention, ``r_c = softmax(W_q f_c M^T /
  sqrt(d)) M`` (a learned query projection, the prototypes themselves as keys and values, so
  the read vector lives in the feature space); the classifier sees ``[f_c, r_c]``
  concatenated (CMN combines the original and the response feature the same way).
  Prototypes of classes that have not yet had a positive training image are still zero;
  they are masked out of the read (they would otherwise draw attention weight and pull
  every read vector towards 0);
* one linear classifier per class on ``[f_c, r_c]`` (``ClassWiseLinear``);
* training recipe: the abstract gives none. OURS: the Q2L/ASL recipe of the transformer
  peers AAMN compares with (refs. [34], [38]): ASL (gamma- 4, gamma+ 0, clip 0.05), AdamW
  lr 1e-4, RandAugment + Cutout, 448 px, 40 epochs.

Training hook: ``forward(images)`` cannot see the targets, so in training mode it caches the
detached label features; the trainer calls ``model.on_train_batch_end(targets)`` after the
backward pass, which moves the memory. Eval-mode forwards and forwards without that call
never change the memory. Under DDP the per-class sums and counts are all-reduced first so
every rank applies the same update. The memory is a persistent buffer: it is saved with the
checkpoint and averaged by the trainer's EMA like any buffer.

Under EMA (OURS): ``initialized`` is a float weight (1 once a class was seen, 0 before), not a
boolean, and the read uses ``memory / initialized``. timm's EMA averages both floats alike,
so in the EMA copy a class first seen at step t0 has ``memory = sum_t w_t m_t`` and
``initialized = sum_t w_t`` over the steps since t0: their ratio is the weighted average of
the live prototypes since t0, exact from the first update on. (A boolean mask is copied, not
averaged, and would unmask a prototype that is only ``(1 - decay)`` of its value.)

No published figure is recorded in the registry: the abstract names COCO 2014, VOC 2007 and
VG-500 but gives no numbers (``mlic models --paper``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from mlic.errors import ConfigError
from mlic.models._base import MultiLabelModel
from mlic.models._layers import ClassWiseAttention, ClassWiseLinear
from mlic.models._papers import PaperResult
from mlic.models._registry import register_model

__all__ = ["AAMN", "ChannelRelation", "SpatialRelation", "CategoricalMemory", "AAMN_PUBLISHED"]

_SEED = "seed 001 (Zhou et al., ACM TOMM 2023): the abstract names this data set, gives no figure"
AAMN_PUBLISHED = tuple(
    PaperResult(d, None, _SEED, input_size=None, backbone="not in the abstract", weights=None)
    for d in ("coco2014", "voc2007", "vg500")
)

# OUR training recipe (the abstract gives none): the Q2L / ASL settings, see module docstring.
_PAPER: dict[str, Any] = {
    "loss": "asl",
    "gamma_neg": 4.0,
    "gamma_pos": 0.0,
    "optimizer": "adamw",
    "lr": 1e-4,
    "weight_decay": 1e-4,
    "epochs": 40,
    "batch_size": 32,
    "augmentation": "randaugment + cutout + horizontal flip",
    "source": "abstract only; recipe is ours (Q2L/ASL)",
}


class ChannelRelation(nn.Module):
    """Channel-relation exploration: DANet channel attention with a zero-initialised residual.

    ``attn = softmax(X X^T / sqrt(N))`` over the D channel maps (each flattened to N = h*w
    values), ``out = gamma * (attn @ X) + X``. No projections: the affinity is between the
    channels themselves. ``gamma`` starts at 0, so the module is the identity at init.
    """

    def __init__(self) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """The channel attention rows [B, D, D] (each sums to 1), computed explicitly."""
        flat = x.flatten(2)  # [B, D, N]
        energy = flat @ flat.transpose(1, 2) * flat.shape[-1] ** -0.5  # [B, D, D]
        return torch.softmax(energy, dim=-1)  # [B, D, D]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, D, h, w] -> [B, D, h, w]
        flat = x.flatten(2).unsqueeze(1)  # [B, 1, D, N]: D tokens of N values
        out = F.scaled_dot_product_attention(flat, flat, flat)  # [B, 1, D, N]
        return self.gamma * out.view_as(x) + x  # [B, D, h, w]


class SpatialRelation(nn.Module):
    """Spatial-relation enhancement: pixel-pair (second-order) affinity, DANet position attention.

    ``q, k = W_q X, W_k X`` (1x1 convs to ``D / reduction``), ``v = W_v X``; every position
    attends over all positions, ``out = gamma * softmax(q^T k / sqrt(d_k)) v + X`` with
    ``gamma`` initialised at 0 (identity at init).
    """

    def __init__(self, dim: int, reduction: int = 8) -> None:
        super().__init__()
        inner = max(dim // reduction, 1)
        self.query = nn.Conv2d(dim, inner, kernel_size=1)
        self.key = nn.Conv2d(dim, inner, kernel_size=1)
        self.value = nn.Conv2d(dim, dim, kernel_size=1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """The position affinity [B, N, N] (rows sum to 1), computed explicitly."""
        q = self.query(x).flatten(2).transpose(1, 2)  # [B, N, d_k]
        k = self.key(x).flatten(2)  # [B, d_k, N]
        return torch.softmax(q @ k * q.shape[-1] ** -0.5, dim=-1)  # [B, N, N]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, D, h, w] -> [B, D, h, w]
        q = self.query(x).flatten(2).transpose(1, 2).unsqueeze(1)  # [B, 1, N, d_k]
        k = self.key(x).flatten(2).transpose(1, 2).unsqueeze(1)  # [B, 1, N, d_k]
        v = self.value(x).flatten(2).transpose(1, 2).unsqueeze(1)  # [B, 1, N, D]
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # [B, N, D]
        out = out.transpose(1, 2).reshape_as(x)  # [B, D, h, w]
        return self.gamma * out + x  # [B, D, h, w]


# Additive attention-mask value of an unseen prototype: exp(-1e4) is 0 in every float type,
# and -1e4 stays finite in fp16 (where -inf rows would give NaN).
_MASKED = -1e4


class CategoricalMemory(nn.Module):
    """One prototype per class, moved by momentum from training features, read by attention.

    Buffers (persistent, so they travel with checkpoints): ``memory`` [C, D] and
    ``initialized`` [C], a float weight: 1 once the class was seen in a training batch, 0
    before (in an EMA copy, the averaged weight of the steps since; see the module
    docstring). The prototypes are ``memory / initialized`` where ``initialized > 0``.
    """

    def __init__(self, num_classes: int, dim: int, momentum: float = 0.9) -> None:
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ConfigError(f"memory momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        self.query = nn.Linear(dim, dim)
        self.register_buffer("memory", torch.zeros(num_classes, dim))
        # a float, so that an EMA of the module averages it with the memory (see above)
        self.register_buffer("initialized", torch.zeros(num_classes))

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        # checkpoints written before the weight was a float hold a boolean mask: same values
        key = prefix + "initialized"
        if key in state_dict and state_dict[key].dtype == torch.bool:
            state_dict[key] = state_dict[key].to(self.initialized.dtype)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def prototypes(self) -> torch.Tensor:
        """The class prototypes [C, D]: ``memory / initialized``, 0 for unseen classes.

        Exactly ``memory`` in the trained model (weights 1 or 0); in an EMA copy the weighted
        average of the live prototypes since each class was first seen.
        """
        weight = self.initialized.clamp_min(torch.finfo(self.memory.dtype).tiny)  # [C]
        return self.memory / weight[:, None]  # [C, D]

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        # feats: [B, C, D] label features -> read vectors [B, C, D]
        q = self.query(feats).unsqueeze(1)  # [B, 1, C, D]
        mem = self.prototypes().to(q.dtype).expand(q.shape[0], 1, -1, -1)  # [B, 1, C, D]
        # Prototypes of classes never seen in training are still zero: keep them out of the
        # read (an additive mask, not a branch, so export traces one graph). With no class
        # seen yet every slot is masked alike and the read is the mean of zeros, 0.
        unseen = ((self.initialized <= 0).to(q.dtype) * _MASKED).view(1, 1, 1, -1)  # [1, 1, 1, C]
        return F.scaled_dot_product_attention(q, mem, mem, attn_mask=unseen).squeeze(1)

    @torch.no_grad()
    def update(self, feats: torch.Tensor, targets: torch.Tensor) -> None:
        """Momentum update of the prototypes of the classes present (target 1) in the batch.

        feats: [B, C, D] label features (detached); targets: [B, C] of 1 / 0 / -1. Classes
        with no positive image keep their prototype; -1 (ignore) counts as not present.
        """
        present = (targets == 1).to(self.memory.dtype)  # [B, C]
        sums = torch.einsum("bc,bcd->cd", present, feats.to(self.memory.dtype))  # [C, D]
        counts = present.sum(dim=0)  # [C]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sums)
            dist.all_reduce(counts)
        seen = counts > 0  # [C]
        mean = sums / counts.clamp_min(1.0)[:, None]  # [C, D]
        m = torch.where(self.initialized > 0, self.momentum, 0.0).to(self.memory.dtype)  # [C]
        # from the prototypes, not the raw memory: a model loaded from an EMA checkpoint
        # holds weights below 1; a moved class has weight 1 again
        moved = m[:, None] * self.prototypes() + (1.0 - m[:, None]) * mean  # [C, D]
        self.memory.copy_(torch.where(seen[:, None], moved, self.memory))
        self.initialized.masked_fill_(seen, 1.0)


class AAMN(MultiLabelModel):
    """Channel relation -> spatial relation -> class-wise attention -> memory read -> classifiers."""

    paper = _PAPER

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet101",
        pretrained: bool | str = False,
        dim: int | None = 512,
        spatial_reduction: int = 8,
        memory_momentum: float = 0.9,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        channel_relation: bool = True,
        spatial_relation: bool = True,
        memory: bool = True,
    ) -> None:
        """``channel_relation``, ``spatial_relation``, ``memory``: False removes that module
        (the ablations of the three modules the abstract names); without the memory the
        classifier sees the label features alone."""
        super().__init__(num_classes, backbone, pretrained, (-1,), drop_path_rate)
        channels = self.backbone.channels[-1]
        if dim is None:
            dim = channels
            self.reduce: nn.Module = nn.Identity()
        else:
            self.reduce = nn.Sequential(
                nn.Conv2d(channels, dim, kernel_size=1, bias=False),
                nn.BatchNorm2d(dim),
                nn.ReLU(inplace=True),
            )
        self.dim = dim
        self.channel_relation = ChannelRelation() if channel_relation else nn.Identity()
        self.spatial_relation = (
            SpatialRelation(dim, spatial_reduction) if spatial_relation else nn.Identity()
        )
        self.class_attention = ClassWiseAttention(dim, num_classes)
        self.memory = CategoricalMemory(num_classes, dim, memory_momentum) if memory else None
        self.dropout = nn.Dropout(drop_rate)
        self.classifier = ClassWiseLinear(num_classes, 2 * dim if memory else dim)
        self._last_label_features: torch.Tensor | None = None

    def enhance(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone map -> reduced, channel- then spatially-enhanced map [B, d, h, w]."""
        x = self.reduce(x)  # [B, d, h, w]
        x = self.channel_relation(x)  # [B, d, h, w]
        return self.spatial_relation(x)  # [B, d, h, w]

    def forward_head(
        self, features: list[torch.Tensor], return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        x = self.enhance(features[-1])  # [B, d, h, w]
        feats, maps = self.class_attention(x, need_weights=return_attention)  # [B, C, d]
        if self.memory is None:
            fused = feats  # [B, C, d]
        else:
            if self.training:
                self._last_label_features = feats.detach()  # [B, C, d], for on_train_batch_end
            read = self.memory(feats)  # [B, C, d]
            fused = torch.cat((feats, read), dim=-1)  # [B, C, 2d]
        logits = self.classifier(self.dropout(fused))  # [B, C]
        if not return_attention:
            return logits
        return logits, maps

    @torch.no_grad()
    def on_train_batch_end(self, targets: torch.Tensor) -> None:
        """Trainer hook after each training batch: move the categorical memory.

        Uses the label features cached by the last training-mode forward; a no-op in eval
        mode or when no training forward happened since the last call.
        """
        feats, self._last_label_features = self._last_label_features, None
        if feats is None or not self.training or self.memory is None:
            return
        self.memory.update(feats, targets.to(feats.device))


@register_model(published=AAMN_PUBLISHED)
def aamn(num_classes: int, labels=None, **kwargs) -> AAMN:
    """AAMN (seed 001, reconstruction): DANet channel/position relations + categorical memory."""
    return AAMN(num_classes, **kwargs)
