"""The bill of a table before it runs (``sidcore plan``): for every long job not yet done (``sidcore.plan``), its
GPUs, device, estimated hours and GPU-hours, and three totals: the GPU-hours, the hours if the jobs ran one after
another, and the hours if the cluster runs them as the DAG allows (its longest chain of jobs waiting for jobs).

Model. Work is counted in FLOPs of the configured networks (``torch.utils.flop_counter`` on the meta device: no
weights, no arithmetic) and divided by a throughput in FLOP/s per GPU, the best one known for the job:
1. ``own log``: a distillation under way runs at the median s/kimg of its own progress log, and its in-training
   evaluations take the seconds they took so far;
2. ``<dataset> logs``: the throughput the dataset's other runs reached in their progress logs (on their device);
3. ``Table 8``: the throughput of the job's column of the SiDA paper's Table 8 (its table and method);
4. ``Table 8 H100, scaled``: the median throughput of Table 8's H100 columns (datasets it does not cover: EDM2).
A job that runs on CPU cores (the teacher training; the GPU stages of ``launcher: local`` on a machine without
a GPU) costs the throughput ``timed here``: its network's forward and backward passes timed on this machine's
CPU with the plan job's threads, the fastest of a few (too large a network to time here: unknown).
A distillation image costs ``ITERATION_PASSES`` forward passes of the network (SiD; SiDA and SiD²A that many
times Table 8's median SiDA / SiD time ratio), plus the in-training evaluations its schedule has left
(``eval_images`` each). An evaluation image costs NFE forward passes plus the detectors' and the VAE decoder's
passes (``sidcore/data/flops.yaml``); an encoding image, the VAE encoder's; a teacher training image, a forward
and a backward pass (3 forward passes). Time scales as 1 / GPUs (or processes) and does not depend on the batch
per GPU or the accumulation rounds.
"""
from __future__ import annotations

import functools
import json
import math
import statistics
import time
from pathlib import Path

import pandas as pd
import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

from sidcore import progress_log
from sidcore.errors import UserError
from sidcore.evaluate import TRAINING_METRICS
from sidcore.methods import ADVERSARIAL, METHOD_NAMES, alpha_text
from sidcore.model_selection import evaluation_due
from sidcore.networks import build_network
from sidcore.plan import CPU_STAGES
from sidcore.prepare import list_images
from sidcore.report import markdown
from sidcore.report.cost import paper_costs, speed
from sidcore.sampling import heun_nfe

# Forward passes of the network per image of a SiD iteration: the ψ step runs G (1) and f_ψ with its backward
# (3); the θ step runs G with its backward (3), and the teacher and f_ψ with a backward to their input (2 + 2).
ITERATION_PASSES = 11
TRAINING_PASSES = 3  # forward passes per image of a training step: the forward and its backward
REFERENCE_GPU = "H100"  # Table 8's GPU for the datasets it does not cover
CPU_PROBE_BATCH = 32  # images per timed pass on the CPU for a job without a batch (evaluation, encoding)
CPU_PASSES, CPU_TIMING_S = 10, 2.0  # timed passes at most, and seconds after which 3 passes are enough
CPU_TIMING_LIMIT = 2e10  # FLOPs of the largest timed pass (a larger network is not timed on this CPU)
FLOPS_FILE = Path(__file__).resolve().parents[1] / "data" / "flops.yaml"


@functools.cache
def _forward_flops(network: str) -> float:
    n = json.loads(network)
    with torch.device("meta"):
        net = build_network(**n)
        with FlopCounterMode(display=False) as counter:
            net(*_batch(n, 1))
    return float(counter.get_total_flops())


def _batch(n: dict, size: int) -> tuple:
    """A network's arguments for ``size`` images (x, σ, one-hot labels or None), on the current device."""
    x = torch.zeros(size, n["img_channels"], n["img_resolution"], n["img_resolution"])
    return x, torch.ones(size), torch.zeros(size, n["label_dim"]) if n["label_dim"] else None


def forward_flops(network: dict) -> float:
    """FLOPs of one forward pass of the network with constructor settings ``network``, per image."""
    return _forward_flops(json.dumps(network, sort_keys=True))


@functools.cache
def _cpu_rate(network: str, batch: int) -> float:
    n = json.loads(network)
    flops = TRAINING_PASSES * _forward_flops(network) * batch
    if flops > CPU_TIMING_LIMIT:
        return math.nan
    net, args = build_network(**n).train(), _batch(n, batch)
    fastest, start = math.inf, time.perf_counter()
    for passes in range(CPU_PASSES + 1):  # the first warms up
        begin = time.perf_counter()
        net(*args).square().mean().backward()
        fastest = min(fastest, time.perf_counter() - begin) if passes else fastest
        if passes >= 3 and time.perf_counter() - start > CPU_TIMING_S:
            break
    return flops / fastest


