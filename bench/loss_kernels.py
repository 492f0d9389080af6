"""Section 1 -- loss kernels: forward + backward time and peak memory vs batch x crops.

Every loss sees the same synthetic projections (``embedding dim 256``, crop-major, global crops first)
so only the kernel is timed. BAM's attention is ``(V*B) x (T*B)``: quadratic in the batch and linear in
the crops, while DINO is linear in both and SimCLR's ``2B x 2B`` logits are quadratic in the batch. The
growth figures (log-log slope from the smallest to the largest batch) make that visible.

The plain alternative of BAM's fused reduction is the straightforward per-(target, view) loop of the
official code (``BAMLoss(vectorized=False)``); both are checked equal to 1e-5 (loss and gradients)
before they are timed -- a speed-up of a wrong kernel would be worthless.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from bench.common import BenchContext, Figure, SectionResult, measure

EMBED_DIM = 256
CROPS = {"2g": (2, 0), "2g+6l": (2, 6)}
#: CPU kernels run on ONE intra-op thread. With 2 threads on a 2-core machine shared with anything else,
#: every parallel op waits for its descheduled straggler: medians jumped 30x between neighbouring batch
#: sizes. One thread measures the kernel's cost, which is what the fused-vs-loop and growth figures need.
CPU_THREADS = 1
#: A repeat times as many back-to-back calls as fit in this many seconds (at least one) and reports the
#: per-call mean: sub-millisecond kernels are otherwise dominated by timer and scheduler noise.
MIN_REPEAT_S = 0.05


def peak_memory_mib(fn: Callable[[], Any], device: str) -> float:
    """Peak bytes *allocated by torch* during ``fn`` above what was allocated before it, in MiB.

    CUDA: the caching allocator's own peak counter (``max_memory_allocated``). CPU: tracemalloc does
    not see torch's C++ allocations and RSS hides reuse of freed pages, so the CPU figure replays the
    allocator's event stream from ``torch.profiler`` (``profile_memory=True``: one ``[memory]`` event
    of +bytes / -bytes per allocation / free) and takes the maximum of its running sum.
    """
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak / 2**20


def _sync(device: str) -> Callable[[], None] | None:
    return torch.cuda.synchronize if device.startswith("cuda") else None


def _autocast(device: str, enabled: bool = True):
    # bf16 autocast on CUDA as the training step uses; fp32 on CPU (CPU autocast is not what we run).
    dev = torch.device(device).type
    return torch.autocast(device_type=dev, dtype=torch.bfloat16, enabled=enabled and dev == "cuda")


def make_loss_step(
    kind: str, batch: int, n_global: int, n_local: int, device: str, seed: int = 0, autocast: bool = True
) -> Callable[[], torch.Tensor] | None:
    """A closure doing one forward + backward of loss ``kind`` on fixed random projections.

    Returns None where the combination does not exist (SimCLR consumes exactly 2 views)."""
    from trainers.losses.bam import BAMLoss
    from trainers.losses.dino import DINOLoss
    from trainers.losses.simclr import NTXentLoss

    n_views = n_global + n_local
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n_views * batch, EMBED_DIM, generator=gen).to(device).requires_grad_(True)
    z_teacher = torch.randn(n_views * batch, EMBED_DIM, generator=gen).to(device)

    if kind in ("bam", "bam_loop", "bam_blocked"):
        loss_mod = BAMLoss(
            num_crops=n_views,
            num_global_crops=n_global,
            num_target_crops=n_global,
            reg=0.05,
            temperature=0.1,
            num_sink_iter=3,
            vectorized=kind != "bam_loop",
            block_images=forced_block(batch, n_views, n_global, device) if kind == "bam_blocked" else 0,
        ).to(device)

        def forward() -> torch.Tensor:
            return loss_mod(z, z_teacher)  # teacher variant, as every published BAM run
    elif kind == "dino":
        loss_mod = DINOLoss(EMBED_DIM, num_global_crops=n_global).to(device)
        t_out = z_teacher[: n_global * batch]

        def forward() -> torch.Tensor:
            return loss_mod(z, t_out, teacher_temp=0.04)
    elif kind == "simclr":
        if n_views != 2:
            return None
        loss_mod = NTXentLoss(temperature=0.2, gather_distributed=False)

        def forward() -> torch.Tensor:
            return loss_mod(z[:batch], z[batch:])
    else:
        raise ValueError(f"unknown loss kind {kind!r}")

    def step() -> torch.Tensor:
        z.grad = None
        with _autocast(device, autocast):
            loss = forward()
        loss.backward()
        return loss.detach()

    step.z = z  # type: ignore[attr-defined]  # tests of equality read the gradient
    return step


def reduction_steps(batch: int, n_global: int, n_local: int, device: str) -> dict[str, Callable[[], Any]]:
    """Forward + backward of only BAM's cross-view reduction, fused vs loop, on a fixed target ``P`` and
    source ``log Q`` of the loss's shapes (``(G*B, T*B)`` and ``(V*B, T*B)``)."""
    from trainers.losses.bam import cross_view_loss, cross_view_loss_loop

    n_views, k = n_global + n_local, n_global * batch
    gen = torch.Generator().manual_seed(1)
    p = torch.softmax(torch.randn(n_global * batch, k, generator=gen), dim=-1).to(device)
    logits = torch.randn(n_views * batch, k, generator=gen).to(device).requires_grad_(True)

    def make(fn):
        def step() -> None:
            logits.grad = None
            fn(p, torch.log_softmax(logits, dim=-1), n_global, n_views).backward()

        return step

    return {"bam": make(cross_view_loss), "bam_loop": make(cross_view_loss_loop)}


