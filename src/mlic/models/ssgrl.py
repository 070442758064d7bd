"""SSGRL: Semantic-Specific Graph Representation Learning.

Chen, Xu, Hui, Wu, Lin, "Learning Semantic-Specific Graph Representation for Multi-Label
Image Recognition", ICCV 2019 (arXiv:1908.07325); official code HCPLab-SYSU/SSGRL.

Pipeline, on the deepest backbone map ``f`` [B, D, h, w] (ResNet-101 layer4, D = 2048):

1. **Semantic decoupling.** For every class c (word vector ``x_c``, 300-d GloVe) and every
   position wh, a low-rank bilinear pooling gives ``f~_c,wh = P^T tanh((U^T f_wh) * (V^T x_c))``
   (``U``: D -> d1, ``V``: 300 -> d1, ``P``: d1 -> d2, d1 = d2 = 1024); a linear ``f_a``
   scores it, a softmax over the h*w positions gives the attention ``a_c``, and the
   semantic-specific feature is ``f_c = sum_wh a_c,wh f_wh`` [B, C, D].
2. **Semantic interaction.** A gated graph neural network (Li et al., ICLR 2016) over the
   label graph ``A[c, c'] = P(c' | c)`` (training-split co-occurrence, no threshold, as the
   official ``prob_train.npy``), ``h^0_c = f_c``. Each of T = 3 steps aggregates incoming and
   outgoing messages ``a_c = [sum_c' A[c, c'] h_c', sum_c' A[c', c] h_c']`` and applies the
   GRU update (update gate z, reset gate r, candidate h~).
3. **Output.** ``o_c = tanh(W_o [h^T_c, h^0_c])`` (d_o = 2048 = D) and one classifier per
   class ``s_c = <w_c, o_c> + b_c``.

``return_attention=True`` returns the softmax attention of step 1 as maps [B, C, h, w]
(each sums to 1 over positions).

Paper training: BCE, Adam lr 1e-5 (betas (0.999, 0.9), eps 1e-4), batch 4, layers before
layer4 frozen, images warped to 640 x 640 and a random square crop of {640, 576, 512, 384,
320} resized to 576, no flip; tested on the centre 576 crop of the 640 x 640 warp (the
``data.resize=640`` + ``data.crop=square`` protocol). Published results: the ``ssgrl``
registry entry (``mlic models --paper``).

Choices that are OURS (the seed is a slide deck; these follow the paper and official code
where those are explicit, and say why where they depart):

- ``P`` and ``f_a`` are kept as separate layers (same parameters as the paper), but the
  score is evaluated as ``(w_a^T P^T) tanh(...) + (w_a^T b_P + b_a)``: P and f_a are both
  linear and only their product reaches the output, so folding them is the same function
  without a [B, C, h*w, d2] tensor and its d1 x d2 matmul per (image, class, position).
- The attention is additive (tanh of a bilinear product), so it is not a dot product and is
  computed explicitly, not through ``scaled_dot_product_attention``.
- The GRU gates have one bias each (the official code's second, redundant bias on the
  ``U h`` terms is dropped); the three input projections of ``a_c`` are one fused linear.
- ``feature_dim`` (default None = the backbone's channels, as in the paper) optionally
  projects the map with a 1x1 conv + BN + ReLU first: the GGNN costs 9 D^2 parameters
  (38 M at D = 2048), and some re-implementations reduce D to 1024.
- ``output_dim`` defaults to the feature dimension D (the paper's 2048 at ResNet-101).
- Default input 448 px (the library's common size, for comparison with the other models);
  the paper's 576 is recorded in ``paper``.
- Layer freezing is not part of the model: the training configs express the backbone's
  learning rate with ``optim.backbone_lr_mult``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from mlic.errors import ConfigError
from mlic.models._base import MultiLabelModel
from mlic.models._layers import ClassWiseLinear, LabelEmbedding, label_graph, tokens_to_maps
from mlic.models._papers import PaperResult
from mlic.models._registry import register_model

__all__ = ["SSGRL", "SemanticDecoupling", "GatedGraphNetwork", "SSGRL_PUBLISHED"]


class SemanticDecoupling(nn.Module):
    """Word-vector-guided attention: one attention map and one feature vector per class.

    ``score_c,n = f_a(P^T tanh((U^T f_n) * (V^T x_c)))``, softmax over positions n, and
    ``f_c = sum_n a_c,n f_n``. See the module docstring for the folded evaluation of P, f_a.
    """

    def __init__(
        self, feature_dim: int, word_dim: int, low_rank_dim: int = 1024, hidden_dim: int = 1024
    ) -> None:
        super().__init__()
        self.u = nn.Linear(feature_dim, low_rank_dim, bias=False)  # U: image side
        self.v = nn.Linear(word_dim, low_rank_dim, bias=False)  # V: word side
        self.p = nn.Linear(low_rank_dim, hidden_dim)  # P
        self.f_a = nn.Linear(hidden_dim, 1)  # attention score

    def scores(self, tokens: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        """Unnormalised attention logits [B, C, N] for tokens [B, N, D] and words [C, Dw]."""
        u = self.u(tokens)  # [B, N, d1]
        v = self.v(words)  # [C, d1]
        joint = torch.tanh(u.unsqueeze(1) * v[None, :, None, :])  # [B, C, N, d1]
        w = self.f_a.weight @ self.p.weight  # [1, d1]: f_a o P, both linear
        b = self.f_a.weight @ self.p.bias + self.f_a.bias  # [1]
        return torch.matmul(joint, w.squeeze(0)) + b  # [B, C, N]

    def forward(
        self, tokens: torch.Tensor, words: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # tokens: [B, N, D], words: [C, Dw] -> features [B, C, D], attention [B, C, N]
        attn = torch.softmax(self.scores(tokens, words), dim=-1)  # [B, C, N]
        return torch.bmm(attn, tokens), attn  # [B, C, D], [B, C, N]


class GatedGraphNetwork(nn.Module):
    """Gated graph neural network (Li et al., ICLR 2016) with incoming and outgoing messages.

    For ``steps`` iterations: ``a = [A h, A^T h]`` (both edge directions), then
    ``z = sigmoid(W_z a + U_z h)``, ``r = sigmoid(W_r a + U_r h)``,
    ``h~ = tanh(W_h a + U_h (r * h))``, ``h = (1 - z) h + z h~``. ``steps=0`` returns ``h``.
    """

    def __init__(self, dim: int, steps: int = 3) -> None:
        super().__init__()
        if steps < 0:
            raise ConfigError(f"steps must be >= 0, got {steps}")
        self.dim = dim
        self.steps = steps
        self.w = nn.Linear(2 * dim, 3 * dim)  # W_z, W_r, W_h on the messages (fused)
        self.u_zr = nn.Linear(dim, 2 * dim, bias=False)  # U_z, U_r on the state
        self.u_h = nn.Linear(dim, dim, bias=False)  # U_h on the reset state

    def forward(self, h: torch.Tensor, adjacency: torch.Tensor) -> torch.Tensor:
        # h: [B, C, D] initial node states, adjacency: [C, C] with A[c, c'] = P(c' | c)
        for _ in range(self.steps):
            incoming = torch.matmul(adjacency, h)  # [B, C, D]: sum_c' A[c, c'] h_c'
            outgoing = torch.matmul(adjacency.t(), h)  # [B, C, D]: sum_c' A[c', c] h_c'
            wz, wr, wh = self.w(torch.cat([incoming, outgoing], dim=-1)).chunk(3, dim=-1)
            uz, ur = self.u_zr(h).chunk(2, dim=-1)  # [B, C, D] each
            z = torch.sigmoid(wz + uz)  # [B, C, D] update gate
            r = torch.sigmoid(wr + ur)  # [B, C, D] reset gate
            candidate = torch.tanh(wh + self.u_h(r * h))  # [B, C, D]
            h = (1 - z) * h + z * candidate  # [B, C, D]
        return h


class SSGRL(MultiLabelModel):
    """Semantic decoupling -> GGNN over the label graph -> per-class classifiers."""

    paper = {
        "resolution": 576,
        "loss": "bce",
        "optimizer": "adam",
        "lr": 1e-5,
        "betas": (0.999, 0.9),
        "eps": 1e-4,
        "weight_decay": 0.0,
        "batch_size": 4,
        "frozen": "backbone layers before layer4",
        "augmentation": "warp 640, random square crop {640,576,512,384,320} -> 576, no flip",
        "evaluation": "warp 640, centre crop 576",
        "graph": "conditional P(j|i), training split",
        "time_steps": 3,
        "low_rank_dim": 1024,
    }

    def __init__(
        self,
        num_classes: int,
        labels: Any | None = None,
        backbone: str = "resnet101",
        pretrained: bool | str = False,
        drop_path_rate: float = 0.0,
        feature_dim: int | None = None,
        low_rank_dim: int = 1024,
        attention_dim: int = 1024,
        time_steps: int = 3,
        output_dim: int | None = None,
        word_dim: int = 300,
        learn_word_vectors: bool | None = None,
    ) -> None:
        super().__init__(num_classes, backbone, pretrained, (-1,), drop_path_rate)
        channels = self.backbone.channels[-1]
        if feature_dim is None:
            self.proj: nn.Module = nn.Identity()
            dim = channels
        else:
            self.proj = nn.Sequential(
                nn.Conv2d(channels, feature_dim, 1, bias=False),
                nn.BatchNorm2d(feature_dim),
                nn.ReLU(inplace=True),
            )
            dim = feature_dim
        out_dim = dim if output_dim is None else output_dim
        self.words = LabelEmbedding(num_classes, labels, word_dim, learn_word_vectors)
        self.rebuild_kwargs = self.words.rebuild_kwargs
        self.register_buffer("adjacency", label_graph(labels, num_classes, "conditional"))
        self.decouple = SemanticDecoupling(dim, self.words.dim, low_rank_dim, attention_dim)
        self.ggnn = GatedGraphNetwork(dim, time_steps)
        self.fc_out = nn.Linear(2 * dim, out_dim)
        self.classifier = ClassWiseLinear(num_classes, out_dim)

    def forward_head(
        self, features: list[torch.Tensor], return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        x = self.proj(features[-1])  # [B, D, h, w]
        height, width = x.shape[-2:]
        tokens = x.flatten(2).transpose(1, 2)  # [B, N, D], N = h*w
        h0, attn = self.decouple(tokens, self.words())  # [B, C, D], [B, C, N]
        h_t = self.ggnn(h0, self.adjacency)  # [B, C, D]
        out = torch.tanh(self.fc_out(torch.cat([h_t, h0], dim=-1)))  # [B, C, d_o]
        logits = self.classifier(out)  # [B, C]
        if not return_attention:
            return logits
        return logits, tokens_to_maps(attn, height, width)  # [B, C], [B, C, h, w]


_SOURCE = "SSGRL (Chen et al., ICCV 2019, arXiv:1908.07325)"
_README = "the official README (github.com/HCPLab-SYSU/SSGRL)"
SSGRL_PUBLISHED = (
    PaperResult("coco2014", 83.8, f"{_SOURCE} and {_README}", CF1=76.8, OF1=79.7, input_size=576),
    PaperResult(
        "voc2007",
        93.4,
        f"{_SOURCE} and {_README}",
        input_size=576,
        note="95.0 when pre-trained on COCO.",
    ),
    PaperResult(
        "voc2012",
        93.9,
        f"{_SOURCE} and {_README}",
        input_size=576,
        note="94.8 when pre-trained on COCO; the evaluation server's test mAP.",
    ),
    PaperResult("vg500", 36.6, f"{_SOURCE} and {_README}", input_size=576),
)


@register_model(published=SSGRL_PUBLISHED)
def ssgrl(num_classes: int, labels=None, **kwargs) -> SSGRL:
    """SSGRL (Chen et al., ICCV 2019): word-guided attention + GGNN on P(j|i) + per-class heads."""
    return SSGRL(num_classes, labels=labels, **kwargs)