def cpu_rate(network: dict, batch: int) -> float:
    """FLOP/s of this machine's CPU on the network with constructor settings ``network``: a training pass of
    ``batch`` images, the fastest of a few (a busy machine slows some; NaN: a network too large to time here)."""
    return _cpu_rate(json.dumps(network, sort_keys=True), batch)


def on_cpu(job: dict) -> bool:
    """Whether ``job`` runs on CPU cores: a CPU stage, or a GPU stage run here (``launcher: local``) without a GPU."""
    return job["stage"] in CPU_STAGES or (job["local"] and not torch.cuda.is_available())


@functools.cache
def reference_flops() -> dict:
    with open(FLOPS_FILE) as f:
        return yaml.safe_load(f)


def evaluation_flops(job: dict, metrics: list[str]) -> float:
    """FLOPs per evaluated image besides the generating network, for ``metrics``: the detector, DINOv2 (FD_DINOv2)
    and the VAE decoder of a latent dataset."""
    ref = reference_flops()
    if job["detector"] not in ref["detectors"]:
        raise UserError(f"datasets.{job['dataset']}.detector.name: {job['detector']!r} has no cost in {FLOPS_FILE}")
    dinov2 = "fd_dinov2" in metrics
    return (ref["detectors"][job["detector"]] + dinov2 * ref["dinov2"] + job["latent"] * ref["vae_decoder"]) * 1e9


class Throughputs:
    """FLOP/s per GPU: Table 8's columns (their networks given by ``networks``: table → network settings) and the
    datasets' own progress logs."""

    def __init__(self, networks: dict[str, dict], logs: dict[str, list[tuple[str, list[dict]]]]) -> None:
        self.paper = paper_costs()
        sid = {t: c for (t, m), c in self.paper.items() if m == "sid"}
        ratios = [self.paper[(t, "sida")]["sec_per_kimg"] / c["sec_per_kimg"] for t, c in sid.items()
                  if (t, "sida") in self.paper]
        self.adversarial_factor = statistics.median(ratios)  # Table 8: SiDA's time per image over SiD's
        self.columns = {(t, m): (self.per_gpu(networks[t], m, c["sec_per_kimg"], c["gpus"]), gpu_type(c["hardware"]))
                        for (t, m), c in self.paper.items() if t in networks}
        reference = [rate for (t, m), (rate, gpu) in self.columns.items() if gpu == REFERENCE_GPU and m == "sid"]
        if not reference:
            raise UserError(f"no Table 8 {REFERENCE_GPU} column has a network in config.yaml (datasets of tables "
                             f"{sorted({t for t, _ in self.paper})})")
        self.reference = statistics.median(reference)
        self.logs = logs  # dataset → [(method, tick records)]

    def passes(self, method: str) -> float:
        """Forward passes per image of a distillation iteration."""
        return ITERATION_PASSES * (self.adversarial_factor if ADVERSARIAL[method] else 1.0)

    def per_gpu(self, network: dict, method: str, sec_per_kimg: float, gpus: int) -> float:
        """FLOP/s per GPU of a distillation of ``network`` by ``method`` at ``sec_per_kimg`` on ``gpus`` GPUs."""
        return self.passes(method) * forward_flops(network) * 1e3 / (sec_per_kimg * gpus)

    def measured(self, network: dict, method: str, records: list[dict]) -> float:
        """FLOP/s per GPU a run reached (its median s/kimg over the ticks after the first)."""
        return self.per_gpu(network, method, speed(records), records[-1]["processes"])

    def best(self, job: dict, method: str) -> tuple[float, str, str]:
        """(FLOP/s per GPU, device, basis) for ``job`` run as ``method`` (see the module's docstring)."""
        logs = self.logs.get(job["dataset"], [])  # runs with ticks past the first
        if logs and job["stage"] not in CPU_STAGES:
            rates = [self.measured(job["network"], m, r) for m, r in logs]
            return statistics.median(rates), logs[0][1][-1]["device"], f"{job['dataset']} logs"
        if on_cpu(job):  # a process's batch: a training job's own, else the probe's
            batch = job.get("batch", CPU_PROBE_BATCH) // max(job["gpus"], 1)
            return cpu_rate(job["network"], batch), "cpu", "timed here"
        column = self.columns.get((job["table"], "sida" if ADVERSARIAL.get(method) else "sid"))
        if column:
            return column[0], column[1], "Table 8"
        return self.reference, REFERENCE_GPU, f"Table 8 {REFERENCE_GPU}, scaled"


def gpu_type(hardware: str) -> str:
    """``8×H100`` → ``H100``."""
    return hardware.split("×")[-1]


