"""The papers' evaluation protocol: independent runs of N generated images each, mean ± std over runs.

Run r on rank k draws its latents and labels from the seed ``run_seed(base, r, k)``; seeds of
different runs and ranks never coincide. Labels follow the training set's label distribution.
Images are quantised to uint8 as the official metric code does before entering the detector.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from sidcore import checkpoint
from sidcore.dataset import ImageDataset, read_image_zip
from sidcore.download import sha256_file
from sidcore.metrics import FeatureAccumulator, create_detector, frechet_distance, load_reference
from sidcore.latent import StabilityVAE, load_vae
from sidcore.sampling import LabelSampler, heun, noise, one_step, to_pixels

RANK_STRIDE = 1 << 16  # ranks per run: seeds of run r occupy [base + r·2^16, base + (r+1)·2^16)

SampleFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (z, labels) -> images in [-1, 1]


def run_seed(base: int, run: int, rank: int = 0) -> int:
    """Seed of evaluation run ``run`` on ``rank``; run −1 is the in-training evaluation."""
    if not 0 <= rank < RANK_STRIDE:
        raise ValueError(f"rank {rank} out of range")
    return base + (run + 1) * RANK_STRIDE + rank


@dataclass
class Evaluator:
    """Detector, reference statistics and label distribution of one dataset."""

    detector: torch.nn.Module
    refs: dict
    labels: LabelSampler
    shape: tuple[int, int, int]
    metrics: list[str]
    device: torch.device
    vae: StabilityVAE | None = None  # decodes latent-space samples to pixels

    @classmethod
    def from_settings(cls, settings: dict, dataset: ImageDataset, refs: str, detector_weights: str,
                      device: torch.device, vae: StabilityVAE | None = None) -> "Evaluator":
        """``dataset`` supplies the label distribution."""
        shape = (settings["channels"], settings["resolution"], settings["resolution"])
        detector = create_detector(settings["detector"]["name"], detector_weights, device)
        return cls(detector, load_reference(refs), LabelSampler(dataset.labels, dataset.label_dim), shape,
                   list(settings["metrics"]), device, vae)

    @torch.no_grad()
    def __call__(self, sample: SampleFn, num_images: int, batch: int, seed: int) -> dict:
        """Generate ``num_images`` images with ``sample`` and return {metric: value}."""
        acc = FeatureAccumulator(self.detector)
        gen = torch.Generator().manual_seed(seed)
        done = 0
        while done < num_images:
            n = min(batch, num_images - done)
            labels = self.labels(n, gen, self.device)
            z = noise(n, self.shape, gen, self.device)
            acc.add(to_pixels(sample(z, labels), self.vae))
            done += n
        out = {}
        if "fid" in self.metrics:
            out["fid"] = frechet_distance(acc.fid_statistics(), self.refs["fid"])
        if "is" in self.metrics:
            out["is"] = acc.inception_score()
        unknown = set(self.metrics) - {"fid", "is"}
        if unknown:
            raise NotImplementedError(f"metrics {sorted(unknown)} are not computed by sidcore yet")
        return out


def generator_sampler(G: torch.nn.Module, init_sigma: float) -> SampleFn:
    return lambda z, labels: one_step(G, z, labels, init_sigma)


def teacher_sampler(net: torch.nn.Module, num_steps: int) -> SampleFn:
    return lambda z, labels: heun(net, z, labels, num_steps=num_steps)


def evaluate_runs(settings: dict, model: str, kind: str, data: str, refs: str, detector_weights: str,
                  runs: int, vae: str | None = None) -> Iterator[dict]:
    """Evaluation runs 0 … runs−1 of a distilled generator (``kind='generator'``) or a teacher (``'teacher'``).

    ``vae`` is the VAE directory of a latent-space dataset.
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ev = settings["evaluation"]
    dataset = read_image_zip(data, use_labels=settings["label_dim"] > 0)
    evaluator = Evaluator.from_settings(settings, dataset, refs, detector_weights, device,
                                        load_vae(settings, vae, device))
    snap = checkpoint.load_snapshot(model)
    net, _ = checkpoint.load_network(model, snap)
    net.to(device).eval().requires_grad_(False)
    if kind == "generator":
        sample, nfe = generator_sampler(net, settings["distill"]["init_sigma"]), 1
    else:
        num_steps = settings["teacher_eval"]["num_steps"]
        sample, nfe = teacher_sampler(net, num_steps), 2 * num_steps - 1
    common = {"dataset": settings["dataset"], "size": settings.get("size"),
              "method": settings.get("method", "teacher"), "alpha": settings.get("alpha"),
              "num_images": ev["num_images"], "nfe": nfe, "kimg": snap["meta"].get("kimg"),
              "detector": settings["detector"]["name"], "model_sha256": sha256_file(model),
              "refs_sha256": sha256_file(refs)}
    for run in range(runs):
        seed = run_seed(ev["seed"], run)
        values = evaluator(sample, ev["num_images"], ev["batch"], seed)
        yield {**common, "run": run, "seed": seed, "rank_seeds": [seed], "metrics": values}
