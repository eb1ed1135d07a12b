"""The SiD / SiDA / SiD²A distillation loop (algorithm.md: alternating fake-score and generator updates).

One iteration: (1) fake-score ψ step on generator samples drawn without gradient (SiDA adds the
discriminator loss on real images); (2) generator θ step on the SiD loss (SiDA mixes in the
adversarial term once its third stage starts); (3) EMA of the generator. A run directory holds the
live state (``training-state.pt``, ``best-snapshot.pt``, ``progress.jsonl``, sample grids) and, once
the run is done, its declared outputs ``generator.pt`` (the best-FID G_ema) and ``log.jsonl``.
Restarting on the same directory resumes from the last training state.
"""
from __future__ import annotations

import copy
import json
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from sidcore import checkpoint
from sidcore.atomic import atomic_path
from sidcore.dataset import InfiniteSampler, read_image_zip
from sidcore.latent import load_vae
from sidcore.losses import SiDLoss
from sidcore.networks.edm2 import force_weight_normalization_
from sidcore.networks import build_network
from sidcore.sampling import image_grid, one_step, to_pixels
from sidcore.settings import generator_settings

EvaluateFn = Callable[[torch.nn.Module], dict]


def adam_eps(fp16: bool) -> float:
    return 1e-6 if fp16 else 1e-8


def ema_beta(cur_nimg: int, batch: int, halflife_kimg: float, rampup: float | None) -> float:
    """β = 0.5^(batch / h), h = min(half-life, rampup·images seen) (EDM's EMA with ramp-up)."""
    h = halflife_kimg * 1000
    if rampup is not None:
        h = min(h, cur_nimg * rampup)
    return 0.5 ** (batch / max(h, 1e-8))


@torch.no_grad()
def update_ema(ema: torch.nn.Module, net: torch.nn.Module, beta: float) -> None:
    """θ_ema ← β·θ_ema + (1 − β)·θ over parameters (buffers are constant in these networks)."""
    for p_ema, p in zip(ema.parameters(), net.parameters()):
        p_ema.copy_(p.detach().lerp(p_ema, beta))


def sanitize_grads(net: torch.nn.Module, clip: float | None) -> None:
    """NaN → 0, ±inf → ±1e5 in every gradient; optionally clip gradient values to ±clip."""
    for p in net.parameters():
        if p.grad is not None:
            torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
    if clip is not None:
        torch.nn.utils.clip_grad_value_(net.parameters(), clip)


def batch_arithmetic(batch: int, batch_gpu: int, world_size: int) -> tuple[int, int]:
    """(per-GPU images per iteration B_tot, accumulation rounds R) with the official consistency check."""
    if batch % world_size:
        raise ValueError(f"distill.batch={batch} is not divisible by the {world_size} GPUs")
    total = batch // world_size
    micro = min(batch_gpu, total)
    if total % micro:
        raise ValueError(f"distill.batch_gpu={batch_gpu} does not divide the per-GPU batch {total}")
    return total, total // micro


