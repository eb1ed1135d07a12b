"""Commands that report: summarize, tabulate, plot, dynamics, ablation, cost, plan, figure, claims. Every output is a
flag."""
from __future__ import annotations

import argparse
from pathlib import Path

from sidcore.cli.checks import GRID_MAX, SEED, integer, output
from sidcore.cli.console import say
from sidcore.methods import METHODS


def summarize(args: argparse.Namespace) -> int:
    from sidcore.summary import read_run, write_json
    from sidcore.summary import summarize as mean_std
    runs = [read_run(p) for p in args.runs]
    summary = mean_std(runs, args.table, args.std_ddof)
    write_json(summary, args.out)
    say(", ".join(f"{k} {v['mean']:.4f} ± {v['std']:.4f}" for k, v in summary["metrics"].items())
        + f" over {summary['runs']} runs")
    return 0


def tabulate(args: argparse.Namespace) -> int:
    from sidcore.report.tabulate import write
    write(args.table, args.summaries, args.out, args.markdown)
    return 0


def plot(args: argparse.Namespace) -> int:
    from sidcore.report.plot import parse_run, write
    write([parse_run(*values) for values in args.run], args.teacher_summary, args.table, args.size, args.title,
          args.out, args.pdf)
    return 0


def dynamics(args: argparse.Namespace) -> int:
    from sidcore.report.dynamics import write
    from sidcore.report.plot import parse_run
    write([parse_run(*values) for values in args.run], args.title, args.out, args.pdf)
    return 0


def ablation(args: argparse.Namespace) -> int:
    from sidcore.report.ablation import write
    write(args.run, args.title, args.out, args.markdown, args.plot, args.pdf, log=say)
    return 0


def cost(args: argparse.Namespace) -> int:
    from sidcore.report.cost import write
    write(args.run, args.out, args.markdown, log=say)
    return 0


def plan(args: argparse.Namespace) -> int:
    from sidcore.plan import loads_jobs
    from sidcore.report.bill import write
    from sidcore.settings import loads
    jobs, networks = loads_jobs(args.jobs, "--jobs"), loads(args.networks, "--networks")
    write(args.table, jobs, networks, args.csv, args.markdown, log=say)
    return 0


def figure(args: argparse.Namespace) -> int:
    from sidcore.report.figure import write
    from sidcore.settings import from_json
    write(from_json(args.settings, "figure"), args.generator, args.teacher, args.data, args.vae, args.seed, args.rows,
          args.cols, args.out, log=say)
    return 0


