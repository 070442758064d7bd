"""MSFormer: three-branch multi-scale Transformer for multi-label classification.

Zhong, Lin, Du and Shi, "Multi-Scale Feature Fusion and Advanced Representation Learning for
Multi Label Image Classification", Computers, Materials & Continua 82(3), 2025
(doi:10.32604/cmc.2025.059102; seed 003, the full paper).

Pipeline (Sections 3.1-3.6 and 4.3 of the paper; sizes for ResNet-101 at 448 px):

1. Multi-scale features (Eq. 1): ``x1 = Conv1x1(layer3)`` [d, 28, 28], ``x2 = Conv1x1(layer4)``
   [d, 14, 14], ``x3 = Conv3x3/stride 2(layer4)`` [d, 7, 7], d = 512 (the paper's
   "d_model / 4" with d_model = layer4's 2048 channels; ``d_model=512`` is the default for any
   backbone, and smaller ones may set it, e.g. 320 / 4 = 80 in the EfficientNet-Lite0 demo).
2. Hierarchical scale attention (Eqs. 2-5): x2, x3 are interpolated up to x1's size,
   ``m = x1 * x2 * x3`` (element-wise), ``m`` is added to each, and the up-sampled branches are
   interpolated back to their own sizes (x1 keeps its size). Bilinear by default; nearest,
   area and bicubic are the alternatives of the paper's Table 6.
3. Feature reshaping (Eqs. 6-7): a learnable positional encoding per branch is added once,
   then the map is flattened to tokens [L, d].
4. Global feature enhancement (Section 3.4): 2 post-norm Transformer encoder layers
   (multi-head self-attention, ReLU FFN, residual + LayerNorm after each sub-layer).
5. Region selection (Section 3.5): 3 simplified decoder layers *without* self-attention whose
   queries are learnable label embeddings [C, d] -> ``Z_i`` [C, d] per branch.
6. ``Z = concat(Z_1, Z_2, Z_3)`` [C, 3d] -> linear projection -> logits (Section 3.6).

The encoders, the decoders and the label embeddings are one set of modules used by all three
branches ("weight-sharing across the three branches", Section 3); the branch convolutions and
the positional encodings (different sizes) are per branch.

Parameter count: ResNet-101 features (42.50 M) + branch convs (11.01 M) + 5 Transformer layers
(15.76 M) + positional encodings (0.53 M) + label embeddings and classifier (0.16 M)
= 69.96 M at 80 classes and 448 px, within 1 % of the paper's count (Section 4.3). The
paper's figures (parameters, mAP) are the ``msformer`` registry entry (``mlic models --paper``).

Choices that are OURS (the paper is silent or ambiguous), and why:

* FFN width 2048 (4 d, PyTorch's and DETR's default) and 8 heads (head width 64): the paper
  gives neither; heads do not change the parameter count and FFN 2048 is what lands within
  1 % of the paper's count (FFN 1024 would give 64.7 M, 4096 would give 80.5 M).
* Classifier: one linear projection *per class* (weights [C, 3d] + bias [C]), the group-wise
  linear of Query2Label, whose recipe the paper follows (Z is per class, [K, 3d], and "a linear
  layer ... generate[s] the prediction scores corresponding to 80 categories"). A single
  linear shared by all classes (3d -> 1) is available as ``classifier="shared"``; both are
  within 2 % of the paper's count (69.96 M vs 69.84 M).
* Convolutions of Eq. 1 have a bias and no normalisation/activation (Eq. 1 shows none);
  dropout 0.1 on the residual branches and in the FFN (DETR/Q2L) but 0 on the attention
  weights (``attn_dropout=0.0``, timm ViT's default), so that PyTorch's fused CPU
  flash-attention kernel runs (BENCHMARKS.md section 5; ``attn_dropout=0.1`` gives DETR's
  setting); Xavier-uniform init
  of the Transformer weights (DETR/Q2L); positional encodings init N(0, 0.02) truncated
  (ViT); label embeddings N(0, 0.1); a zero-initialised classifier (ViT's head init), so
  that early Adam steps do not throw the post-norm Transformer around through random
  classifier weights.
* The shared encoders/decoders run the three branches packed into one sequence, attention
  restricted to each branch: the same function as a loop over the branches (tested), with
  larger matrix products.
* The scale-restoration interpolation (Eq. 5) uses the same mode as the alignment (Eq. 2), as
  the paper writes both with one ``Interpolate``; ``align_corners=False`` throughout.
* Positional encodings are sized for ``pos_image_size`` (default 448) and interpolated
  bilinearly when the feature grid differs (other input sizes, e.g. 576 or small tests).
* Attention maps (``return_attention=True``): the last decoder layer's cross-attention,
  head-averaged, per branch (each sums to 1 over its grid), bilinearly up-sampled to x1's grid,
  renormalised to sum to 1 (so that the coarse 7x7 branch does not dominate by having fewer,
  larger cells) and averaged over the branches -> [B, C, h1, w1].
* Table 7's "self-attention in the first / the other decoder layers" settings are
  ``decoder_self_attention="first"`` / ``"rest"``. Table 4's ablations: "without hierarchical
  scale attention" is ``scale_fusion="none"``, "without the global feature enhancement
  module" is ``num_encoders=0``, and "without the region selection module" is
  ``region_selection=False``; OURS for the last (the paper shows only the number): each
  branch's encoded tokens are average-pooled and the pooled vector stands in for every
  class's Z_i, so the per-class linear reads one global feature per branch (no label
  queries, no attention maps). Table 5's feature-fusion modes are ``branches``, a subset of
  ``("x1", "x2", "x3")``: the text describes Mode 3 (all three) and the "traditional"
  layer4-only baseline (``("x2",)``, the 1x1 conv of layer4) but shows Modes 1-2 only in a
  table image; OUR reading is Mode 1 = ``("x1", "x2")`` (layer3 + layer4, no coarse map) and
  Mode 2 = ``("x2", "x3")`` (layer4's two scales). Scale attention needs two branches or more.
* The scale product ``m = x1 * x2 * x3`` of Eq. 3 multiplies three unnormalised convolution
  outputs, so ``m`` is heavy-tailed and, added at full weight, dominates every branch and
  held the head back on real photos (BENCHMARKS.md 9.2). OURS: ``m`` is added as
  ``gamma * m`` with a learnable scalar ``gamma`` that starts at 0 (``scale_gate_init=0.0``),
  so the fusion starts as the identity and grows as it helps; ``scale_gate_init=None`` is
  the paper's fixed weight 1.
* Input sizes other than 448: ``pos_image_size`` sizes the positional encodings (e.g. 576 for
  the 576 px COCO recipe, ``msformer_coco2014_576``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from mlic.errors import ConfigError
from mlic.models._base import MultiLabelModel
from mlic.models._layers import (
    LabelEmbedding,
    LabelQueryDecoderLayer,
    TransformerEncoderLayer,
    tokens_to_maps,
)
from mlic.models._papers import PaperResult
from mlic.models._registry import register_model

__all__ = ["MSFormer", "HierarchicalScaleAttention", "msformer", "MSFORMER_PUBLISHED"]

INTERPOLATION_MODES = ("bilinear", "nearest", "area", "bicubic")
SCALE_FUSION_MODES = ("hierarchical", "none")
CLASSIFIERS = ("per_class", "shared")
BRANCHES = ("x1", "x2", "x3")  # layer3 1x1, layer4 1x1, layer4 3x3/2 (Eq. 1)
DECODER_SELF_ATTENTION = ("none", "all", "first", "rest")

_SOURCE = "seed 003 (Zhong et al., CMC 2025, doi:10.32604/cmc.2025.059102)"
_IMAGE = "an image in our copy of the paper"
MSFORMER_PUBLISHED = (
    PaperResult(
        "coco2014",
        85.15,
        f"{_SOURCE}: Section 4.3 (69.5 M parameters), Section 4.5.3 (the full model with "
        "bilinear interpolation: 85.15 mAP)",
        params_m=69.5,
        epochs=80,
        note=f"Table 1 is {_IMAGE}; the text puts CF1 and OF1 0.5 and 0.3 above Q2L's.",
    ),
    PaperResult(
        "coco2014", None, f"{_SOURCE}: Table 1 ({_IMAGE})", input_size=576, params_m=69.5, epochs=80
    ),
    PaperResult("voc2007", None, f"{_SOURCE}: Table 2 ({_IMAGE})", epochs=80),
    PaperResult("voc2012", None, f"{_SOURCE}: Table 3 ({_IMAGE}; evaluation server)", epochs=80),
)


def resize(x: torch.Tensor, size: Sequence[int], mode: str) -> torch.Tensor:
    """``F.interpolate`` to ``size`` with ``align_corners=False`` where the mode takes it."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    corners = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    return F.interpolate(x, size=tuple(size), mode=mode, **corners)  # [B, D, *size]