class Distiller:
    """Networks, optimisers, data stream and bookkeeping of one distillation run."""

    def __init__(self, settings: dict, teacher_path: str, data_path: str, outdir: str,
                 init_path: str | None = None, device: torch.device | None = None, vae_path: str | None = None) -> None:
        d = settings["distill"]
        if d["augment"] > 0:
            raise NotImplementedError(
                f"datasets.{settings['dataset']}.distill.augment={d['augment']}: EDM's augmentation pipeline "
                "is not available in sidcore yet; set it to 0 to run without augmentation")
        self.settings, self.d = settings, d
        self.outdir = Path(outdir)
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.rank, self.world_size = 0, 1
        torch.manual_seed(d["seed"] * self.world_size + self.rank)

        self.dataset = read_image_zip(data_path, use_labels=settings["label_dim"] > 0)
        self.check_dataset(settings)
        self.vae = load_vae(settings, vae_path, self.device)
        overrides = dict(dropout=d["dropout"], use_fp16=d["fp16"])
        teacher, network = checkpoint.load_network(teacher_path, **overrides)
        if d.get("return_logvar") and not network.get("logvar"):
            raise ValueError(f"datasets.{settings['dataset']}.distill.return_logvar: the teacher {teacher_path} "
                             "has no log-variance head")
        self.true_score = teacher.to(self.device).eval().requires_grad_(False)
        self.fake_score = copy.deepcopy(self.true_score)
        self.network = generator_settings(network)
        if init_path is not None:  # SiD²A: the generator starts from a distilled SiD generator
            self.G, _ = checkpoint.load_network(init_path, **overrides)
        else:  # G starts as the teacher (without the teacher-only log-variance head)
            self.G = build_network(**self.network)
            self.G.load_state_dict({k: v for k, v in teacher.state_dict().items() if k in self.G.state_dict()})
        self.G.to(self.device).eval().requires_grad_(False)
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        # EDM2's forced weight normalisation, once per optimiser step (SiDA may switch it off).
        self.force_normalization = network.get("arch") == "edm2" and (
            d.get("force_normalization", True) or not settings["adversarial"])

        eps = adam_eps(d["fp16"])
        self.opt_psi = torch.optim.Adam(self.fake_score.parameters(), lr=d["lr"], betas=(0.0, 0.999), eps=eps)
        self.opt_G = torch.optim.Adam(self.G.parameters(), lr=d["glr"], betas=(d["g_beta1"], 0.999), eps=eps)
        self.loss = SiDLoss(alpha=settings["alpha"], tmax=d["tmax"], P_mean=d["P_mean"], P_std=d["P_std"],
                            logvar=bool(d.get("return_logvar", False)))
        self.sampler = InfiniteSampler(len(self.dataset), seed=d["seed"], rank=self.rank,
                                       world_size=self.world_size)
        self.batch_total, self.rounds = batch_arithmetic(d["batch"], d["batch_gpu"], self.world_size)
        self.batch_gpu = self.batch_total // self.rounds
        self.shape = (settings["channels"], settings["resolution"], settings["resolution"])
        g = torch.Generator().manual_seed(d["seed"] + 7)  # fixed latents and labels of the sample grids
        self.grid_z = torch.randn([64, *self.shape], generator=g)
        self.grid_idx = torch.randint(len(self.dataset), (64,), generator=g)

        self.cur_nimg, self.cur_tick = 0, 0
        self.best_fid, self.best_kimg = float("inf"), None
        self.resume()

    def check_dataset(self, settings: dict) -> None:
        ds = self.dataset
        want = (settings["channels"], settings["resolution"], settings["label_dim"])
        if (ds.channels, ds.resolution, ds.label_dim) != want:
            raise ValueError(f"datasets.{settings['dataset']}: config says channels/resolution/label_dim = {want}, "
                             f"the data has {(ds.channels, ds.resolution, ds.label_dim)}")

    # ------------------------------------------------------------------------------------------
    def stage(self) -> int:
        """SiDA's three stages (1: ψ only, 2: + SiD generator, 3: + adversarial); SiD is always stage 2."""
        if not self.settings["adversarial"]:
            return 2
        g_start, gan_start = (k * 1000 for k in self.d["stage_kimg"])
        return 1 if self.cur_nimg <= g_start else 2 if self.cur_nimg <= gan_start else 3

    def draw(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One micro-batch: dataset indices' labels and real images, and latents z."""
        idx = self.sampler.next(self.batch_gpu)
        labels = self.dataset.one_hot(idx).to(self.device)
        z = torch.randn([self.batch_gpu, *self.shape], device=self.device)
        return labels, self.dataset.to_model(idx).to(self.device), z

    def fake_score_step(self) -> dict:
        d, B = self.d, self.batch_total
        self.fake_score.train().requires_grad_(True)
        if self.force_normalization:
            force_weight_normalization_(self.fake_score)
        stats = {}
        for _ in range(self.rounds):
            labels, x_real, z = self.draw()
            with torch.no_grad():
                x_g = one_step(self.G, z, labels, d["init_sigma"])
            if self.settings["adversarial"]:
                loss_psi, loss_D = self.loss.fake_score_discriminator(self.fake_score, x_g, x_real, labels)
                S_psi = loss_psi.sum() * (d["loss_scaling"] / B)
                S_D = loss_D.sum() * (d["loss_scaling_D"] / B)
                (S_psi + S_D).backward()
                stats = {"loss_fake_score": S_psi.item(), "loss_D": S_D.item()}
            else:
                S_psi = self.loss.fake_score(self.fake_score, x_g, labels).sum() * (d["loss_scaling"] / B)
                S_psi.backward()
                stats = {"loss_fake_score": S_psi.item()}
        self.fake_score.eval().requires_grad_(False)
        sanitize_grads(self.fake_score, d["clip_fake_grad"] if self.settings["adversarial"] else None)
        self.opt_psi.step()
        self.opt_psi.zero_grad(set_to_none=True)
        return stats

    def generator_step(self, stage: int) -> dict:
        d, B = self.d, self.batch_total
        chw = self.shape[0] * self.shape[1] * self.shape[2]
        self.G.train().requires_grad_(True)
        if self.force_normalization:
            force_weight_normalization_(self.G)
        stats = {}
        for _ in range(self.rounds):
            labels, _, z = self.draw()  # a fresh dataset draw, as the official loop
            x_g = one_step(self.G, z, labels, d["init_sigma"])
            loss_sid, loss_gan = self.loss.generator(self.true_score, self.fake_score, x_g, labels,
                                                     adversarial=stage == 3)
            S_sid = loss_sid.sum() * (d["loss_scaling_G"] / B)
            if loss_gan is None:
                S_sid.backward()
                stats = {"loss_G": S_sid.item()}
            else:
                S_gan = loss_gan.sum() * chw * (d["loss_scaling_G_gan"] / B)  # eq. (8): b added to every pixel
                (0.5 * S_sid + 0.5 * S_gan).backward()
                stats = {"loss_G": S_sid.item(), "loss_G_gan": S_gan.item()}
        self.G.eval().requires_grad_(False)
        sanitize_grads(self.G, None)
        self.opt_G.step()
        self.opt_G.zero_grad(set_to_none=True)
        return stats

    def update_ema(self) -> None:
        beta = ema_beta(self.cur_nimg, self.d["batch"], self.d["ema_halflife_kimg"], self.d["ema_rampup"])
        update_ema(self.G_ema, self.G, beta)

    # ------------------------------------------------------------------------------------------
    def run(self, evaluate: EvaluateFn, log: Callable[[str], None] = print) -> None:
        d = self.d
        total_nimg = int(d["duration_kimg"] * 1000)
        tick_start_nimg, tick_start_time = self.cur_nimg, time.time()
        start_nimg, start_time = self.cur_nimg, time.time()
        log(f"distilling {self.settings['dataset']} {self.settings['method']} alpha={self.settings['alpha']} "
            f"from {self.cur_nimg / 1000:.1f} to {total_nimg / 1000:.1f} kimg on {self.device} "
            f"(batch {d['batch']} = {self.world_size} GPU x {self.rounds} rounds x {self.batch_gpu})")
        while True:
            stage = self.stage()
            stats = self.fake_score_step()
            if stage >= 2:  # stage 1 keeps G frozen (the official computes, then discards, its update)
                stats.update(self.generator_step(stage))
            self.update_ema()
            self.cur_nimg += d["batch"]
            done = self.cur_nimg >= total_nimg
            if not done and self.cur_tick != 0 and self.cur_nimg < tick_start_nimg + d["tick_kimg"] * 1000:
                continue

            now = time.time()
            sec_per_kimg = (now - tick_start_time) / max((self.cur_nimg - tick_start_nimg) / 1000, 1e-8)
            rate = (now - start_time) / max((self.cur_nimg - start_nimg) / 1000, 1e-8)
            record = {"kimg": self.cur_nimg / 1000, "tick": self.cur_tick, "stage": stage,
                      "sec_per_kimg": sec_per_kimg, "eta_sec": rate * (total_nimg - self.cur_nimg) / 1000,
                      "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **stats}
            if done or self.cur_tick % d["snap_ticks"] == 0 or self.cur_tick in d["eval_early_ticks"]:
                record.update(self.evaluate(evaluate))
            self.append_log(record)
            log(format_record(record, self.best_fid))
            if done or (self.cur_tick != 0 and self.cur_tick % d["dump_ticks"] == 0):
                self.save_state()
            if done:
                break
            self.cur_tick += 1
            tick_start_nimg, tick_start_time = self.cur_nimg, time.time()
        self.finish()

    def evaluate(self, evaluate: EvaluateFn) -> dict:
        metrics = evaluate(self.G_ema)
        self.save_grid()
        fid = metrics["fid"]
        if fid < self.best_fid:
            self.best_fid, self.best_kimg = fid, self.cur_nimg / 1000
            snap = checkpoint.network_snapshot(self.G_ema, self.network, kimg=self.best_kimg, fid=fid,
                                               alpha=self.settings["alpha"], method=self.settings["method"])
            checkpoint.save_atomic(snap, self.outdir / "best-snapshot.pt")
        return metrics

    @torch.no_grad()
    def save_grid(self) -> None:
        labels = self.dataset.one_hot(self.grid_idx).to(self.device)
        x = one_step(self.G_ema, self.grid_z.to(self.device), labels, self.d["init_sigma"])
        grid = image_grid(to_pixels(x, self.vae), rows=8)
        img = Image.fromarray(grid[:, :, 0] if grid.shape[2] == 1 else grid)
        with atomic_path(self.outdir / f"fakes-{self.cur_nimg // 1000:06d}.png") as tmp:
            img.save(tmp)

    # ------------------------------------------------------------------------------------------
    def append_log(self, record: dict) -> None:
        with open(self.outdir / "progress.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def save_state(self) -> None:
        state = {
            "G": self.G.state_dict(), "G_ema": self.G_ema.state_dict(), "fake_score": self.fake_score.state_dict(),
            "opt_G": self.opt_G.state_dict(), "opt_psi": self.opt_psi.state_dict(),
            "cur_nimg": self.cur_nimg, "cur_tick": self.cur_tick, "best_fid": self.best_fid,
            "best_kimg": self.best_kimg, "sampler": self.sampler.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
            "settings_json": json.dumps(self.training_settings(), sort_keys=True),
        }
        checkpoint.save_atomic(state, self.outdir / "training-state.pt")

    def resume(self) -> None:
        path = self.outdir / "training-state.pt"
        if not path.exists():
            for stale in ("progress.jsonl", "best-snapshot.pt"):
                (self.outdir / stale).unlink(missing_ok=True)
            return
        state = checkpoint.load(path)
        saved, current = json.loads(state["settings_json"]), self.training_settings()
        if saved != current:
            changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
            raise ValueError(f"{path}: the run was started with different settings (changed: {changed}); "
                             "delete the run directory to start over")
        self.G.load_state_dict(state["G"])
        self.G_ema.load_state_dict(state["G_ema"])
        self.fake_score.load_state_dict(state["fake_score"])
        self.opt_G.load_state_dict(state["opt_G"])
        self.opt_psi.load_state_dict(state["opt_psi"])
        self.cur_nimg, self.cur_tick = state["cur_nimg"], state["cur_tick"] + 1
        self.best_fid, self.best_kimg = state["best_fid"], state["best_kimg"]
        self.sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["rng_cpu"])
        if state["rng_cuda"]:
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        self.truncate_log()
        print(f"resuming {self.outdir} at {self.cur_nimg / 1000:.1f} kimg (best FID {self.best_fid:.4g})",
              file=sys.stderr)

    def training_settings(self) -> dict:
        """The settings a resumed run must share with the run that wrote the state."""
        keys = ("dataset", "method", "alpha", "init", "network", "distill", "resolution", "channels", "label_dim")
        return {k: self.settings[k] for k in keys}

    def truncate_log(self) -> None:
        """Drop log lines written after the training state being resumed."""
        path = self.outdir / "progress.jsonl"
        if path.exists():
            lines = [ln for ln in path.read_text().splitlines() if json.loads(ln)["kimg"] * 1000 <= self.cur_nimg]
            path.write_text("".join(ln + "\n" for ln in lines))

    def finish(self) -> None:
        """Publish the declared outputs: the best-FID generator and the log."""
        best = self.outdir / "best-snapshot.pt"
        if not best.exists():
            raise RuntimeError(f"{self.outdir}: no evaluation produced a finite FID; no generator to publish")
        for src, dst in ((best, "generator.pt"), (self.outdir / "progress.jsonl", "log.jsonl")):
            with atomic_path(self.outdir / dst) as tmp:
                shutil.copyfile(src, tmp)


def format_record(r: dict, best_fid: float) -> str:
    parts = [f"tick {r['tick']:<4d}", f"kimg {r['kimg']:<8.1f}", f"stage {r['stage']}",
             f"sec/kimg {r['sec_per_kimg']:<7.2f}", f"eta {r['eta_sec'] / 60:6.1f} min",
             f"rss {r['maxrss_mb']:.0f} MB"]
    parts += [f"{k} {v:.4g}" for k, v in r.items() if k.startswith("loss")]
    if "fid" in r:
        parts.append(f"FID {r['fid']:.4g} (best {min(best_fid, r['fid']):.4g})")
    return "  ".join(parts)
