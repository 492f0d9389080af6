"""MAE pieces (He et al., 2022): per-sample random masking, patchify, masked pixel regression.

Masking follows the official code: sort per-sample uniform noise, keep the first
``int(N * (1 - mask_ratio))`` patches, so every image has exactly the same number of visible patches
(the encoder batch stays rectangular) and the visible set is uniform over subsets.
The loss is the mean squared error over *masked* patches only: reconstructing visible patches is
trivial (the encoder saw them) and would dilute the signal.
"""

from __future__ import annotations

import dataclasses

import torch

from trainers.methods.options import num_visible  # the config's check counts with the same rule


@dataclasses.dataclass
class Masking:
    """``ids_keep`` ``(B, K)`` visible patch indices; ``mask`` ``(B, N)`` 1 = masked, 0 = visible (in
    patch order); ``ids_restore`` ``(B, N)`` un-shuffles [visible, masked] back to patch order."""

    ids_keep: torch.Tensor
    mask: torch.Tensor
    ids_restore: torch.Tensor


def random_masking(
    batch: int,
    num_patches: int,
    mask_ratio: float,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> Masking:
    """Independent random mask per sample (argsort of uniform noise)."""
    keep = num_visible(num_patches, mask_ratio)
    if not 1 <= keep <= num_patches:
        raise ValueError(f"mask_ratio {mask_ratio} leaves {keep} of {num_patches} patches visible; need >= 1")
    noise = torch.rand(batch, num_patches, device=device, generator=generator)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(batch, num_patches, device=device)
    mask[:, :keep] = 0.0
    mask = torch.gather(mask, 1, ids_restore)
    return Masking(ids_keep=ids_shuffle[:, :keep], mask=mask, ids_restore=ids_restore)


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, (H/p)*(W/p), p*p*C)``, patches row-major like a ViT's patch grid."""
    b, c, h, w = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image {h}x{w} is not a multiple of the patch size {p}")
    x = images.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def normalize_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-patch zero mean / unit (unbiased) variance: the ``norm_pix_loss`` target, which the MAE
    paper found gives better representations (local contrast, not absolute intensity, is predicted)."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps) ** 0.5


def mae_loss(
    pred: torch.Tensor, target_patches: torch.Tensor, mask: torch.Tensor, norm_pix_loss: bool = True
) -> torch.Tensor:
    """Mean over masked patches of the per-patch pixel MSE.

    ``pred`` and ``target_patches``: ``(B, N, p*p*C)``; ``mask``: ``(B, N)`` with 1 = masked."""
    target = target_patches.float()
    if norm_pix_loss:
        target = normalize_patches(target)
    per_patch = ((pred.float() - target) ** 2).mean(dim=-1)
    mask = mask.to(per_patch.dtype)
    return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)