def check_bam_fused_equals_loop(
    batch: int, n_global: int, n_local: int, device: str, tol: float = 1e-5
) -> dict:
    """Loss and gradient of the fused and the loop reduction on the same inputs, in fp32.

    Raises AssertionError when they differ by more than ``tol`` (absolute on the loss, relative to
    the largest gradient entry on the gradients)."""
    fused = make_loss_step("bam", batch, n_global, n_local, device, autocast=False)
    loop = make_loss_step("bam_loop", batch, n_global, n_local, device, autocast=False)
    lf, ll = fused(), loop()
    gf, gl = fused.z.grad, loop.z.grad  # type: ignore[attr-defined]
    loss_diff = float((lf - ll).abs())
    grad_diff = float((gf - gl).abs().max() / gl.abs().max().clamp_min(1e-30))
    assert loss_diff <= tol * max(1.0, float(ll.abs())), f"BAM fused vs loop loss differ by {loss_diff:.3g}"
    assert grad_diff <= tol, f"BAM fused vs loop gradients differ by {grad_diff:.3g} (relative)"
    return {"loss_abs_diff": loss_diff, "grad_rel_diff": grad_diff, "loss": float(ll)}


def forced_block(batch: int, n_views: int, n_global: int, device: str) -> int:
    """The automatic block size of the BAM loss, forced on at every batch (``block_images=-1`` would stay
    dense up to B=512 with 2+6 crops): the bench's "blocked" BAM loss."""
    from trainers.losses.bam_blocked import block_size

    return block_size(-1, batch, n_views, n_global * batch, torch.device(device).type)


def check_blocked_against_fp64(batch: int, n_global: int, n_local: int, device: str) -> dict:
    """The blocked and the dense BAM loss in fp32 against the loss in fp64 (where dense and blocked agree to
    1e-12, ``tests/test_bam_loss.py``), on the bench's inputs. In fp32 the dense loss itself is about 1e-6
    (relative) off the exact value at these sizes, so the blocked one is held to the exact value, not to the
    dense one's rounding. Raises AssertionError past 1e-6 (loss, relative) / 1e-5 (gradient, relative to
    its largest entry)."""
    from trainers.losses.bam import BAMLoss

    n_views = n_global + n_local
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(n_views * batch, EMBED_DIM, generator=gen)
    z_teacher = torch.randn(n_views * batch, EMBED_DIM, generator=gen)

    def run(block: int, dtype: torch.dtype) -> tuple[float, torch.Tensor]:
        fn = BAMLoss(
            n_views, n_global, n_global, reg=0.05, temperature=0.1, num_sink_iter=3, block_images=block
        )
        x = z.to(device, dtype).clone().requires_grad_(True)
        loss = fn(x, z_teacher.to(device, dtype))
        loss.backward()
        return float(loss), x.grad.double().cpu()

    exact, g_exact = run(0, torch.float64)
    out: dict[str, float] = {"loss_fp64": exact}
    for name, block in (("blocked", forced_block(batch, n_views, n_global, device)), ("dense", 0)):
        loss, grad = run(block, torch.float32)
        out[f"{name}_fp32_loss_rel_err"] = abs(loss - exact) / abs(exact)
        out[f"{name}_fp32_grad_rel_err"] = float((grad - g_exact).abs().max() / g_exact.abs().max())
    assert out["blocked_fp32_loss_rel_err"] <= 1e-6, f"blocked BAM loss off the fp64 loss: {out}"
    assert out["blocked_fp32_grad_rel_err"] <= 1e-5, f"blocked BAM gradient off the fp64 one: {out}"
    return out


