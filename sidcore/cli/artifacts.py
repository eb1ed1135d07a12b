"""Commands that make the pipeline's inputs: download, convert-network, train-detector, ref-stats."""
from __future__ import annotations

import argparse
from pathlib import Path

from sidcore.cli.checks import NON_NEGATIVE, POSITIVE, SEED, output, positive_number
from sidcore.cli.console import say

DEFAULT_LOCK = Path("resources/artifacts.lock.json")


def download(args: argparse.Namespace) -> int:
    from sidcore.download import fetch
    fetch(args.source, args.out, args.lock, retries=args.retries, timeout=args.timeout, kind=args.kind)
    return 0


def convert_network(args: argparse.Namespace) -> int:
    from sidcore.persistence import convert_to_snapshot
    from sidcore.settings import loads
    network = loads(args.network, "--network") if args.network is not None else None
    sampling = loads(args.sampling, "--sampling") if args.sampling is not None else None
    convert_to_snapshot(args.src, args.out, args.key, network, sampling, log=say)
    return 0


def train_detector(args: argparse.Namespace) -> int:
    from sidcore.detectors.digits import train_detector as train
    train(args.data, args.out, seed=args.seed, epochs=args.epochs, log=say)
    return 0


def ref_stats(args: argparse.Namespace) -> int:
    from sidcore.metrics import write_reference
    write_reference(args.data, args.detector, args.detector_weights, args.out, args.batch, log=say)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("download", help="download an artifact resumably and verify its sha256")
    p.add_argument("source", help="registry key (e.g. teacher/edm-cifar10-32x32-uncond-vp) or http(s):// / file:// URL")
    p.add_argument("--out", type=Path, required=True, metavar="PATH", help="destination file")
    p.add_argument("--lock", type=Path, default=DEFAULT_LOCK, metavar="PATH",
                   help="lock file pinning sha256 digests (default: %(default)s)")
    p.add_argument("--retries", type=NON_NEGATIVE, default=5,
                   help="retries of a failed attempt that made no progress (default: %(default)s)")
    p.add_argument("--timeout", type=positive_number, default=60.0,
                   help="socket time-out in seconds (default: %(default)s)")
    p.add_argument("--kind", help="content kind of a plain URL (sidcore/content.py KINDS; default: by its extension)")
    p.set_defaults(func=download)

    p = subparsers.add_parser("convert-network", help="NVIDIA persistence pickle -> sidcore network snapshot")
    p.add_argument("--src", required=True, help="the downloaded .pkl")
    p.add_argument("--out", required=True, type=output("checkpoint"), help="the snapshot .pt to write")
    p.add_argument("--key", default="ema", help="top-level entry holding the network (default: ema)")
    p.add_argument("--network", help="constructor settings (JSON) of the network to build, as config.yaml "
                                     "describes it (default: the settings the file records)")
    p.add_argument("--sampling", help="a one-step generator's sampling (JSON: init_sigma, and vae where latent), "
                                      "recorded in the snapshot so that it says how to sample it")
    p.set_defaults(func=convert_network)

    p = subparsers.add_parser("train-detector",
                              help="train the digit classifier used as FID/IS detector (tiny experiment)")
    p.add_argument("--data", required=True, help="labelled EDM-layout zip of 8x8 grayscale digits")
    p.add_argument("--out", required=True, type=output("checkpoint"), help="checkpoint path to write")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--epochs", type=POSITIVE, default=20)
    p.set_defaults(func=train_detector)

    p = subparsers.add_parser("ref-stats", help="FID reference statistics (EDM npz layout) of a dataset zip")
    p.add_argument("--data", required=True, help="EDM-layout image zip")
    p.add_argument("--detector", required=True, help="detector name (sidcore.metrics.DETECTORS)")
    p.add_argument("--detector-weights", required=True, help="local weights file of the detector")
    p.add_argument("--out", required=True, type=output("NPZ"), help="output .npz path")
    p.add_argument("--batch", type=POSITIVE, default=256)
    p.set_defaults(func=ref_stats)
