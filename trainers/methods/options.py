"""The methods' option sections (``method.*`` of a config), apart from the methods themselves.

Torch-free on purpose: a run's config travels to Ray Train's controller inside the workers' plan, and
unpickling an options object imports the module that defines its class. Defined next to the ``Method``
(which is a ``torch.nn.Module``), every Ray Train controller imported torch, about 2 s of CPU on the
start-up's critical path (``tests/test_imports.py``). A new method may define its ``Options`` in its own
module; it then pays that cost.

Each section's ``check(ctx)`` is the method's cross-field validation (crops, batch, patches: the ``ctx``
of :func:`orchestrator.config.validate_cross_fields`), here for the same reason: ``bamray`` validates a
config before it starts anything, and a check that imported the method imported torch there, about 2 s
before Ray could start (:data:`BY_METHOD` finds a method's section without importing the method).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from trainers.options import ConfigError, opt


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """MAE's visible patches per image (the official ``int(N * (1 - ratio))``)."""
    return int(num_patches * (1.0 - mask_ratio))


@dataclasses.dataclass
class BAMOptions:
    reg: float = opt(0.05, gt=0.0, le=10.0, help="Sinkhorn entropy regularisation (smaller = sharper target)")
    reg_final: float | None = opt(
        None, gt=0.0, le=10.0, help="end of the linear reg warm-up (None = constant)"
    )
    reg_warmup_epochs: int = opt(30, ge=0, help="epochs of the reg warm-up (official: 30)")
    temperature: float = opt(0.1, gt=0.0, le=10.0, help="softmax temperature of the source attention")
    num_sink_iter: int = opt(3, ge=1, le=100)
    top_k_sink: int = opt(
        0, ge=0, help="keep the top-k target entries (0 = all); <= targets in the global batch"
    )
    positive_masking: bool = opt(True)
    loss_block_images: int = opt(
        -1,
        ge=-1,
        help="images per block of the loss (all their crops): -1 = automatic, 0 = the dense form; "
        "the same loss and gradients, without a whole (rows x columns) matrix in memory",
    )
    num_target_crops: int = opt(2, ge=1, help="leading crops that form the attention columns")
    teacher: bool = opt(True, help="targets from an EMA teacher (every published BAM run)")
    momentum: float = opt(0.995, ge=0.0, le=1.0, help="teacher EMA momentum start (cosine to 1)")
    proj_hidden_dim: int = opt(1024, ge=1, help="published: 4096")
    proj_out_dim: int = opt(256, ge=1, help="published: 4096")
    proj_layers: int = opt(3, ge=1)
    proj_batch_norm: bool = opt(
        False,
        help="BatchNorm + ReLU in the projector's hidden layers (as BYOL/SimCLR; "
        "official BAM: GELU, no BN, built for ViTs)",
    )

    def check(self, ctx: dict[str, Any]) -> None:
        num_crops = ctx["num_global_crops"] + ctx["num_local_crops"]
        if self.num_target_crops > num_crops:
            raise ConfigError(
                "method.num_target_crops",
                f"got {self.num_target_crops}; must be in [1, {num_crops}] (global + local crops)",
            )
        targets = self.num_target_crops * ctx["batch_size"] * ctx["world_size"]
        if self.top_k_sink > targets:
            raise ConfigError(
                "method.top_k_sink",
                f"got {self.top_k_sink}; must be in [0, {targets}] (num_target_crops x batch_size"
                f" x workers = targets in the global batch)",
            )


@dataclasses.dataclass
class BYOLOptions:
    momentum: float = opt(
        0.99, ge=0.0, le=1.0, help="target EMA tau at step 0, cosine to 1 (paper: 0.996 at batch 4096)"
    )
    proj_hidden_dim: int = opt(1024, ge=1, help="paper: 4096")
    proj_out_dim: int = opt(256, ge=1, help="paper: 256")
    pred_hidden_dim: int = opt(1024, ge=1, help="paper: 4096")

    def check(self, ctx: dict[str, Any]) -> None:
        if ctx["num_global_crops"] != 2:
            raise ConfigError(
                "data.global_crops",
                f"got {ctx['num_global_crops']}; BYOL uses exactly 2 global views (t and t')",
            )


