"""Where a backbone looks: the last block's [CLS] attention of a ViT, per head (DINO's picture), or, for a
network without attention (a CNN), the norm of its last feature map at each position. Pure torch.

The attention is recomputed from the last block's own weights (its ``qkv`` projection, ``q_norm`` /
``k_norm`` and ``scale``), so it is the softmax that block applies, whichever kernel (fused or not) runs
it in training.
"""

from __future__ import annotations

import math

import torch
from torch import nn

#: The two kinds of map, as the pictures name them.
ATTENTION, FEATURE_NORM = "attention", "feature_norm"


def _is_vit(model: nn.Module) -> bool:
    return all(hasattr(model, a) for a in ("patch_embed", "blocks", "_pos_embed")) and hasattr(
        model.blocks[-1], "attn"
    )


@torch.no_grad()
def vit_cls_attention(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``(N, heads, gh, gw)``: the last block's softmax attention of the [CLS] token over the patches
    (rows sum to 1 over patches and prefix tokens together; the prefix tokens are left out here)."""
    x = model.patch_embed(x)
    x = model._pos_embed(x)
    if hasattr(model, "patch_drop"):
        x = model.patch_drop(x)
    if hasattr(model, "norm_pre"):
        x = model.norm_pre(x)
    for blk in model.blocks[:-1]:
        x = blk(x)
    last = model.blocks[-1]
    attn = last.attn
    y = last.norm1(x)
    b, n, c = y.shape
    heads = attn.num_heads
    qkv = attn.qkv(y).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    q, k = qkv[0], qkv[1]
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    weights = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, heads, n, n)
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    cls = weights[:, :, 0, prefix:]  # (B, heads, patches)
    grid = getattr(model.patch_embed, "grid_size", None)
    gh, gw = (
        grid
        if grid is not None and grid[0] * grid[1] == cls.shape[-1]
        else (int(math.isqrt(cls.shape[-1])),) * 2
    )
    return cls.reshape(b, heads, gh, gw).float()


@torch.no_grad()
def feature_norm_map(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``(N, 1, h, w)``: the L2 norm over channels of the last spatial feature map (``forward_features``)."""
    feats = model.forward_features(x) if hasattr(model, "forward_features") else model(x)
    if feats.dim() != 4:
        raise ValueError(f"no spatial feature map: forward_features gave shape {tuple(feats.shape)}")
    return feats.float().norm(dim=1, keepdim=True)


def spatial_maps(model: nn.Module, x: torch.Tensor) -> tuple[str, torch.Tensor]:
    """``(kind, maps (N, K, h, w))``: per-head [CLS] attention for a ViT, else the feature-norm map; the
    model is put in eval mode for the call and restored after."""
    was_training = model.training
    model.eval()
    try:
        if _is_vit(model):
            return ATTENTION, vit_cls_attention(model, x)
        return FEATURE_NORM, feature_norm_map(model, x)
    finally:
        model.train(was_training)
