"""BAM method: backbone + 3-layer GELU projector, optional EMA teacher, BAM loss.

Every published BAM script uses the teacher variant: the Sinkhorn input is teacher-vs-teacher
similarities and the source is student-vs-teacher; the teacher (backbone + projector) processes all
crops and follows a cosine momentum schedule from ``momentum`` to 1.

Per-step logs: ``reg`` (the scheduled Sinkhorn regularisation of this step) and the entropies of
:func:`trainers.losses.bam.attention_entropies` (``bam_target_entropy``, ``bam_attn_entropy_global``,
``bam_attn_entropy_local`` with local crops), read off the loss's own tensors. The target entropy
falls as ``reg`` falls; one near 0 while the source entropy stays high says the target is sharper
than the student can follow.
"""

from __future__ import annotations

import torch

from trainers.heads import MLPHead
from trainers.losses.bam import BAMLoss
from trainers.methods.base import Method, MethodContext, forward_by_resolution, make_teacher
from trainers.methods.options import BAMOptions
from trainers.schedules import reg_schedule


class BAM(Method):
    name = "bam"
    Options = BAMOptions
    #: epoch means reported beside the epoch loss (MLflow, Ray Tune), so a sweep can watch the targets
    epoch_logs = ("bam_target_entropy", "bam_attn_entropy_global", "bam_attn_entropy_local")

    def __init__(self, options: BAMOptions, ctx: MethodContext):
        super().__init__(options, ctx)
        o = options
        self.backbone = ctx.backbone
        self.projector = MLPHead(
            ctx.feat_dim,
            o.proj_hidden_dim,
            o.proj_out_dim,
            num_layers=o.proj_layers,
            batch_norm=o.proj_batch_norm,
            activation="relu" if o.proj_batch_norm else "gelu",
        )
        if o.teacher:
            self.teacher_backbone = make_teacher(self.backbone)
            self.teacher_projector = make_teacher(self.projector)
        self.criterion = BAMLoss(
            num_crops=ctx.num_crops,
            num_global_crops=ctx.num_global_crops,
            num_target_crops=o.num_target_crops,
            reg=o.reg,
            temperature=o.temperature,
            num_sink_iter=o.num_sink_iter,
            top_k_sink=o.top_k_sink,
            positive_masking=o.positive_masking,
            block_images=o.loss_block_images,
        )

    def training_step(self, crops: list[torch.Tensor], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        o = self.options
        z = self.projector(forward_by_resolution(self.backbone, crops))
        z_teacher = None
        if o.teacher:
            with torch.no_grad():
                z_teacher = self.teacher_projector(forward_by_resolution(self.teacher_backbone, crops))
        reg = reg_schedule(o.reg, o.reg_final, o.reg_warmup_epochs, step / max(self.ctx.steps_per_epoch, 1))
        loss, stats = self.criterion(z, z_teacher, reg=reg, return_stats=True)
        # One device sync for all entropies; the engine syncs on the loss at this point anyway.
        logs = {"reg": reg, **dict(zip(stats, torch.stack(list(stats.values())).tolist()))}
        return loss, logs

    @torch.no_grad()
    def target_matrices(
        self, crops: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """BAM's target ``P`` and source attention ``Q`` (global rows) for a fixed batch of crops, as the
        current networks (in eval mode) give them, with their entropies: the run's picture of its targets."""
        o = self.options
        modules = [self.backbone, self.projector]
        if o.teacher:
            modules += [self.teacher_backbone, self.teacher_projector]
        modes = [m.training for m in modules]
        for m in modules:
            m.eval()
        try:
            z = self.projector(forward_by_resolution(self.backbone, crops))
            z_teacher = (
                self.teacher_projector(forward_by_resolution(self.teacher_backbone, crops))
                if o.teacher
                else None
            )
            p, q, stats = self.criterion.matrices(z, z_teacher)
        finally:
            for m, mode in zip(modules, modes):
                m.train(mode)
        return p, q, {k: float(v) for k, v in stats.items()}

    def momentum_pairs(self):
        if not self.options.teacher:
            return []
        return [(self.backbone, self.teacher_backbone), (self.projector, self.teacher_projector)]

    def eval_backbone(self):
        return self.teacher_backbone if self.options.teacher else self.backbone
