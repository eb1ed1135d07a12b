"""Commands of the pipeline's compute stages: prepare-data, train-teacher, distill, evaluate, ddp-check.

Each takes the job's resolved settings (``--settings`` JSON, see ``sidcore.settings``) and explicit
input and output paths, so the workflow states every file a job reads and writes.
"""
from __future__ import annotations

import argparse

from sidcore.cli.checks import output, plan_id
from sidcore.cli.console import say
from sidcore.run_record import ON_CHANGE


def prepare_data(args: argparse.Namespace) -> int:
    from sidcore.prepare import prepare_data as prepare
    from sidcore.settings import from_json
    prepare(from_json(args.settings, "prepare-data"), args.out, archive=args.archive, vae=args.vae, log=say)
    return 0


def train_teacher(args: argparse.Namespace) -> int:
    from sidcore.settings import from_json
    from sidcore.teacher import train_teacher as train
    train(from_json(args.settings, "train-teacher"), args.data, args.out, log=say)
    return 0


def distill(args: argparse.Namespace) -> int:
    from sidcore.jobs import distill as run
    from sidcore.settings import from_json
    from sidcore.tensorboard import require
    settings = from_json(args.settings, "distill")
    if args.tensorboard:
        require()  # the optional package, before any work
    return run(settings, teacher=args.teacher, data=args.data, refs=args.refs,
               detector_weights=args.detector_weights, outdir=args.outdir, init=args.init, vae=args.vae,
               tensorboard=args.tensorboard, start_over=args.start_over,
               on_changed_settings=args.on_changed_settings, log=say)


def evaluate(args: argparse.Namespace) -> int:
    from sidcore.jobs import evaluate as run
    from sidcore.settings import from_json
    return run(from_json(args.settings, "evaluate"), model=args.model, kind=args.kind, data=args.data, refs=args.refs,
               detector_weights=args.detector_weights, outdir=args.outdir, vae=args.vae,
               dinov2_weights=args.dinov2_weights, pr_reference=args.pr_reference, released=args.released, log=say)


def ddp_check(args: argparse.Namespace) -> int:
    from sidcore.jobs import ddp_check as run
    return run(args.out, log=say)


def register(subparsers: argparse._SubParsersAction) -> None:
    def add(name: str, func, help: str) -> argparse.ArgumentParser:
        p = subparsers.add_parser(name, help=help)
        p.add_argument("--settings", required=True, help="resolved job settings (JSON)")
        p.set_defaults(func=func)
        return p

    p = add("prepare-data", prepare_data, "build a dataset zip in EDM's layout")
    p.add_argument("--out", required=True, type=output("zip"))
    p.add_argument("--archive", help="the downloaded archive (cifar10-archive)")
    p.add_argument("--vae", help="VAE directory (vae-latents)")

    p = add("train-teacher", train_teacher, "train an EDM teacher with EDM's loss")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True, type=output("checkpoint"))

    p = add("distill", distill, "SiD / SiDA / SiD²A distillation (resumes from --outdir)")
    for flag in ("--teacher", "--data", "--refs", "--detector-weights", "--outdir"):
        p.add_argument(flag, required=True)
    p.add_argument("--init", help="SiD²A: generator snapshot to start from")
    p.add_argument("--tensorboard", action="store_true", help="also write TensorBoard event files (rank 0)")
    p.add_argument("--start-over", metavar="ID", type=plan_id,
                   help="start the run over, keeping the earlier run aside, unless the run was started by this "
                        "ID (a requeued job of the same plan continues)")
    p.add_argument("--on-changed-settings", choices=ON_CHANGE, default="stop",
                   help="a run started with other settings: refuse it, or start it over keeping it aside")
    add_model_inputs(p)

    p = subparsers.add_parser("ddp-check", help="all-reduce across the job's processes (checks a launch set-up)")
    p.add_argument("--out", required=True, type=output("JSON"),
                   help="JSON written by rank 0: world size, backend, sum, ranks")
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
