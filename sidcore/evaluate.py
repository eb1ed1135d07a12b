"""The papers' evaluation protocol: independent runs of N generated images each, mean ± std over runs.

A run generates its images in blocks of ``evaluation.batch``; block b of run r draws its labels and latents
from a generator seeded with ``run_seed(base, r, b)``, and the job's processes take the blocks in turn
(rank k: blocks k, k + W, …). Seeds of different runs and blocks never coincide, a rank never shares a
seed with another, and a run's images do not depend on how many processes generate them. Labels follow
the training set's label distribution; images are quantised to uint8 as the official metric code does
before they reach a detector. Features are gathered on rank 0 in block order, which computes the metrics:

* ``fid``, ``is``: the Inception detector against the reference statistics' ``fid`` entry;
* ``precision``, ``recall``: the same features against those of a reference batch of real images
  (k = 3 nearest neighbours; ImageNet 64 uses OpenAI's VIRTUAL batch, as the SiD paper);
* ``fd_dinov2``: DINOv2 ViT-L/14 features against the reference statistics' ``fd_dinov2`` entry (EDM2).
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sidcore import checkpoint, engine, metrics, stopping
from sidcore.dataset import ImageDataset, read_image_zip
from sidcore.distributed import Context, any_rank, gather_to_main, single_process
from sidcore.download import sha256_file
from sidcore.errors import UserError
from sidcore.latent import StabilityVAE, load_vae
from sidcore.progress import Progress
from sidcore.sampling import LabelSampler, heun, heun_nfe, noise, one_step, to_pixels
from sidcore.settings import BLOCK_STRIDE, num_blocks

INCEPTION_METRICS = ("fid", "is", "precision", "recall")
TRAINING_METRICS = ("fid", "is")  # computed during distillation (model selection), as the official loops
DINOV2_DETECTOR = "dinov2-vit-l-14-edm2"
KNOWN_METRICS = (*INCEPTION_METRICS, "fd_dinov2")

SampleFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (z, labels) -> images in [-1, 1]


class Stopped(Exception):
    """A stop signal (time limit, preemption) interrupted the evaluation; finished runs are kept."""


def run_seed(base: int, run: int, block: int = 0) -> int:
    """Seed of block ``block`` of evaluation run ``run``; run −1 is the in-training evaluation."""
    if not 0 <= block < BLOCK_STRIDE:
        raise ValueError(f"block {block} out of range [0, {BLOCK_STRIDE}): raise evaluation.batch")
    if run < -1:
        raise ValueError(f"run {run} < -1")
    return base + (run + 1) * BLOCK_STRIDE + block


def rank_seeds(base: int, run: int, num_images: int, batch: int, world_size: int) -> dict[int, list[int]]:
    """The seeds each rank draws from in run ``run`` (as the per-run record lists them)."""
    blocks = num_blocks(num_images, batch)
    return {rank: [run_seed(base, run, b) for b in range(rank, blocks, world_size)] for rank in range(world_size)}


@dataclass
class Evaluator:
    """Detectors, reference statistics and label distribution of one dataset; every rank holds one."""

    detectors: dict[str, torch.nn.Module]  # "inception" (fid, is, precision, recall), "dinov2" (fd_dinov2)
    refs: dict[str, metrics.Stats]
    labels: LabelSampler
    shape: tuple[int, int, int]
    metrics: list[str]
    device: torch.device
    seed: int
    vae: StabilityVAE | None = None  # decodes latent-space samples to pixels
    pr_images: torch.Tensor | None = None  # the precision/recall reference batch (uint8 NCHW)
    ctx: Context = field(default_factory=single_process)
    log: Callable[[str], None] = print
    stoppable: bool = False  # a stop signal ends the run early (raises Stopped); in training the loop stops instead
    _pr_features: torch.Tensor | None = None

    @classmethod
    def from_settings(cls, settings: dict, dataset: ImageDataset, refs: str, detector_weights: str,
                      device: torch.device, vae: StabilityVAE | None = None, *, dinov2_weights: str | None = None,
                      pr_reference: str | None = None, metric_names: list[str] | None = None,
                      ctx: Context | None = None, log: Callable[[str], None] = print) -> Evaluator:
        """``dataset`` supplies the label distribution; ``metric_names`` defaults to the dataset's metrics."""
        names = list(settings["metrics"] if metric_names is None else metric_names)
        key = f"datasets.{settings['dataset']}.metrics"
        unknown = sorted(set(names) - set(KNOWN_METRICS))
        if unknown:
            raise UserError(f"{key}: unknown metrics {unknown} (known: {', '.join(KNOWN_METRICS)})")
        if {"precision", "recall"} & set(names) and pr_reference is None:
            raise UserError(f"{key}: precision/recall need a reference batch (pr_reference)")
        if "fd_dinov2" in names and dinov2_weights is None:
            raise UserError(f"{key}: fd_dinov2 needs the DINOv2 weights (evaluation.fd_dinov2_detector)")
        shape = (settings["channels"], settings["resolution"], settings["resolution"])
        detectors = {}
        if set(INCEPTION_METRICS) & set(names):
            detectors["inception"] = metrics.create_detector(settings["detector"]["name"], detector_weights, device)
        if "fd_dinov2" in names:
            detectors["dinov2"] = metrics.create_detector(DINOV2_DETECTOR, dinov2_weights, device)
        references = metrics.load_reference(refs)
        for name, entry in (("fid", "fid"), ("fd_dinov2", "fd_dinov2")):
            if name in names and entry not in references:
                raise UserError(f"{refs}: no {entry!r} statistics, needed for metric {name}")
        ctx = ctx or single_process()
        pr_images = metrics.load_pr_reference(pr_reference) if pr_reference and ctx.is_main else None
        return cls(detectors, references, LabelSampler(dataset.labels, dataset.label_dim), shape, names, device,
                   settings["evaluation"].seed, vae, pr_images, ctx, log)

    @torch.no_grad()
    def features(self, sample: SampleFn, num_images: int, batch: int, run: int) -> dict[str, dict] | None:
        """Generate run ``run``'s images on every rank; rank 0 gets each detector's outputs in block order."""
        ctx, blocks = self.ctx, num_blocks(num_images, batch)
        mine: dict[int, dict] = {}
        progress = Progress(num_images, "kimg", scale=1000, every=60.0)
        for step in range(math.ceil(blocks / ctx.world_size)):  # the same number of steps on every rank
            signum = stopping.requested(ctx) if self.stoppable else None
            if signum is not None:
                raise Stopped(f"{signum.name} during evaluation run {run}")
            block = step * ctx.world_size + ctx.rank
            if block < blocks:
                n = min(batch, num_images - block * batch)
                gen = torch.Generator().manual_seed(run_seed(self.seed, run, block))
                labels = self.labels(n, gen, self.device)
                images = to_pixels(sample(noise(n, self.shape, gen, self.device), labels), self.vae)
                mine[block] = {name: metrics.extract(det, images) for name, det in self.detectors.items()}
            if progress.advance(min((step + 1) * ctx.world_size * batch, num_images)) and ctx.is_main \
                    and not progress.finished:
                self.log(f"run {run}: {progress.line(rate='seconds_per_unit')}")
        parts = gather_to_main(ctx, mine)
        if parts is None:
            return None
        ordered = [part[b] for b in range(blocks) for part in parts if b in part]
        return {name: {key: torch.cat([o[name][key] for o in ordered]) for key in ordered[0][name]}
                for name in self.detectors}

    def metric_values(self, outputs: dict[str, dict]) -> dict[str, float]:
        """The configured metrics from the detectors' outputs of one run (rank 0)."""
        out = {}
        if "fid" in self.metrics:
            out["fid"] = metrics.frechet_distance(metrics.fid_statistics(outputs["inception"]["fid"]), self.refs["fid"])
        if "is" in self.metrics:
            out["is"] = metrics.inception_score(outputs["inception"]["is"])
        if {"precision", "recall"} & set(self.metrics):
            if self._pr_features is None:
                batches = self.pr_images.split(256)
                self._pr_features = torch.cat([metrics.extract(self.detectors["inception"], b.to(self.device))["fid"]
                                               for b in batches])
            p, r = metrics.precision_recall(outputs["inception"]["fid"], self._pr_features)
            out.update({k: v for k, v in (("precision", p), ("recall", r)) if k in self.metrics})
        if "fd_dinov2" in self.metrics:
            stats = metrics.fid_statistics(outputs["dinov2"]["fid"])
            out["fd_dinov2"] = metrics.frechet_distance(stats, self.refs["fd_dinov2"])
        return out

    def __call__(self, sample: SampleFn, num_images: int, batch: int, run: int) -> dict[str, float] | None:
        """Generate run ``run`` and return {metric: value} on rank 0 (None on the other ranks)."""
        outputs = self.features(sample, num_images, batch, run)
        return None if outputs is None else self.metric_values(outputs)