@dataclasses.dataclass
class DINOOptions:
    out_dim: int = opt(4096, ge=2, help="prototypes K (official: 65536)")
    hidden_dim: int = opt(1024, ge=1, help="official: 2048")
    bottleneck_dim: int = opt(256, ge=1, help="official: 256")
    head_layers: int = opt(3, ge=1, le=8)
    norm_last_layer: bool = opt(True, help="fix the prototype norms (stabler for ViTs)")
    head_batch_norm: bool = opt(
        False, help="BatchNorm in the head's hidden layers (official --use_bn_in_head, for ResNets)"
    )
    momentum: float = opt(0.996, ge=0.0, le=1.0, help="teacher EMA momentum at step 0, cosine to 1")
    teacher_temp: float = opt(
        0.04, gt=0.0, le=1.0, help="teacher temperature after the warm-up (official 0.04-0.07)"
    )
    warmup_teacher_temp: float = opt(0.04, gt=0.0, le=1.0, help="teacher temperature at step 0")
    warmup_teacher_temp_epochs: float = opt(
        0.0, ge=0.0, help="linear teacher-temperature warm-up (official: 30)"
    )
    student_temp: float = opt(0.1, gt=0.0, le=10.0)
    center_momentum: float = opt(0.9, ge=0.0, le=1.0)
    freeze_last_layer_epochs: float = opt(
        1.0, ge=0.0, help="epochs with the prototype layer frozen (official: 1)"
    )

    def check(self, ctx: dict[str, Any]) -> None:
        if ctx["num_global_crops"] + ctx["num_local_crops"] < 2:
            raise ConfigError(
                "data.local_crops", "DINO needs >= 2 crops in total (global + local) to compare views"
            )


@dataclasses.dataclass
class MAEOptions:
    mask_ratio: float = opt(
        0.75, gt=0.0, lt=1.0, help="fraction of patches hidden from the encoder (paper: 0.75)"
    )
    decoder_dim: int = opt(128, ge=8, help="paper: 512")
    decoder_depth: int = opt(2, ge=1, le=32, help="paper: 8")
    decoder_heads: int = opt(4, ge=1, help="must divide decoder_dim")
    decoder_pos_embed: str = opt("fixed", choices=("fixed", "learned"), help="2-D sin-cos (paper) or learned")
    norm_pix_loss: bool = opt(True, help="regress per-patch normalised pixels (paper default)")

    def check(self, ctx: dict[str, Any]) -> None:
        if self.decoder_dim % self.decoder_heads:
            raise ConfigError(
                "method.decoder_heads",
                f"got {self.decoder_heads}; must divide method.decoder_dim ({self.decoder_dim})",
            )
        kwargs = ctx.get("backbone_kwargs") or {}
        # timm's ViT moves its final norm to ``fc_norm`` (applied after pooling) when global_pool is avg/max
        # and fc_norm is not given: MAE's encoder runs on tokens and never pools, so that norm would get no
        # gradient (DDP fails on unused parameters) and would stay untrained.
        pooled_norm = kwargs.get("fc_norm") is not False and kwargs.get("final_norm") is not False
        if kwargs.get("global_pool") in ("avg", "avgmax", "max") and pooled_norm:
            raise ConfigError(
                "model.backbone_kwargs",
                f"global_pool={kwargs['global_pool']!r} needs fc_norm: false (a trained per-token final norm) or "
                "final_norm: false (none) with MAE: timm otherwise puts the final norm after the pooling, "
                "which MAE's encoder never runs",
            )
        if ctx.get("patch_size"):
            n = (ctx["image_size"] // ctx["patch_size"]) ** 2
            if num_visible(n, self.mask_ratio) < 1:
                raise ConfigError(
                    "method.mask_ratio",
                    f"got {self.mask_ratio}; leaves no visible patch of {n} "
                    f"(need mask_ratio <= {1 - 1 / n:.4f})",
                )


@dataclasses.dataclass
class SimCLROptions:
    temperature: float = opt(
        0.2, gt=0.0, le=10.0, help="NT-Xent temperature (paper: 0.1 at batch 4096; 0.2-0.5 for small batches)"
    )
    proj_hidden_dim: int = opt(1024, ge=1, help="paper: 2048")
    proj_out_dim: int = opt(128, ge=1, help="paper: 128")
    proj_layers: int = opt(2, ge=1, le=8, help="paper v1: 2, v2: 3")
    gather_distributed: bool = opt(
        True, help="negatives from all workers' batches (all-gather with gradients)"
    )

    def check(self, ctx: dict[str, Any]) -> None:
        if ctx["num_global_crops"] != 2:
            raise ConfigError(
                "data.global_crops", f"got {ctx['num_global_crops']}; SimCLR uses exactly 2 global views"
            )
        if ctx["batch_size"] * ctx["world_size"] < 2:
            raise ConfigError(
                "optim.batch_size", "NT-Xent needs >= 2 images in the (global) batch for negatives"
            )


#: Each shipped method's option section by ``method.name``; a method whose ``Options`` live elsewhere is
#: found through the registry (:func:`trainers.methods.get_options`; ``tests/test_methods.py`` checks
#: that this table and the methods' own ``Options`` agree).
BY_METHOD: dict[str, type] = {
    "bam": BAMOptions,
    "byol": BYOLOptions,
    "dino": DINOOptions,
    "mae": MAEOptions,
    "simclr": SimCLROptions,
}