def timed(step: Callable[[], Any], repeats: int, warmup: int, device: str) -> list[float]:
    """Per-call seconds: each repeat averages ``n`` back-to-back calls, ``n`` calibrated in warm-up."""
    sync = _sync(device)
    single = min(measure(step, 1, warmup, sync=sync))
    n = max(1, int(MIN_REPEAT_S / max(single, 1e-9)))

    def batch_of_calls() -> None:
        for _ in range(n):
            step()

    return [t / n for t in measure(batch_of_calls, repeats, 0, sync=sync)]


def run(ctx: BenchContext) -> SectionResult:
    if ctx.cuda:
        return _run(ctx)
    threads = torch.get_num_threads()
    torch.set_num_threads(CPU_THREADS)
    try:
        return _run(ctx)
    finally:
        torch.set_num_threads(threads)


def _run(ctx: BenchContext) -> SectionResult:
    res = SectionResult("loss")
    device = ctx.device
    batches = (16, 32) if ctx.quick else (64, 128, 256, 512)
    repeats, warmup, mem_repeats = (2, 1, 1) if ctx.quick else (9, 2, 2)
    kinds = ("bam", "bam_loop", "dino", "simclr")
    torch.manual_seed(0)

    checks = {}
    for crop_name, (g, loc) in CROPS.items():
        for b in batches:
            checks[f"{crop_name}_b{b}"] = check_bam_fused_equals_loop(b, g, loc, device)
    worst = max(c["grad_rel_diff"] for c in checks.values())
    res.derived["bam_fused_vs_loop_max_grad_rel_diff"] = worst
    res.derived["bam_fused_vs_loop_max_loss_abs_diff"] = max(c["loss_abs_diff"] for c in checks.values())
    res.derived["bam_fused_vs_loop_checks"] = checks
    res.notes.append(
        f"BAM fused == loop checked on every (batch, crops): worst gradient difference {worst:.2g} "
        "relative, loss difference within 1e-5 (asserted)."
    )

    medians: dict[tuple[str, str, int], tuple[float, float]] = {}
    for crop_name, (g, loc) in CROPS.items():
        for b in batches:
            for kind in kinds:
                step = make_loss_step(kind, b, g, loc, device)
                if step is None:
                    continue
                params = {
                    "loss": kind,
                    "batch": b,
                    "global_crops": g,
                    "local_crops": loc,
                    "dim": EMBED_DIM,
                    "device": device,
                    "precision": "bf16-autocast" if ctx.cuda else "fp32",
                    "threads": torch.get_num_threads(),
                }
                times = timed(step, repeats, warmup, device)
                mems = [peak_memory_mib(step, device) for _ in range(mem_repeats)]
                tname, mname = f"{kind} fwd+bwd {crop_name} B={b}", f"{kind} peak mem {crop_name} B={b}"
                res.add(Figure("loss", tname, "s", times, params=params))
                res.add(Figure("loss", mname, "MiB", mems, params=params))
                medians[(kind, crop_name, b)] = (res.get(tname).median, res.get(mname).median)
                del step
            res.compare(f"bam fwd+bwd {crop_name} B={b}", f"bam_loop fwd+bwd {crop_name} B={b}")
            res.compare(f"bam peak mem {crop_name} B={b}", f"bam_loop peak mem {crop_name} B={b}")
        ctx.log(f"  loss: crops {crop_name} done")

    # The fused reduction on its own (the rest of the loss -- Sinkhorn, log-softmax -- is shared by both).
    for crop_name, (g, loc) in CROPS.items():
        b = batches[-1]
        for label, fn in reduction_steps(b, g, loc, device).items():
            res.add(
                Figure(
                    "loss",
                    f"{label} reduction only {crop_name} B={b}",
                    "s",
                    timed(fn, repeats, warmup, device),
                    params={"batch": b, "global_crops": g, "local_crops": loc, "device": device},
                )
            )
        res.compare(f"bam reduction only {crop_name} B={b}", f"bam_loop reduction only {crop_name} B={b}")

    # Growth: log-log slope in the batch (1 = linear, 2 = quadratic) and the crops factor.
    lo, hi = batches[0], batches[-1]
    for kind in kinds:
        for crop_name in CROPS:
            if (kind, crop_name, lo) in medians and (kind, crop_name, hi) in medians:
                (t0, m0), (t1, m1) = medians[(kind, crop_name, lo)], medians[(kind, crop_name, hi)]
                span = math.log(hi / lo)
                res.derived[f"{kind} {crop_name} time slope vs batch ({lo}->{hi})"] = math.log(t1 / t0) / span
                if m0 > 0 and m1 > 0:
                    res.derived[f"{kind} {crop_name} memory slope vs batch ({lo}->{hi})"] = (
                        math.log(m1 / m0) / span
                    )
        if (kind, "2g", hi) in medians and (kind, "2g+6l", hi) in medians:
            (t2, m2), (t8, m8) = medians[(kind, "2g", hi)], medians[(kind, "2g+6l", hi)]
            res.derived[f"{kind} time x (2g+6l / 2g) at B={hi}"] = t8 / t2
            if m2 > 0:
                res.derived[f"{kind} memory x (2g+6l / 2g) at B={hi}"] = m8 / m2
    res.notes.append("SimCLR (NT-Xent) consumes exactly two views, so it has no 2g+6l rows.")
    _at_scale(ctx, res, repeats=2 if ctx.quick else 3)
    return res


