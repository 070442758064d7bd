"""The optimisers mlic trains with are the fused kernels, and update like the for-loop ones."""

from __future__ import annotations

import pytest
import torch

import mlic
from conftest import TINY_BACKBONE
from mlic.config import load_config
from mlic.engine.trainer import build_optimizer


def _steps(opt_factory, steps: int = 15) -> tuple[list[torch.Tensor], dict]:
    torch.manual_seed(0)
    model = mlic.create_model("q2l", 5, backbone=TINY_BACKBONE, hidden_dim=32, ffn_dim=64)
    opt = opt_factory(model)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g) * 1e-2
        opt.step()
    return [p.detach().clone() for p in model.parameters()], opt.state_dict()


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_training_optimiser_is_fused_and_equal_to_the_for_loop(name: str) -> None:
    cfg = load_config(None, [f"optim.name={name}", "optim.lr=0.01", "optim.weight_decay=0.01"])
    fused, fused_state = _steps(lambda m: build_optimizer(m, cfg, torch.device("cpu")))
    assert fused_state["param_groups"][0]["fused"] is True

    def for_loop(m):
        opt = build_optimizer(m, cfg, torch.device("cpu"))
        for group in opt.param_groups:  # the same groups and settings, the for-loop kernel
            group["fused"], group["foreach"] = False, False
        return opt

    plain, plain_state = _steps(for_loop)
    for a, b in zip(fused, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # same state layout: a run resumes across the two
    assert fused_state["state"].keys() == plain_state["state"].keys()
    assert fused_state["state"][0].keys() == plain_state["state"][0].keys()
