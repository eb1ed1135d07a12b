"""Pipeline-stage commands: prepare-data, train-teacher, distill, evaluate.

Each takes the job's resolved settings (``--settings`` JSON, see ``sidcore.settings``) and explicit
input and output paths, so the workflow states every file a job reads and writes.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np


def _settings(args: argparse.Namespace) -> dict:
    from sidcore.settings import loads
    return loads(args.settings)


def _log(msg: str) -> None:
    print(msg, flush=True)


def prepare_data(args: argparse.Namespace) -> int:
    from sidcore import prepare
    from sidcore.dataset import link_image_zip, read_image_zip, write_image_zip
    from sidcore.preflight import check_data_shape, check_data_source
    settings = _settings(args)
    data = settings["data"]
    key = f"datasets.{settings['dataset']}.data"
    source = data["source"]
    check_data_source(settings)
    if source == "sklearn-digits":
        from sklearn.datasets import load_digits
        digits = load_digits()
        images = np.round(digits.images * (255 / 16)).astype(np.uint8)[:, None]  # 0..16 → 0..255, [N, 1, 8, 8]
        write_image_zip(args.out, images, digits.target)
        _log(f"{len(images)} digits ({images.shape[-1]}x{images.shape[-1]}, 10 classes) -> {args.out}")
    elif source == "edm-zip":
        check_data_shape(settings, read_image_zip(data["path"], use_labels=settings["label_dim"] > 0))
        n = link_image_zip(data["path"], args.out)
        _log(f"{data['path']}: {n} items -> {args.out}")
    elif source == "cifar10-archive":
        prepare.cifar10_from_archive(_required(args, "archive", source), args.out, log=_log)
    elif source == "image-folder":
        prepare.images_from_folder(data["path"], args.out, settings["resolution"], data["transform"], data["labels"],
                                   log=_log)
    elif source == "vae-latents":
        import torch
        from sidcore.latent import StabilityVAE
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        vae = StabilityVAE(_required(args, "vae", source), device)
        prepare.latents_from_folder(data["path"], args.out, vae.encode, settings["latent"]["resolution"],
                                    data["labels"], transform=data["transform"], log=_log)
    else:
        raise ValueError(f"{key}.source={source!r} is not a known data source")
    return 0


def _required(args: argparse.Namespace, name: str, source: str) -> str:
    value = getattr(args, name)
    if value is None:
        raise ValueError(f"prepare-data: data source {source} needs --{name}")
    return value


def train_teacher(args: argparse.Namespace) -> int:
    from sidcore.teacher import train_teacher as train
    train(_settings(args), args.data, args.out, log=_log)
    return 0


def distill(args: argparse.Namespace) -> int:
    from sidcore import REQUEUE_EXIT
    from sidcore.distill import Distiller
    from sidcore.distributed import init_from_env, shutdown
    from sidcore.evaluate import TRAINING_METRICS, Evaluator, generator_sampler
    from sidcore.preflight import check_evaluation
    settings = _settings(args)
    Path(args.outdir).mkdir(parents=True, exist_ok=True)
    if (settings["init"] is None) != (args.init is None):
        raise ValueError(f"datasets.{settings['dataset']}.methods.{settings['method']}.init={settings['init']!r} "
                         f"but --init was {'not ' if args.init is None else ''}given")
    d = settings["distill"]
    check_evaluation(settings)
    ctx = init_from_env()
    distiller = Distiller(settings, args.teacher, args.data, args.outdir, init_path=args.init, ctx=ctx,
                          vae_path=args.vae)
    # In-training evaluation (model selection) as in the official loops: FID, and IS where configured.
    evaluator = Evaluator.from_settings(settings, distiller.dataset, args.refs, args.detector_weights,
                                        ctx.device, distiller.vae, ctx=ctx, log=_log,
                                        metric_names=[m for m in settings["metrics"] if m in TRAINING_METRICS])
    batch = settings["evaluation"]["batch"]

    def evaluate(G_ema):
        return evaluator(generator_sampler(G_ema, d["init_sigma"]), d["eval_images"], batch, run=-1)

    try:
        return 0 if distiller.run(evaluate, log=_log) else REQUEUE_EXIT
    finally:
        shutdown(ctx)


def evaluate(args: argparse.Namespace) -> int:
    from sidcore import REQUEUE_EXIT
    from sidcore.distributed import init_from_env, shutdown
    from sidcore.evaluate import Stopped, evaluate_runs
    from sidcore.preflight import check_evaluation
    from sidcore.summary import write_json
    settings = _settings(args)
    check_evaluation(settings)
    Path(args.outdir).mkdir(parents=True, exist_ok=True)
    ctx = init_from_env()
    try:
        for result in evaluate_runs(settings, args.model, args.kind, args.data, args.refs, args.detector_weights,
                                    settings["evaluation"]["runs"], args.outdir, vae=args.vae,
                                    dinov2_weights=args.dinov2_weights, pr_reference=args.pr_reference,
                                    released=args.released, ctx=ctx, log=_log):
            write_json(result, Path(args.outdir) / f"run{result['run']}.json")
            _log(f"run {result['run']}: " + ", ".join(f"{k} {v:.4f}" for k, v in result["metrics"].items()))
    except Stopped as e:
        _log(f"{e}: finished runs are kept; exiting for a requeue")
        return REQUEUE_EXIT
    finally:
        shutdown(ctx)
    return 0


def ddp_check(args: argparse.Namespace) -> int:
    """All-reduce across the job's processes: shows that ranks, rendezvous and backend work before a long run."""
    import socket

    import torch
    import torch.distributed as dist

    from sidcore.distributed import gather, init_from_env, shutdown
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
        from sidcore.summary import write_json
        result = {"world_size": ctx.world_size, "backend": backend, "sum": total.item(), "expected": expected,
                  "ranks": ranks}
        write_json(result, Path(args.out))
        _log(f"{ctx.world_size} processes ({backend}): all-reduce sum {total.item():g}, expected {expected:g}")
    if total.item() != expected:
        raise RuntimeError(f"all-reduce gave {total.item()} on rank {ctx.rank}, expected {expected}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    def add(name: str, func, help: str) -> argparse.ArgumentParser:
        p = subparsers.add_parser(name, help=help)
        p.add_argument("--settings", required=True, help="resolved job settings (JSON)")
        p.set_defaults(func=func)
        return p

    p = add("prepare-data", prepare_data, "build a dataset zip in EDM's layout")
    p.add_argument("--out", required=True)
    p.add_argument("--archive", help="the downloaded archive (cifar10-archive)")
    p.add_argument("--vae", help="VAE directory (vae-latents)")

    p = add("train-teacher", train_teacher, "train an EDM teacher with EDM's loss")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)

    p = add("distill", distill, "SiD / SiDA / SiD²A distillation (resumes from --outdir)")
    for flag in ("--teacher", "--data", "--refs", "--detector-weights", "--outdir"):
        p.add_argument(flag, required=True)
    p.add_argument("--init", help="SiD²A: generator snapshot to start from")
    add_model_inputs(p)

    p = subparsers.add_parser("ddp-check", help="all-reduce across the job's processes (checks a launch set-up)")
    p.add_argument("--out", required=True, help="JSON written by rank 0: world size, backend, sum, ranks")
    p.set_defaults(func=ddp_check)

    p = add("evaluate", evaluate, "the evaluation runs of a generator or teacher (writes OUTDIR/run{r}.json; "
                                  "resumes after a requeue)")
    for flag in ("--model", "--data", "--refs", "--detector-weights", "--outdir"):
        p.add_argument(flag, required=True)
    p.add_argument("--kind", choices=("generator", "teacher"), required=True)
    p.add_argument("--released", metavar="KEY", help="registry key of the released generator evaluated")
    p.add_argument("--pr-reference", help="reference batch of real images for precision/recall (npz, arr_0)")
    p.add_argument("--dinov2-weights", help="DINOv2 ViT-L/14 weights for FD_DINOv2")
    add_model_inputs(p)


def add_model_inputs(p: argparse.ArgumentParser) -> None:
    """The input of latent-space datasets, given where configured."""
    p.add_argument("--vae", help="VAE directory (diffusers layout) of a latent-space dataset")



if __name__ == "__main__":
    sys.exit("use the `sidcore` command")