def generator_sampler(G: torch.nn.Module, init_sigma: float) -> SampleFn:
    return lambda z, labels: one_step(G, z, labels, init_sigma)


def teacher_sampler(net: torch.nn.Module, num_steps: int) -> SampleFn:
    return lambda z, labels: heun(net, z, labels, num_steps=num_steps)


def _finished(path: Path, expected: dict) -> bool:
    """Whether ``path`` holds the result of this very run (kept from before a requeue)."""
    if not path.is_file():
        return False
    try:
        record = json.loads(path.read_text())
    except ValueError:
        return False
    return all(record.get(k) == v for k, v in expected.items())


def evaluate_runs(settings: dict, model: str, kind: str, data: str, refs: str, detector_weights: str, runs: int,
                  outdir: str | Path, *, vae: str | None = None, dinov2_weights: str | None = None,
                  pr_reference: str | None = None, released: str | None = None, ctx: Context | None = None,
                  log: Callable[[str], None] = print) -> Iterator[dict]:
    """Evaluation runs 0 … runs−1 of a distilled generator (``kind='generator'``) or a teacher (``'teacher'``).

    Yields each run's record on rank 0 (nothing on the others). Runs whose record already sits in ``outdir``
    (kept from before a requeue) are not repeated. ``released`` names the registry key of a released generator.
    """
    ctx = ctx or single_process()
    ev = settings["evaluation"]
    dataset = read_image_zip(data, use_labels=settings["label_dim"] > 0)
    evaluator = Evaluator.from_settings(settings, dataset, refs, detector_weights, ctx.device,
                                        load_vae(settings, vae, ctx.device), dinov2_weights=dinov2_weights,
                                        pr_reference=pr_reference, ctx=ctx, log=log)
    evaluator.stoppable = True
    snap = checkpoint.load_snapshot(model)
    net, _ = checkpoint.load_network(model, snap)
    engine.prepare(net.to(ctx.device).eval().requires_grad_(False), ev.engine)
    if kind == "generator":
        sample, nfe = generator_sampler(net, checkpoint.init_sigma(snap, model)), 1
    else:
        num_steps = settings["teacher_eval"]["num_steps"]
        sample, nfe = teacher_sampler(net, num_steps), heun_nfe(num_steps)
    detectors = {name: detector.get_name() for name, detector in evaluator.detectors.items()}
    common = {"dataset": settings["dataset"], "size": settings["size"],
              "method": "teacher" if kind == "teacher" else settings["method"],
              "alpha": None if kind == "teacher" else settings["alpha"],
              "source": "ours" if released is None else "released", "released_key": released,
              "num_images": ev.num_images, "batch": ev.batch, "nfe": nfe, "kimg": snap["meta"].get("kimg"),
              "start_kimg": snap["meta"].get("start_kimg"),
              "detector": settings["detector"]["name"], "detectors": detectors, "model_sha256": sha256_file(model),
              "refs_sha256": sha256_file(refs), "world_size": ctx.world_size}
    if pr_reference is not None:
        common["pr_reference_sha256"] = sha256_file(pr_reference)
    for run in range(runs):
        seeds = rank_seeds(ev.seed, run, ev.num_images, ev.batch, ctx.world_size)
        record = {**common, "run": run, "seed_base": ev.seed, "seeds": sorted(s for v in seeds.values() for s in v),
                  "rank_seeds": {str(rank): v for rank, v in seeds.items()}, "metric_names": sorted(evaluator.metrics)}
        path = Path(outdir) / f"run{run}.json"
        same = {k: record[k] for k in ("model_sha256", "refs_sha256", "num_images", "seeds", "metric_names")}
        if any_rank(ctx, ctx.is_main and _finished(path, same)):
            if ctx.is_main:
                log(f"run {run}: kept from before the requeue ({path})")
            continue
        values = evaluator(sample, ev.num_images, ev.batch, run)
        if ctx.is_main:
            yield {**record, "metrics": values}