class HierarchicalScaleAttention(nn.Module):
    """Cross-scale fusion of Section 3.2.

    All maps are interpolated to the first (largest) map's size, their element-wise product
    ``m`` is added to each, and every map is interpolated back to its own size (Eqs. 2-5).
    ``gate_init=None`` is the paper's parameter-free ``x_i + m``; a number adds ``gamma * m``
    with a learnable scalar ``gamma`` starting there (OURS, default 0: see the module
    docstring, "Learning quality").
    """

    def __init__(self, mode: str = "bilinear", gate_init: float | None = 0.0) -> None:
        super().__init__()
        if mode not in INTERPOLATION_MODES:
            raise ConfigError(f"interpolation {mode!r} is not one of {list(INTERPOLATION_MODES)}")
        self.mode = mode
        self.gamma = None if gate_init is None else nn.Parameter(torch.full((1,), gate_init))

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        # xs: [B, D, h_i, w_i], xs[0] the largest
        size = xs[0].shape[-2:]
        aligned = [resize(x, size, self.mode) for x in xs]  # each [B, D, h1, w1]   (Eq. 2)
        m = aligned[0]
        for x in aligned[1:]:
            m = m * x  # [B, D, h1, w1]                                            (Eq. 3)
        if self.gamma is not None:
            m = self.gamma * m
        return [
            resize(a + m, x.shape[-2:], self.mode)  # [B, D, h_i, w_i]             (Eqs. 4-5)
            for a, x in zip(aligned, xs, strict=True)
        ]