def evaluations_left(job: dict, next_tick: int) -> int:
    """In-training evaluations of ticks ``next_tick`` … the last (tick 0 ends after one iteration, the others
    every ``tick_kimg``; the last at ``duration_kimg``)."""
    last = max(math.ceil((job["duration_kimg"] * 1000 - job["batch"]) / (job["tick_kimg"] * 1000)), 0)
    return sum(evaluation_due(t, t == last, job["snap_ticks"], job["eval_early_ticks"], job["eval_first_tick"])
               for t in range(next_tick, last + 1))


def job_name(job: dict) -> str:
    """A job's name in the bill."""
    d = job["dataset"]
    if job["stage"] == "distill":
        return f"distill {d} {METHOD_NAMES[job['method']]} α={alpha_text(job['alpha'])}"
    if job["stage"] == "evaluate":
        return f"evaluate {d} {job['model']}"
    return f"train teacher {d}" if job["stage"] == "train_teacher" else f"encode {d} (SD VAE)"


def distill_row(job: dict, rates: Throughputs, records: list[dict]) -> dict:
    F = forward_flops(job["network"])
    in_training = [m for m in job["metrics"] if m in TRAINING_METRICS]
    per_eval = job["eval_images"] * (F + evaluation_flops(job, in_training))
    kimg_left = max(job["duration_kimg"] - (records[-1]["kimg"] if records else 0.0), 0.0)  # the last batch may overrun
    evals = evaluations_left(job, records[-1]["tick"] + 1 if records else 0)
    if len(records) > 1:
        rate, device, basis = rates.measured(job["network"], job["method"], records), records[-1]["device"], "own log"
    else:
        rate, device, basis = rates.best(job, job["method"])
    flops = kimg_left * 1e3 * rates.passes(job["method"]) * F
    seconds = flops / (rate * job["gpus"])
    timed = [r["eval_sec"] * r["processes"] / job["gpus"] for r in records if "eval_sec" in r]
    seconds += evals * (statistics.mean(timed) if timed else per_eval / (rate * job["gpus"]))
    left = f"{kimg_left:,.0f} of {job['duration_kimg']:,.0f} kimg, {evals} in-training FIDs"
    return _row(job_name(job), job["gpus"], device, basis, left, seconds)


def teacher_training_row(job: dict, rates: Throughputs) -> dict:
    rate, device, basis = rates.best(job, "sid")
    flops = job["kimg"] * 1e3 * TRAINING_PASSES * forward_flops(job["network"])
    return _row(job_name(job), job["gpus"], device, basis, f"{job['kimg']:,.0f} kimg", flops / rate)


def evaluate_row(job: dict, rates: Throughputs) -> dict:
    runs = sum(not Path(p).exists() for p in job["outputs"])
    images = runs * job["num_images"]
    nfe = heun_nfe(job["teacher_steps"]) if job["teacher_steps"] else 1
    flops = images * (nfe * forward_flops(job["network"]) + evaluation_flops(job, job["metrics"]))
    rate, device, basis = rates.best(job, "sid")
    left = f"{runs} runs × {job['num_images']:,} images, {nfe} NFE"
    return _row(job_name(job), job["gpus"], device, basis, left,
                flops / (rate * job["gpus"]))


def encode_row(job: dict, rates: Throughputs) -> dict:
    name = job_name(job)
    try:
        images = len(list_images(job["source"], labels=False)[0])
    except (FileNotFoundError, ValueError) as e:
        return _row(name, job["gpus"], "", "", f"unknown: {e}", math.nan)
    rate, device, basis = rates.best(job, "sid")
    flops = images * reference_flops()["vae_encoder"] * 1e9
    return _row(name, job["gpus"], device, basis, f"{images:,} images", flops / (rate * job["gpus"]))


def _row(job: str, gpus: int, device: str, basis: str, left: str, seconds: float) -> dict:
    """A job's row; on CPU cores its processes are not GPUs (0 GPUs, 0 GPU-hours)."""
    hours, gpus = seconds / 3600, 0 if device == "cpu" else gpus
    if device == "cpu" and math.isnan(seconds):
        left += "; unknown: too large a network to time on this CPU"
    return {"job": job, "GPUs": gpus, "device": device, "rate from": basis, "work left": left, "hours": hours,
            "GPU-hours": hours * gpus}


def longest_chain(jobs: list[dict], hours: list[float]) -> tuple[float, list[int]]:
    """The hours of the longest chain of jobs each waiting for the one before (a job's ``after`` names outputs of
    the jobs it waits for), and the indices of that chain; ``hours`` are the jobs' own (0 for a job done)."""
    made_by = {out: i for i, job in enumerate(jobs) for out in job["outputs"]}
    ends: dict[int, tuple[float, list[int]]] = {}

    def end(i: int) -> tuple[float, list[int]]:  # the jobs before i are built first (sid before sid2a)
        if i not in ends:
            before = [end(made_by[f]) for f in jobs[i]["after"] if f in made_by]
            start, chain = max(before, key=lambda e: e[0], default=(0.0, []))
            ends[i] = (start + hours[i], chain + [i])
        return ends[i]

    return max((end(i) for i in range(len(jobs))), key=lambda e: e[0], default=(0.0, []))


