"""Commands around the pipeline: benchmark (speed of an iteration), launch (run a command as a job) and
check-config (read a configuration without evaluating anything in it)."""
from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path

from sidcore.cli.checks import POSITIVE
from sidcore.cli.console import echo, say


def benchmark(args: argparse.Namespace) -> int:
    from sidcore import benchmark as bench
    if args.only:
        layout, method, engine = args.only.split(":")
        row = (bench.measure_evaluation(layout, engine, args.repeats) if method == "evaluation"
               else bench.measure(layout, method, engine, args.repeats, args.profile))
        print(json.dumps(row), flush=True)
    else:
        bench.run(args.layouts, args.methods, args.engines, args.repeats, args.out, args.evaluation, args.profiles,
                  log=say)
    return 0


def launch(args: argparse.Namespace) -> int:
    from sidcore.launch import JobSpec
    from sidcore.launch import launch as run
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    spec = JobSpec(**{f.name: getattr(args, f.name) for f in fields(JobSpec)})
    return run(spec, command, Path(args.logdir), args.lost_after_s, echo=echo)


def check_config(args: argparse.Namespace) -> int:
    from sidcore import config
    for path in args.files:
        config.read(path)
        say(f"{path}: plain values, readable as a configuration or an overlay")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from sidcore.launch import EXECUTORS, JobSpec

    p = subparsers.add_parser("benchmark", help="time a distillation iteration, its required network passes and "
                              "evaluation, eager and with each execution lever")
    p.add_argument("--layouts", nargs="+", default=["tiny", "cifar10", "imagenet64", "edm2-xs"],
                   help="layouts to measure (sidcore/benchmark.py LAYOUTS; default: all)")
    p.add_argument("--methods", nargs="+", default=["sid", "sida"], help="(default: sid sida)")
    p.add_argument("--engines", nargs="+", default=["eager", "compile", "channels_last", "fused_attention",
                                                    "fused_adam", "all"],
                   help="eager, one lever of config.yaml's `engine`, or all of them (default: each)")
    p.add_argument("--evaluation", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure evaluation throughput (default: yes)")
    p.add_argument("--repeats", type=POSITIVE, default=10, help="timed calls per measurement (median; after a warm-up)")
    p.add_argument("--out", help="also write the rows as JSON")
    p.add_argument("--profiles", help="folder for a profile of one iteration of each configuration")
    p.add_argument("--only", help=argparse.SUPPRESS)  # layout:method|evaluation:engine, measured in this process
    p.add_argument("--profile", help=argparse.SUPPRESS)  # its profile's file
    p.set_defaults(func=benchmark)

    p = subparsers.add_parser("launch", help="run a compute command as a (SLURM or local) submitit job")
    for f in fields(JobSpec):
        flag = "--" + f.name.replace("_", "-")
        if f.name in ("executor", "name"):
            p.add_argument(flag, required=True, choices=EXECUTORS if f.name == "executor" else None)
        else:
            kind = int if f.type in ("int", int) else str
            p.add_argument(flag, type=kind, default=f.default, help=f"(default {f.default})")
    p.add_argument("--logdir", required=True, help="folder of the job's ids and per-task logs")
    p.add_argument("--lost-after-s", type=float, default=120.0,
                   help="report a SLURM job failed once it has left the queue this long without a result "
                        "(clusters without accounting, where sacct cannot say)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS]: the sidcore command to run")
    p.set_defaults(func=launch)

    p = subparsers.add_parser("check-config", help="read config files or overlays strictly, evaluating nothing "
                              "(run it on an overlay before --configfile: Snakemake evaluates a YTE one)")
    p.add_argument("files", nargs="+", help="YAML files")
    p.set_defaults(func=check_config)
