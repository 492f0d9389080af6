"""MAE (He et al., 2022): mask most patches, encode the visible ones, reconstruct the masked pixels.

The encoder is the timm ViT backbone itself, run on the visible patches only (its ``patch_embed``,
``_pos_embed`` -- which resamples the position table for the grid and prepends the prefix tokens --
``blocks`` and ``norm``); the evaluated backbone is that same ViT on whole images. The decoder is a
few timm ``Block``s over [visible tokens, mask tokens] in patch order plus position embeddings.
Only the first global crop is used (MAE's augmentation is a random resized crop + flip).
"""

from __future__ import annotations

import torch
from timm.layers import resample_abs_pos_embed
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block
from torch import nn

from trainers.losses.mae import mae_loss, patchify, random_masking
from trainers.methods.base import Method, MethodContext
from trainers.methods.options import MAEOptions
from trainers.options import ConfigError

_VIT_PARTS = ("patch_embed", "_pos_embed", "blocks", "norm", "num_prefix_tokens")


class MAE(Method):
    name = "mae"
    Options = MAEOptions
    crop_usage = "single"
    has_projection_head = False  # the decoder reconstructs pixels: no embedding head to measure

    def __init__(self, options: MAEOptions, ctx: MethodContext):
        super().__init__(options, ctx)
        o = options
        bb = ctx.backbone
        missing = [a for a in _VIT_PARTS if not hasattr(bb, a)]
        if missing:
            raise ConfigError(
                "model.backbone",
                f"MAE needs a timm VisionTransformer-like backbone; {type(bb).__name__} has no {missing}",
            )
        ph, pw = bb.patch_embed.patch_size
        if ph != pw:
            raise ConfigError("model.patch_size", f"MAE needs square patches, got {ph}x{pw}")
        self.backbone = bb
        self.patch_size = ph
        self.grid = (ctx.image_size // ph, ctx.image_size // ph)
        self.decoder_embed = nn.Linear(ctx.feat_dim, o.decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, o.decoder_dim))
        if o.decoder_pos_embed == "learned":
            self.decoder_pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1], o.decoder_dim))
            nn.init.trunc_normal_(self.decoder_pos_embed, std=0.02)
        self.decoder_blocks = nn.Sequential(
            *[Block(o.decoder_dim, o.decoder_heads, qkv_bias=True) for _ in range(o.decoder_depth)]
        )
        self.decoder_norm = nn.LayerNorm(o.decoder_dim)
        self.decoder_pred = nn.Linear(o.decoder_dim, ph * ph * ctx.in_chans)
        for module in (self.decoder_embed, self.decoder_blocks, self.decoder_pred):
            module.apply(_xavier)
        nn.init.normal_(self.mask_token, std=0.02)

    def _decoder_pos(self, grid: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
        if self.options.decoder_pos_embed == "learned":
            return resample_abs_pos_embed(
                self.decoder_pos_embed, list(grid), list(self.grid), num_prefix_tokens=0
            )
        return build_sincos2d_pos_embed(
            list(grid), self.options.decoder_dim, device=like.device, dtype=like.dtype
        )[None]

    def training_step(self, crops: list[torch.Tensor], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        images = crops[0]
        bb, npt = self.backbone, self.backbone.num_prefix_tokens
        x = bb._pos_embed(bb.patch_embed(images))  # (B, prefix + N, C), handles NHWC (dynamic_img_size)
        prefix, patches = x[:, :npt], x[:, npt:]
        b, n, c = patches.shape
        grid = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
        m = random_masking(b, n, self.options.mask_ratio, device=images.device)
        visible = torch.gather(patches, 1, m.ids_keep[..., None].expand(-1, -1, c))
        x = bb.norm(bb.blocks(getattr(bb, "norm_pre", nn.Identity())(torch.cat([prefix, visible], dim=1))))

        x = self.decoder_embed(x)
        d = x.shape[-1]
        tokens = torch.cat(
            [x[:, npt:], self.mask_token.expand(b, n - visible.shape[1], -1).to(x.dtype)], dim=1
        )
        tokens = torch.gather(tokens, 1, m.ids_restore[..., None].expand(-1, -1, d))  # back to patch order
        tokens = tokens + self._decoder_pos(grid, tokens).to(tokens.dtype)
        x = self.decoder_norm(self.decoder_blocks(torch.cat([x[:, :npt], tokens], dim=1)))
        pred = self.decoder_pred(x[:, npt:])
        loss = mae_loss(pred, patchify(images, self.patch_size), m.mask, self.options.norm_pix_loss)
        return loss, {}


def _xavier(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