def claims(args: argparse.Namespace) -> int:
    from sidcore.report.claims import write
    write(args.teacher_summary, args.run, args.sid2a_init_alpha, args.ablation, args.title, args.out, args.markdown,
          args.plot, log=say)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("summarize", help="mean ± std over evaluation runs")
    p.add_argument("--table", required=True, help="the report table the summary belongs to")
    p.add_argument("--std-ddof", type=int, required=True, choices=(0, 1),
                   help="degrees of freedom of the std (1: sample standard deviation)")
    p.add_argument("--runs", nargs="+", required=True)
    p.add_argument("--out", required=True, type=output("JSON"))
    p.set_defaults(func=summarize)

    p = subparsers.add_parser("tabulate", help="compare evaluation summaries with the paper's numbers",
                              description="Put evaluation summaries next to the paper's numbers (CSV, Markdown).")
    p.add_argument("--table", required=True, help="table name, e.g. cifar10-uncond or tiny")
    p.add_argument("--summaries", nargs="*", type=Path, default=[], metavar="FILE",
                   help="eval/summary.json files (may be none)")
    _outputs(p, "--out", "CSV", "--markdown", "Markdown")
    p.set_defaults(func=tabulate)

    p = subparsers.add_parser(
        "plot", help="plot in-training FID against images seen",
        description="Plot in-training FID against images seen (log-log), one curve per run, with the teacher "
                    "and the paper's final FIDs as horizontal lines (PNG, PDF).")
    _runs(p, f"a distillation run: method ({', '.join(METHODS)}), α and its log.jsonl (repeatable)")
    p.add_argument("--table", required=True,
                   help="the dataset's table (config.yaml `table`): where the paper's lines come from")
    p.add_argument("--size", default="", help="EDM2 model size (xs ... xxl), for the EDM2 table")
    p.add_argument("--teacher-summary", type=Path, metavar="PATH",
                   help="our teacher's eval/summary.json; without it the paper's teacher FID is drawn")
    p.add_argument("--title", default="")
    _outputs(p, "--out", "PNG", "--pdf", "PDF")
    p.set_defaults(func=plot)

    p = subparsers.add_parser(
        "dynamics", help="plot the training dynamics: discriminator, generator gradients, FID of G_ema and raw G",
        description="Plot what the distillation's instruments logged against images seen (sidcore.instruments): "
                    "the discriminator's accuracy and λ-free cross-entropy on real and fake images, the generator's "
                    "adversarial-to-SiD gradient ratio and cosine, and the in-training FID of G_ema and of the raw G "
                    "(PNG, PDF).")
    _runs(p, f"a distillation run: method ({', '.join(METHODS)}), α and its log.jsonl (repeatable)")
    p.add_argument("--title", default="")
    _outputs(p, "--out", "PNG", "--pdf", "PDF")
    p.set_defaults(func=dynamics)

    p = subparsers.add_parser(
        "ablation", help="the α ablation: curves and table",
        description="Plot FID (and IS) against images seen, one curve per α and one row of panels per method, "
                    "and tabulate each run at the end of its budget (CSV, Markdown, PNG, PDF).")
    _runs(p, "an ablation run: method, α and its log.jsonl (repeatable)")
    p.add_argument("--title", default="")
    _outputs(p, "--out", "CSV", "--markdown", "Markdown", "--plot", "PNG", "--pdf", "PDF")
    p.set_defaults(func=ablation)

    p = subparsers.add_parser(
        "cost", help="the training cost of each run beside the paper's Table 8",
        description="Tabulate each distillation's GPUs, batch per GPU, peak memory, s/kimg and hours per 10M "
                    "images from its log and benchmark file, beside Table 8 of the SiDA paper (CSV, Markdown).")
    p.add_argument("--run", action="append", nargs=6, required=True,
                   metavar=("DATASET", "TABLE", "METHOD", "ALPHA", "LOG", "BENCHMARK"),
                   help="a distillation: dataset, its table, method, α, log.jsonl and benchmark file")
    _outputs(p, "--out", "CSV", "--markdown", "Markdown")
    p.set_defaults(func=cost)

    p = subparsers.add_parser(
        "plan", help="the bill of a table before it runs: hours and GPU-hours of each job not yet done",
        description="Estimate, for every long job of a table (GPU stages, teacher training) whose outputs are "
                    "missing, its device, hours and GPU-hours (sidcore/report/bill.py: network FLOPs over a "
                    "throughput from the job's own progress log, the dataset's logs, Table 8 of the SiDA paper, or "
                    "timed on this CPU for a job on CPU cores), and the totals: GPU-hours, hours one job after "
                    "another, hours as the DAG allows (CSV, Markdown).")
    p.add_argument("--table", required=True, help="the table the jobs belong to")
    p.add_argument("--jobs", required=True, help='JSON object {"jobs": [...]} (built by the workflow)')
    p.add_argument("--networks", required=True, help="JSON object: each table's network settings")
    _outputs(p, "--csv", "CSV", "--markdown", "Markdown")
    p.set_defaults(func=plan)

    p = subparsers.add_parser(
        "figure", help="sample grid of a generator (and its teacher)",
        description="Draw a grid of one-step samples of a distilled generator with fixed seeds and, with "
                    "--teacher, the teacher's samples from the same latents and labels (PNG).")
    p.add_argument("--settings", required=True, help="the run's resolved settings (JSON)")
    p.add_argument("--generator", required=True, help="generator.pt of the run")
    p.add_argument("--teacher", help="the teacher's .pt (needs teacher_eval in the settings)")
    p.add_argument("--data", required=True, help="the dataset's zip (its label distribution)")
    p.add_argument("--vae", help="VAE directory (latent-space datasets)")
    p.add_argument("--seed", type=SEED, required=True)
    p.add_argument("--rows", type=integer(1, GRID_MAX), required=True)
    p.add_argument("--cols", type=integer(1, GRID_MAX), required=True)
    _outputs(p, "--out", "PNG")
    p.set_defaults(func=figure)

    p = subparsers.add_parser(
        "claims", help="test the papers' claims on one experiment",
        description="Test claims (a)-(e) of the SiD / SiDA papers on one experiment's runs against criteria "
                    "fixed in advance (see sidcore.report.claims): CSV, Markdown and PNG.")
    p.add_argument("--teacher-summary", required=True, type=Path, help="the teacher's eval/summary.json")
    p.add_argument("--run", action="append", nargs=4, required=True, metavar=("METHOD", "ALPHA", "LOG", "SUMMARY"),
                   help="a run's log.jsonl and eval/summary.json")
    p.add_argument("--sid2a-init-alpha", required=True, type=float, help="α of the SiD run SiD²A starts from")
    p.add_argument("--ablation", action="append", nargs=2, default=[], metavar=("ALPHA", "LOG"),
                   help="a SiDA run of the α ablation (repeatable)")
    p.add_argument("--title", default="")
    _outputs(p, "--out", "CSV", "--markdown", "Markdown", "--plot", "PNG")
    p.set_defaults(func=claims)


def _runs(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--run", action="append", nargs=3, required=True, metavar=("METHOD", "ALPHA", "LOG"), help=help)


def _outputs(p: argparse.ArgumentParser, *flags_and_formats: str) -> None:
    """Required output paths: pairs of flag and file format."""
    for flag, kind in zip(flags_and_formats[::2], flags_and_formats[1::2]):
        p.add_argument(flag, required=True, type=output(kind), help=f"{kind} to write")