def _grid(size: int, stride: int) -> int:
    """Side of a backbone map at input side ``size`` (timm ResNets: ceil(size / stride))."""
    return -(-size // stride)


def _self_attention_layers(setting: bool | str, num_decoders: int) -> list[bool]:
    """Which decoder layers keep their self-attention (the settings of the paper's Table 7)."""
    if setting is True:
        setting = "all"
    elif setting is False:
        setting = "none"
    if setting not in DECODER_SELF_ATTENTION:
        raise ConfigError(
            f"decoder_self_attention={setting!r}: choose True/False or one of "
            f"{list(DECODER_SELF_ATTENTION)}"
        )
    return [
        setting == "all" or (setting == "first" and j == 0) or (setting == "rest" and j > 0)
        for j in range(num_decoders)
    ]


def _check_options(
    branches: Sequence[str],
    scale_fusion: str,
    interpolation: str,
    classifier: str,
    num_encoders: int,
    num_decoders: int,
) -> tuple[str, ...]:
    """The ablation switches checked (ConfigError naming the option); the branches in
    :data:`BRANCHES` order, largest map first."""
    branches = tuple(branches)
    if (
        not branches
        or any(b not in BRANCHES for b in branches)
        or len(set(branches)) < len(branches)
    ):
        raise ConfigError(f"branches={list(branches)}: a non-empty subset of {list(BRANCHES)}")
    if scale_fusion not in SCALE_FUSION_MODES:
        raise ConfigError(f"scale_fusion={scale_fusion!r} is not one of {list(SCALE_FUSION_MODES)}")
    if interpolation not in INTERPOLATION_MODES:
        raise ConfigError(
            f"interpolation={interpolation!r} is not one of {list(INTERPOLATION_MODES)}"
        )
    if classifier not in CLASSIFIERS:
        raise ConfigError(f"classifier={classifier!r} is not one of {list(CLASSIFIERS)}")
    if num_encoders < 0 or num_decoders < 1:
        raise ConfigError(
            f"need num_encoders >= 0 and num_decoders >= 1 (the label queries are the "
            f"decoders' output), got {num_encoders} and {num_decoders}"
        )
    return tuple(b for b in BRANCHES if b in branches)


class MSFormer(MultiLabelModel):
    """Three scales -> hierarchical scale attention -> shared encoders/decoders -> per-class linear.

    ``forward_head`` takes [layer3, layer4] (``out_indices=(-2, -1)``) and returns logits
    [B, C] (and label-wise attention maps [B, C, h1, w1] on x1's grid when asked).
    """

    paper = {
        "loss": "asl",
        "gamma_neg": 4.0,
        "gamma_pos": 0.0,
        "optimizer": "adamw",
        "lr": 1e-4,
        "weight_decay": 1e-2,
        "epochs": 80,
        "resolution": 448,
        "augmentation": "randaugment+cutout",
        "params_m": MSFORMER_PUBLISHED[0].params_m,  # the registry entry's figure
    }

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet101",
        pretrained: bool | str = False,
        d_model: int = 512,
        num_heads: int = 8,
        ffn_dim: int = 2048,
        num_encoders: int = 2,
        num_decoders: int = 3,
        decoder_self_attention: bool | str = False,
        scale_fusion: str = "hierarchical",
        interpolation: str = "bilinear",
        classifier: str = "per_class",
        dropout: float = 0.1,
        attn_dropout: float = 0.0,
        pos_image_size: int | None = None,
        branches: Sequence[str] = BRANCHES,
        region_selection: bool = True,
        scale_gate_init: float | None = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        """Ablation switches (see the module docstring): ``branches`` a subset of
        ``("x1", "x2", "x3")`` (Table 5; ``("x2",)`` is the layer4-only baseline),
        ``region_selection=False`` (Table 4), ``scale_fusion="none"``, ``num_encoders=0``."""
        super().__init__(num_classes, backbone, pretrained, (-2, -1), drop_path_rate)
        self.branches = _check_options(
            branches, scale_fusion, interpolation, classifier, num_encoders, num_decoders
        )
        self.d_model = d_model
        self.interpolation = interpolation
        self._build_branches(pos_image_size, scale_fusion, scale_gate_init)
        # Sections 3.4-3.5: one encoder stack, one decoder stack, one label-query set, shared
        layer = dict(
            num_heads=num_heads, ffn_dim=ffn_dim, dropout=dropout, attn_dropout=attn_dropout
        )
        self.encoders = nn.ModuleList(
            [TransformerEncoderLayer(d_model, **layer) for _ in range(num_encoders)]
        )
        self.region_selection = region_selection
        self.decoders = nn.ModuleList(
            []
            if not region_selection
            else [
                LabelQueryDecoderLayer(d_model, self_attention=sa, **layer)
                for sa in _self_attention_layers(decoder_self_attention, num_decoders)
            ]
        )
        # learnable label embeddings (the paper uses no word vectors)
        self.label_embed = (
            LabelEmbedding(num_classes, None, d_model, learnable=True) if region_selection else None
        )
        self._build_classifier(classifier)
        self._reset_parameters()

    def _build_branches(
        self, pos_image_size: int | None, scale_fusion: str, scale_gate_init: float | None
    ) -> None:
        """Eq. 1's convolution per branch, the scale attention and Eq. 6's positional encodings."""
        c3, c4 = self.backbone.channels  # layer3, layer4 channels
        s3, s4 = self.backbone.strides
        d_model, branches = self.d_model, self.branches
        size = pos_image_size or self.default_image_size
        h2 = _grid(size, s4)
        spec = {  # branch -> (backbone map, conv, grid at pos_image_size): 28, 14, 7 at 448 px
            "x1": (0, nn.Conv2d(c3, d_model, kernel_size=1), _grid(size, s3)),
            "x2": (1, nn.Conv2d(c4, d_model, kernel_size=1), h2),
            "x3": (
                1,
                nn.Conv2d(c4, d_model, kernel_size=3, stride=2, padding=1),
                (h2 - 1) // 2 + 1,
            ),
        }
        self.branch_inputs = tuple(spec[b][0] for b in branches)
        self.branch_convs = nn.ModuleList(spec[b][1] for b in branches)
        # a single branch has no other scale to fuse with
        fuse = scale_fusion == "hierarchical" and len(branches) > 1
        self.scale_attention = (
            HierarchicalScaleAttention(self.interpolation, scale_gate_init) if fuse else None
        )
        # Eq. 6: learnable positional encodings sized for the default input
        grids = [spec[b][2] for b in branches]
        self.pos_embed = nn.ParameterList(
            [nn.Parameter(torch.zeros(1, d_model, g, g)) for g in grids]
        )

    def _build_classifier(self, classifier: str) -> None:
        """Section 3.6: Z [C, n * d] -> one score per class (per-class weights or one shared fc)."""
        z_dim = len(self.branch_convs) * self.d_model
        if classifier == "per_class":
            self.class_weight = nn.Parameter(torch.zeros(self.num_classes, z_dim))
            self.class_bias = nn.Parameter(torch.zeros(self.num_classes))
            self.shared_fc = None
        else:
            self.class_weight = None
            self.class_bias = None
            self.shared_fc = nn.Linear(z_dim, 1)

    def _reset_parameters(self) -> None:
        for stack in (self.encoders, self.decoders):
            for p in stack.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
        for p in self.pos_embed:
            nn.init.trunc_normal_(p, std=0.02)
        # zero-initialised classifier (as ViT's head): logits start at 0, and the randomly
        # initialised Transformer gets no gradient through random classifier weights at first
        classifier = (
            [self.class_weight, self.class_bias]
            if self.shared_fc is None
            else [self.shared_fc.weight, self.shared_fc.bias]
        )
        for p in classifier:
            nn.init.zeros_(p)

    @property
    def has_attention(self) -> bool:
        """Label-wise maps come from the region-selection decoders (absent in that ablation)."""
        return self.region_selection

    def positional_encoding(self, branch: int, height: int, width: int) -> torch.Tensor:
        """Branch ``branch``'s encoding [1, D, height, width], bilinearly resized if needed."""
        return resize(self.pos_embed[branch], (height, width), "bilinear")  # [1, D, h, w]

    def scale_features(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Eq. 1 and the hierarchical scale attention: backbone maps -> x_i^final [B, D, h_i, w_i]."""
        xs = [
            conv(features[i]) for i, conv in zip(self.branch_inputs, self.branch_convs, strict=True)
        ]
        if self.scale_attention is not None:
            xs = self.scale_attention(xs)  # each [B, D, h_i, w_i]
        return xs

    def forward_branches(
        self, features: list[torch.Tensor], need_weights: bool = False
    ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """Per-branch class-specific features Z_i [B, C, D] and, when asked, the last decoder
        layer's head-averaged cross-attention per branch [B, C, h_i, w_i] (sums to 1 over
        positions)."""
        # The encoders, decoders and label queries are shared by the branches, so the
        # branches run packed: their tokens end to end in one sequence, attention within each
        # branch (``segments``) and every per-token layer (projections, FFN, LayerNorm) as one
        # large matmul over all of them -- the same result as a loop over the branches, with
        # far better GEMM shapes for the small 14x14 and 7x7 branches and the label queries.
        xs = self.scale_features(features)
        grids = [tuple(x.shape[-2:]) for x in xs]
        b = xs[0].shape[0]
        tokens = torch.cat(
            [
                (x + self.positional_encoding(i, h, w)).flatten(2).transpose(1, 2)  # (Eqs. 6-7)
                for i, (x, (h, w)) in enumerate(zip(xs, grids, strict=True))
            ],
            dim=1,
        )  # [B, sum h_i*w_i, D]
        lengths = [h * w for h, w in grids]
        for layer in self.encoders:
            tokens = layer(tokens, segments=lengths)  # [B, sum h_i*w_i, D]
        if not self.region_selection:  # Table 4 ablation: no class-specific features
            if need_weights:
                raise ConfigError("msformer without region selection has no label attention")
            c = self.num_classes
            pooled = [t.mean(dim=1, keepdim=True) for t in tokens.split(lengths, dim=1)]
            return [p.expand(-1, c, -1) for p in pooled], None  # n x [B, C, D]
        # a copy, not a module call or a view of the parameter: FlopCounterMode under
        # inference_mode (mlic.bench) fails on module inputs/outputs that are grad leaves
        c = self.label_embed.weight.shape[0]
        q = self.label_embed.weight.unsqueeze(0).repeat(b, len(xs), 1)  # [B, n*C, D]
        segments = ([c] * len(xs), lengths)
        last = len(self.decoders) - 1
        attn = None
        for j, layer in enumerate(self.decoders):
            q, attn = layer(
                q, tokens, need_weights=need_weights and j == last, segments=segments
            )  # [B, n*C, D]
        zs = list(q.split(c, dim=1))  # n x [B, C, D]
        if not need_weights:
            return zs, None
        maps = [tokens_to_maps(a, h, w) for a, (h, w) in zip(attn, grids, strict=True)]
        return zs, maps  # n x [B, C, h_i, w_i]

    @staticmethod
    def fuse_attention(maps: list[torch.Tensor]) -> torch.Tensor:
        """Per-branch maps -> one map on the first branch's grid [B, C, h1, w1] (sums to 1)."""
        size = maps[0].shape[-2:]
        fused = []
        for m in maps:
            up = resize(m, size, "bilinear")  # [B, C, h1, w1], convex weights: stays >= 0
            fused.append(up / up.sum(dim=(2, 3), keepdim=True).clamp_min(1e-12))  # [B, C, h1, w1]
        return torch.stack(fused).mean(dim=0)  # [B, C, h1, w1]

    def forward_head(
        self, features: list[torch.Tensor], return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        zs, maps = self.forward_branches(features, need_weights=return_attention)
        z = torch.cat(zs, dim=-1)  # [B, C, 3D]                                   (Eq. 11)
        if self.shared_fc is not None:
            logits = self.shared_fc(z).squeeze(-1)  # [B, C]
        else:
            logits = (z * self.class_weight).sum(dim=-1) + self.class_bias  # [B, C]
        if not return_attention:
            return logits
        return logits, self.fuse_attention(maps)  # [B, C], [B, C, h1, w1]


@register_model(published=MSFORMER_PUBLISHED)
def msformer(num_classes: int, labels=None, **kwargs) -> MSFormer:
    """MSFormer (Zhong et al. 2025): ResNet-101 layer3+layer4, 3 scales, d=512, 2 enc / 3 dec.

    ``labels`` is unused: the label queries are learnable embeddings, not word vectors.
    """
    return MSFormer(num_classes, **kwargs)