#: batches of the dense vs blocked BAM comparison (2 global + 6 local crops)
SCALE_BATCHES = (256, 512, 1024, 2048)


def _at_scale(ctx: BenchContext, res: SectionResult, repeats: int) -> None:
    """BAM at large batches, 2g+6l: the dense loss vs the blocked one (``block_images=-1``: the device's
    automatic block), time and peak memory, each checked against the exact loss before it is timed."""
    device, (g, loc) = ctx.device, CROPS["2g+6l"]
    for b in (32, 64) if ctx.quick else SCALE_BATCHES:
        res.derived[f"bam_blocked vs bam 2g+6l B={b}"] = check_blocked_against_fp64(b, g, loc, device)
        for kind in ("bam", "bam_blocked"):
            step = make_loss_step(kind, b, g, loc, device)
            params = {"loss": kind, "batch": b, "global_crops": g, "local_crops": loc, "dim": EMBED_DIM}
            params.update(device=device, threads=torch.get_num_threads())
            res.add(
                Figure(
                    "loss",
                    f"{kind} fwd+bwd at scale B={b}",
                    "s",
                    timed(step, repeats, 1, device),
                    params=params,
                )
            )
            res.add(
                Figure(
                    "loss",
                    f"{kind} peak mem at scale B={b}",
                    "MiB",
                    [peak_memory_mib(step, device)],
                    params=params,
                )
            )
            del step
        res.compare(f"bam_blocked fwd+bwd at scale B={b}", f"bam fwd+bwd at scale B={b}")
        res.compare(f"bam_blocked peak mem at scale B={b}", f"bam peak mem at scale B={b}")
        ctx.log(f"  loss: dense vs blocked B={b} done")
    res.notes.append(
        "At scale (2g+6l, B up to 2048): the blocked BAM loss (block_images=-1) against the dense one. Before "
        "timing, at every batch, the fp32 blocked loss is asserted within 1e-6 (relative) of the fp64 loss "
        "and its gradient within 1e-5 (relative to the largest entry); the dense fp32 errors are beside it."
    )