def bill(jobs: list[dict], networks: dict[str, dict]) -> pd.DataFrame:
    """One row per job not yet done, then the totals: GPU-hours and hours one after another, hours as the DAG
    allows."""
    records = {job["run_dir"]: progress_log.read(job["run_dir"]) for job in jobs if job["stage"] == "distill"}
    logs: dict[str, list] = {}
    for job in jobs:
        if job["stage"] == "distill" and len(records[job["run_dir"]]) > 1:
            logs.setdefault(job["dataset"], []).append((job["method"], records[job["run_dir"]]))
    rates = Throughputs(networks, logs)
    rows, hours, done = [], [], [all(Path(p).exists() for p in job["outputs"]) for job in jobs]
    for job, finished in zip(jobs, done):
        if finished:
            hours.append(0.0)
            continue
        if job["stage"] == "distill":
            rows.append(distill_row(job, rates, records[job["run_dir"]]))
        elif job["stage"] == "evaluate":
            rows.append(evaluate_row(job, rates))
        elif job["stage"] == "train_teacher":
            rows.append(teacher_training_row(job, rates))
        else:
            rows.append(encode_row(job, rates))
        hours.append(0.0 if math.isnan(rows[-1]["hours"]) else rows[-1]["hours"])
    frame = pd.DataFrame(rows, columns=list(_row("", 0, "", "", "", 0.0)))
    unknown = int(frame["hours"].isna().sum())
    left = f"{len(rows)} jobs" + (f", {unknown} of unknown size not counted" if unknown else "")
    dag_hours, chain = longest_chain(jobs, hours)
    steps = [job_name(jobs[i]) for i in chain if not done[i]]
    totals = [{"job": "total, one job after another", "work left": left, "hours": sum(hours),
               "GPU-hours": frame["GPU-hours"].sum()},
              {"job": "total, as the DAG allows", "work left": "longest chain: " + (" → ".join(steps) or "none"),
               "hours": dag_hours}]
    frame = pd.concat([frame, pd.DataFrame(totals)], ignore_index=True).round({"hours": 2, "GPU-hours": 1})
    frame["GPUs"] = frame["GPUs"].astype("Int64")  # whole GPUs, blank on the totals
    return frame.astype(object).where(frame.notna(), "")  # a job of unknown size: blank hours


NOTES = [
    "Estimated before the jobs run (sidcore/report/bill.py): FLOPs of the configured networks (flop counter, meta "
    "device) over a throughput in FLOP/s per GPU: a run's own progress log once it has one, else the "
    "dataset's other runs' logs, else the job's column of the SiDA paper's Table 8, else the median of "
    "Table 8's H100 columns; a job on CPU cores (the teacher training, or a GPU stage run here without a GPU), "
    "the network's training passes timed on this machine's CPU (the fastest of a few). A distillation image is "
    "11 forward passes (SiD; SiDA and SiD²A × Table 8's SiDA / SiD ratio), plus the in-training FIDs left; an "
    "evaluation image NFE passes plus the detectors and, for latents, the VAE decoder; a teacher training image "
    "3. Time scales as 1 / GPUs (or processes), independently of the batch per GPU.",
    "Totals: GPU-hours (CPU jobs use none); hours if the jobs ran one after another; hours if the cluster runs "
    "them as the DAG allows, each job as soon as the jobs it waits for are done (the longest chain, named).",
    "Uncertainty: predicting each of Table 8's H100 columns from another by FLOPs is off by 7–11 %; datasets "
    "Table 8 does not cover (EDM2) add the difference between architectures (expect ±30 %). Evaluations are "
    "costed at the distillations' FLOP rate (on the tiny CPU runs that overestimates them 2–3×: a large "
    "inference batch runs more efficiently than a training step). Not counted: queueing, start-up and "
    "compilation, checkpoints, requeues after preemption, the short CPU jobs (data preparation, detector "
    "training, reference statistics, tables and plots).",
]


def write(table: str, jobs: list[dict], networks: dict[str, dict], csv: Path, md: Path, log=print) -> None:
    frame = bill(jobs, networks)
    markdown.save(frame, csv, md, f"Bill of {table}: the jobs not yet done", NOTES)
    one_by_one, dag = frame.iloc[-2], frame.iloc[-1]
    log(f"{table}: {one_by_one['work left']} left, {one_by_one['GPU-hours']:,.1f} GPU-hours; "
        f"{one_by_one['hours']:,.2f} hours one job after another, {dag['hours']:,.2f} hours as the DAG allows")
