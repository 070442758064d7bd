"""Query2Label (Liu et al., "Query2Label: A Simple Transformer Way to Multi-Label
Classification", arXiv 2107.10834, 2021).

Each label is a learnable query vector. Transformer decoders let the C queries attend to
the backbone's last feature map (cross-attention pools the label's evidence from wherever it
is) and to each other (self-attention models label co-occurrence); a group fully-connected
layer then reads one logit per class from that class's own query: ``logit_c = <W_c, q_c> + b_c``.

Architecture as implemented::

    x = backbone last map                                  [B, D_b, h, w]
    x = 1x1 conv input projection to d (only if D_b != d)  [B, d, h, w] -> tokens [B, hw, d]
    pos = 2-D sine positional encoding                     [hw, d]
    memory = E x encoder layer(tokens, pos)                [B, hw, d]  E = 1; pos on q and k
    q = label embeddings Q_0                               [C, d]
    q = L x decoder layer(q, memory, pos)                  [B, C, d]  L = 2; pos on the keys
    logits = group FC(q)                                   [B, C]

Each decoder layer: query self-attention, cross-attention to the memory, FFN (post-norm).

Paper / official-code settings (ResNet-101, 448 px): d = 2048 (= the backbone's channels, so
no input projection), 1 encoder and 2 decoder layers, 4 heads, FFN 8192, dropout 0.1,
post-norm; ASL (gamma- 4, gamma+ 0, clip 0.05; the official README example uses gamma- 2),
AdamW lr 1e-4 wd 1e-2 on every parameter (biases and norms too:
``optim.decay_norm_and_bias=true``), one-cycle (pct_start 0.2), 80 epochs, batch 128, EMA
0.9997, RandAugment + Cutout; the official code reports the best epoch of the raw or the
EMA weights on the test split. Published results: the ``q2l`` registry entry
(``mlic models --paper``).

Choices that are OURS, and why:
- ``hidden_dim`` defaults to the backbone's channel count and ``ffn_dim`` to 4x that: this is
  the paper's ResNet-101 setting (2048 / 8192) and scales the head with any timm backbone
  instead of bolting a 2048-d transformer onto a 320-channel EfficientNet.
- Decoders keep their self-attention (``decoder_self_attention=True``), as the paper
  describes a standard Transformer decoder. The official code deletes it by default; set the
  option to False to reproduce that variant (34 M fewer parameters at ResNet-101).
- The label embeddings are the decoder's input queries and are updated layer by layer, as
  in the paper's equations (Q_0 = label embeddings). The official code follows DETR instead
  (zero target + the embeddings re-added as a query position at every layer).
- No extra LayerNorm after the last (already post-normed) decoder layer.
- Transformer weight matrices get Xavier-uniform initialisation (as in DETR/Q2L).
- ``return_attention`` maps: the last decoder layer's cross-attention weights (averaged
  over heads), reshaped to [B, C, h, w]; each map sums to 1 over positions.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from mlic.errors import ConfigError
from mlic.models._base import MultiLabelModel
from mlic.models._layers import (
    ClassWiseLinear,
    LabelQueryDecoderLayer,
    TransformerEncoderLayer,
    sine_position_encoding,
    tokens_to_maps,
)
from mlic.models._papers import PaperResult
from mlic.models._registry import register_model

__all__ = ["Query2Label", "Q2L_PUBLISHED"]


class Query2Label(MultiLabelModel):
    """Backbone + Transformer encoder/decoder with label queries + group fully-connected output."""

    paper = {
        "loss": "asl",
        "gamma_neg": 4.0,
        "gamma_pos": 0.0,
        "clip": 0.05,
        "optimizer": "adamw",
        "lr": 1e-4,
        "weight_decay": 1e-2,
        "schedule": "onecycle",
        "pct_start": 0.2,
        "epochs": 80,
        "batch_size": 128,
        "ema_decay": 0.9997,
        "augment": "randaugment+cutout",
    }

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet101",
        pretrained: bool | str = False,
        hidden_dim: int | None = None,
        num_heads: int = 4,
        ffn_dim: int | None = None,
        num_encoder_layers: int = 1,
        num_decoder_layers: int = 2,
        decoder_self_attention: bool = True,
        input_proj: bool | None = None,
        dropout: float = 0.1,
        drop_path_rate: float = 0.0,
    ) -> None:
        """
        Args:
            hidden_dim: transformer width d; None = the backbone's last-map channels.
            num_heads: attention heads in every encoder/decoder layer.
            ffn_dim: FFN hidden width; None = 4 * d.
            num_encoder_layers: Transformer encoder layers over the image tokens (0 = none).
            num_decoder_layers: decoder layers updating the label queries (>= 1).
            decoder_self_attention: keep the queries' self-attention in the decoders.
            input_proj: 1x1 conv from the backbone's channels to d; None = only when they differ.
            dropout: dropout inside attention, FFN and residual branches.
        """
        super().__init__(num_classes, backbone, pretrained, (-1,), drop_path_rate)
        if num_decoder_layers < 1:
            raise ConfigError(f"q2l num_decoder_layers must be >= 1, got {num_decoder_layers}")
        channels = self.backbone.channels[-1]
        dim = hidden_dim or channels
        ffn = ffn_dim or 4 * dim
        if input_proj is None:
            input_proj = dim != channels
        if not input_proj and dim != channels:
            raise ConfigError(
                f"input_proj=False needs hidden_dim == backbone channels ({channels}), got {dim}"
            )
        if dim % num_heads or dim % 4:
            raise ConfigError(
                f"q2l hidden_dim {dim} must be divisible by num_heads ({num_heads}) and by 4 "
                "(sine position encoding); set model.kwargs.hidden_dim"
            )
        self.hidden_dim = dim
        self.input_proj = nn.Conv2d(channels, dim, kernel_size=1) if input_proj else nn.Identity()
        self.encoder = nn.ModuleList(
            TransformerEncoderLayer(dim, num_heads, ffn, dropout) for _ in range(num_encoder_layers)
        )
        self.decoder = nn.ModuleList(
            LabelQueryDecoderLayer(dim, num_heads, ffn, dropout, decoder_self_attention)
            for _ in range(num_decoder_layers)
        )
        self.query_embed = nn.Parameter(torch.randn(num_classes, dim))  # [C, d]
        self.fc = ClassWiseLinear(num_classes, dim)
        for p in (*self.encoder.parameters(), *self.decoder.parameters()):
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward_head(
        self, features: list[torch.Tensor], return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        x = self.input_proj(features[-1])  # [B, d, h, w]
        b, d, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # [B, hw, d]
        pos = sine_position_encoding(h, w, d, device=x.device, dtype=x.dtype)[None]  # [1, hw, d]
        for layer in self.encoder:
            tokens = layer(tokens, pos)  # [B, hw, d]
        queries = self.query_embed[None].expand(b, -1, -1)  # [B, C, d]
        weights = None
        last = len(self.decoder) - 1
        for i, layer in enumerate(self.decoder):
            need = return_attention and i == last
            queries, weights = layer(queries, tokens, pos, need_weights=need)  # [B, C, d]
        logits = self.fc(queries)  # [B, C]
        if not return_attention:
            return logits
        return logits, tokens_to_maps(weights, h, w)  # [B, C], [B, C, h, w]


_SOURCE = (
    "Query2Label (Liu et al., arXiv:2107.10834), the official README's model zoo "
    "(github.com/SlongLiu/query2labels)"
)
_SELECTION = "the best epoch of the raw or the EMA weights on the test split (official code)"
Q2L_PUBLISHED = (
    PaperResult(
        "coco2014",
        84.9,
        f"{_SOURCE}: Q2L-R101-448",
        epochs=80,
        selection=_SELECTION,
        note="CF1 and OF1 are in the paper's Table 2, not in our sources.",
    ),
    PaperResult(
        "coco2014",
        86.5,
        f"{_SOURCE}: Q2L-R101-576",
        input_size=576,
        epochs=80,
        selection=_SELECTION,
    ),
)


@register_model(published=Q2L_PUBLISHED)
def q2l(
    num_classes: int,
    labels=None,
    backbone: str = "resnet101",
    pretrained: bool | str = False,
    **options,
) -> Query2Label:
    """Query2Label: label-query Transformer decoders + group FC (labels unused: learnt queries)."""
    return Query2Label(num_classes, backbone=backbone, pretrained=pretrained, **options)
