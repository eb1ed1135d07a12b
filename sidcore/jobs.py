"""The pipeline's multi-process jobs as library calls: a distillation run, the evaluation runs of a model,
and a check of the process group. Each sets up the process group from the environment (``sidcore.distributed``)
and returns the command's exit status: 0, or ``REQUEUE_EXIT`` when a stop signal ended it early.
"""
from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from sidcore import REQUEUE_EXIT
from sidcore.distributed import gather, init_from_env, shutdown
from sidcore.errors import UserError
from sidcore.summary import write_json

Log = Callable[[str], None]


def distill(settings: dict, *, teacher: str, data: str, refs: str, detector_weights: str, outdir: str,
            init: str | None = None, vae: str | None = None, tensorboard: bool = False, start_over: str | None = None,
            on_changed_settings: str = "stop", log: Log = print) -> int:
    """Distil (or resume distilling) into ``outdir`` until the configured duration (``tensorboard``: also write
    event files). ``start_over`` and ``on_changed_settings``: when the run starts over (``sidcore.run_record``)."""
    from sidcore import training_state
    from sidcore.distill import Distiller
    from sidcore.evaluate import TRAINING_METRICS, Evaluator, generator_sampler
    from sidcore.preflight import check_evaluation, check_schedule
    if (settings["init"] is None) != (init is None):
        raise UserError(f"datasets.{settings['dataset']}.methods.{settings['method']}.init={settings['init']!r} "
                        f"but --init was {'not ' if init is None else ''}given")
    check_evaluation(settings)
    check_schedule(settings)
    Path(outdir).mkdir(parents=True, exist_ok=True)
    ctx = init_from_env()
    try:
        training_state.begin(Path(outdir), ctx, settings, {"teacher": teacher, "init": init}, start=start_over,
                             on_change=on_changed_settings, log=log)
        distiller = Distiller(settings, teacher, data, outdir, init_path=init, ctx=ctx, vae_path=vae)
        # In-training evaluation (model selection) as in the official loops: FID, and IS where configured.
        evaluator = Evaluator.from_settings(settings, distiller.dataset, refs, detector_weights, ctx.device,
                                            distiller.vae, ctx=ctx, log=log,
                                            metric_names=[m for m in settings["metrics"] if m in TRAINING_METRICS])
        d, batch = settings["distill"], settings["evaluation"].batch

        def evaluate(G_ema: torch.nn.Module) -> dict:
            return evaluator(generator_sampler(G_ema, d.init_sigma), d.eval_images, batch, run=-1)

        return 0 if distiller.run(evaluate, log=log, tensorboard=tensorboard) else REQUEUE_EXIT
    finally:
        shutdown(ctx)


def evaluate(settings: dict, *, model: str, kind: str, data: str, refs: str, detector_weights: str, outdir: str,
             vae: str | None = None, dinov2_weights: str | None = None, pr_reference: str | None = None,
             released: str | None = None, log: Log = print) -> int:
    """The evaluation runs of ``model`` (``outdir/run{r}.json``), resuming after the last finished run."""
    from sidcore.evaluate import Stopped, evaluate_runs
    from sidcore.preflight import check_evaluation
    check_evaluation(settings)
    Path(outdir).mkdir(parents=True, exist_ok=True)
    ctx = init_from_env()
    try:
        for result in evaluate_runs(settings, model, kind, data, refs, detector_weights,
                                    settings["evaluation"].runs, outdir, vae=vae, dinov2_weights=dinov2_weights,
                                    pr_reference=pr_reference, released=released, ctx=ctx, log=log):
            write_json(result, Path(outdir) / f"run{result['run']}.json")
            log(f"run {result['run']}: " + ", ".join(f"{k} {v:.4f}" for k, v in result["metrics"].items()))
    except Stopped as e:
        log(f"{e}: finished runs are kept; exiting for a requeue")
        return REQUEUE_EXIT
    finally:
        shutdown(ctx)
    return 0


def ddp_check(out: str, log: Log = print) -> int:
    """All-reduce across the job's processes: shows that ranks, rendezvous and backend work before a long run."""
    ctx = init_from_env()
    total = torch.tensor([float(ctx.rank + 1)], device=ctx.device)
    if ctx.world_size > 1:
        dist.all_reduce(total)
    expected = ctx.world_size * (ctx.world_size + 1) / 2
    ranks = gather(ctx, {"rank": ctx.rank, "host": socket.gethostname(), "device": str(ctx.device),
                         "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                         "threads": torch.get_num_threads(), "mkl_threads": os.environ.get("MKL_NUM_THREADS")})
    backend = dist.get_backend() if dist.is_initialized() else "none"
    shutdown(ctx)
    if ctx.is_main:
        write_json({"world_size": ctx.world_size, "backend": backend, "sum": total.item(), "expected": expected,
                    "ranks": ranks}, Path(out))
        log(f"{ctx.world_size} processes ({backend}): all-reduce sum {total.item():g}, expected {expected:g}")
    if total.item() != expected:
        raise RuntimeError(f"all-reduce gave {total.item()} on rank {ctx.rank}, expected {expected}")
    return 0
