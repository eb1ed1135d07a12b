"""Model selection during distillation, as the official loops: G_ema evaluated at scheduled ticks, its snapshots
(``snapshot-<images seen>.pt`` of the last evaluations, ``best-snapshot.pt``), sample grids
(``fakes-<kimg>.png``, also in TensorBoard where configured), and the run's declared outputs: ``generator.pt``
(the best-FID G_ema) and ``log.jsonl``.
"""
from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sidcore import checkpoint, progress_log, run_record
from sidcore.atomic import atomic_path
from sidcore.distributed import Context, broadcast
from sidcore.latent import StabilityVAE
from sidcore.sampling import image_grid, one_step, to_pixels
from sidcore.settings import sampling
from sidcore.tensorboard import Board

EvaluateFn = Callable[[torch.nn.Module], dict]  # G_ema -> {"fid": …, …} on rank 0


def evaluation_due(tick: int, done: bool, snap_ticks: int, early_ticks: list[int], first_tick: int) -> bool:
    """Whether tick ``tick`` evaluates G_ema: at ``early_ticks`` and every ``snap_ticks`` ticks, none before
    ``first_tick`` (EDM2: 20), and always at the end (``done``)."""
    return done or ((tick % snap_ticks == 0 or tick in early_ticks) and tick >= first_tick)


class ModelSelection:
    """The best FID so far and the G_ema files of a run directory (written by rank 0)."""

    def __init__(self, settings: dict, network: dict, outdir: Path, ctx: Context, grid_z: torch.Tensor,
                 grid_labels: torch.Tensor, vae: StabilityVAE | None, start_kimg: float = 0.0) -> None:
        self.settings, self.d, self.network = settings, settings["distill"], network
        self.start_kimg = start_kimg  # recorded in the snapshots: the images seen before this run
        self.outdir, self.ctx = outdir, ctx
        self.grid_z, self.grid_labels, self.vae = grid_z, grid_labels, vae
        self.best_fid, self.best_kimg = float("inf"), None

    def due(self, tick: int, done: bool) -> bool:
        d = self.d
        return evaluation_due(tick, done, d.snap_ticks, d.eval_early_ticks, d.eval_first_tick)

    def evaluate(self, G_ema: torch.nn.Module, nimg: int, evaluate: EvaluateFn, board: Board | None = None) -> dict:
        """Metrics of G_ema at ``nimg`` images seen (every rank generates, rank 0 computes and shares them);
        its snapshot and sample grid (also on ``board``)."""
        metrics = broadcast(self.ctx, evaluate(G_ema))
        fid, kimg = metrics["fid"], nimg / 1000
        if fid < self.best_fid:
            self.best_fid, self.best_kimg = fid, kimg
        if self.ctx.is_main:
            grid = self.save_grid(G_ema, nimg)
            if board is not None:
                board.grid(grid, nimg)
            start = {"start_kimg": self.start_kimg} if self.start_kimg else {}
            snap = checkpoint.network_snapshot(G_ema, self.network, kimg=kimg, fid=fid, alpha=self.settings["alpha"],
                                               method=self.settings["method"], **start, **sampling(self.settings))
            checkpoint.save_atomic(snap, self.outdir / f"snapshot-{nimg:012d}.pt")
            if self.best_kimg == kimg:
                checkpoint.save_atomic(snap, self.outdir / "best-snapshot.pt")
            for old in sorted(self.outdir.glob("snapshot-*.pt"))[:-self.d.keep_snapshots]:
                old.unlink()
        return metrics

    @torch.no_grad()
    def save_grid(self, G_ema: torch.nn.Module, nimg: int) -> np.ndarray:
        """``fakes-<kimg>.png``: G_ema's samples of the fixed latents and labels, 8 × 8; returns the grid (HWC)."""
        device = self.ctx.device
        x = one_step(G_ema, self.grid_z.to(device), self.grid_labels.to(device), self.d.init_sigma)
        grid = image_grid(to_pixels(x, self.vae), rows=8)
        img = Image.fromarray(grid[:, :, 0] if grid.shape[2] == 1 else grid)
        with atomic_path(self.outdir / f"fakes-{nimg // 1000:06d}.png") as tmp:
            img.save(tmp)
        return grid

    def publish(self) -> None:
        """The declared outputs: the best-FID generator and the log."""
        best = self.outdir / "best-snapshot.pt"
        if not best.exists():
            raise RuntimeError(f"{self.outdir}: no evaluation produced a finite FID; no generator to publish")
        for src, dst in ((best, run_record.GENERATOR_FILE), (self.outdir / progress_log.FILE, "log.jsonl")):
            with atomic_path(self.outdir / dst) as tmp:
                shutil.copyfile(src, tmp)
