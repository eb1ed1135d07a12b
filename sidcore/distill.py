"""The SiD / SiDA / SiD²A distillation loop (algorithm.md: alternating fake-score and generator updates).

One iteration: (1) fake-score ψ step on generator samples drawn without gradient (SiDA adds the
discriminator loss on real images); (2) generator θ step on the SiD loss (SiDA mixes in the
adversarial term once its third stage starts); (3) EMA of the generator. Each step accumulates R
micro-batches per process; with several processes DDP averages the gradients, synchronising only on the
last micro-batch. Losses are sums over pixels divided by the per-process batch, as the official code.

A run directory holds the live state (``training-state.pt``, ``snapshot-<images seen>.pt`` and
``best-snapshot.pt`` G_ema snapshots, ``progress.jsonl``, sample grids) and, once the run is done, its
declared outputs ``generator.pt`` (the best-FID G_ema) and ``log.jsonl``. Restarting on the same
directory resumes from the last training state, bit-identically (see ``sidcore.randomness``). SIGUSR2 or
SIGTERM makes the loop finish its iteration, save the state and exit with ``REQUEUE_EXIT``.
"""
from __future__ import annotations

import contextlib
import copy
import json
import random
import resource
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.nn.parallel import DistributedDataParallel

from sidcore import checkpoint, stopping
from sidcore.atomic import atomic_path
from sidcore.augment import AugmentPipe
from sidcore.dataset import ShuffledOrder, read_image_zip
from sidcore.distributed import Context, any_rank, barrier, broadcast, gather, to_device
from sidcore.latent import load_vae
from sidcore.losses import SiDLoss
from sidcore.networks import build_network
from sidcore.networks.edm2 import force_weight_normalization_
from sidcore.randomness import SampleNoise, micro_batch_positions
from sidcore.sampling import image_grid, one_step, to_pixels
from sidcore.preflight import check_data_shape, check_distill
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
    torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1 - beta)


def device_name(device: torch.device) -> str:
    """What runs the distillation: the GPU's model, or ``cpu``."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA max allocated on a GPU, else the resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rng_state(device: torch.device) -> dict:
    """This process's random states (python, numpy, torch CPU and CUDA) as tensors and plain values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
            "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state: dict, device: torch.device) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def sanitize_grads(net: torch.nn.Module, clip: float | None) -> None:
    """NaN → 0, ±inf → ±1e5 in every gradient; optionally clip gradient values to ±clip."""
    for p in net.parameters():
        if p.grad is not None:
            torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
    if clip is not None:
        torch.nn.utils.clip_grad_value_(net.parameters(), clip)


class Distiller:
    """Networks, optimisers, data stream and bookkeeping of one distillation run (one process of it)."""

    def __init__(self, settings: dict, teacher_path: str, data_path: str, outdir: str,
                 init_path: str | None = None, ctx: Context | None = None, vae_path: str | None = None) -> None:
        d = settings["distill"]
        self.settings, self.d = settings, d
        self.outdir = Path(outdir)
        self.ctx = ctx or Context(0, 1, 0, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        self.batch_total, self.rounds = check_distill(settings, self.ctx.world_size)
        self.device = self.ctx.device
        torch.manual_seed(d["seed"] * self.ctx.world_size + self.ctx.rank)  # dropout masks, per rank

        self.dataset = read_image_zip(data_path, use_labels=settings["label_dim"] > 0)
        check_data_shape(settings, self.dataset)
        self.order = ShuffledOrder(len(self.dataset), d["seed"])
        self.vae = load_vae(settings, vae_path, self.device)
        overrides = dict(dropout=d["dropout"], use_fp16=d["fp16"])
        teacher, network = checkpoint.load_network(teacher_path, **overrides)
        logvar = bool(d.get("return_logvar", False))
        if logvar and not network.get("logvar"):
            raise ValueError(f"datasets.{settings['dataset']}.distill.return_logvar: the teacher {teacher_path} "
                             "has no log-variance head")
        self.network = generator_settings(network)
        self.true_score = teacher.to(self.device).eval().requires_grad_(False)
        # The fake score starts as the teacher; it keeps the log-variance head only if the losses use it.
        self.fake_score = self.copy_weights(teacher, network if logvar else self.network)
        if init_path is not None:  # SiD²A: the generator starts from a distilled SiD generator
            self.G, _ = checkpoint.load_network(init_path, **overrides)
            self.G.to(self.device)
        else:
            self.G = self.copy_weights(teacher, self.network)
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        half = torch.bfloat16 if d.get("bf16") else torch.float16
        for net in (self.true_score, self.fake_score, self.G, self.G_ema):
            net.half_dtype = half
        # EDM2's forced weight normalisation, once per optimiser step (SiDA may switch it off).
        self.force_normalization = network.get("arch") == "edm2" and (
            d.get("force_normalization", True) or not settings["adversarial"])
        self.fake_score_ddp, self.G_ddp = self.parallel(self.fake_score), self.parallel(self.G)

        eps = adam_eps(d["fp16"])
        self.opt_psi = torch.optim.Adam(self.fake_score.parameters(), lr=d["lr"], betas=(0.0, 0.999), eps=eps)
        self.opt_G = torch.optim.Adam(self.G.parameters(), lr=d["glr"], betas=(d["g_beta1"], 0.999), eps=eps)
        self.loss = SiDLoss(alpha=settings["alpha"], tmax=d["tmax"], P_mean=d["P_mean"], P_std=d["P_std"],
                            logvar=logvar, augment=AugmentPipe(d["augment"]) if d["augment"] > 0 else None)
        self.batch_gpu = self.batch_total // self.rounds
        self.shape = (settings["channels"], settings["resolution"], settings["resolution"])
        g = torch.Generator().manual_seed(d["seed"] + 7)  # fixed latents and labels of the sample grids
        self.grid_z = torch.randn([64, *self.shape], generator=g)
        self.grid_idx = torch.randint(len(self.dataset), (64,), generator=g)

        self.cur_nimg, self.cur_tick = 0, 0
        self.best_fid, self.best_kimg = float("inf"), None
        self.stop_signal: tuple[int, int] | None = None  # (signal, images seen when it arrived)
        self.resume()

    def copy_weights(self, source: torch.nn.Module, network: dict) -> torch.nn.Module:
        """A new network with settings ``network`` holding ``source``'s weights (every key of the new one)."""
        net = build_network(**network)
        keys = set(net.state_dict())
        net.load_state_dict({k: v for k, v in source.state_dict().items() if k in keys})
        return net.to(self.device).eval().requires_grad_(False)

    def parallel(self, net: torch.nn.Module) -> torch.nn.Module:
        """``net`` wrapped for gradient averaging across processes (itself on one process)."""
        if self.ctx.world_size == 1:
            return net
        net.requires_grad_(True)
        wrapped = DistributedDataParallel(net, device_ids=[self.device] if self.device.type == "cuda" else None,
                                          broadcast_buffers=False)
        net.requires_grad_(False)
        return wrapped

    # ------------------------------------------------------------------------------------------
    def stage(self) -> int:
        """SiDA's three stages (1: ψ only, 2: + SiD generator, 3: + adversarial); SiD is always stage 2."""
        if not self.settings["adversarial"]:
            return 2
        g_start, gan_start = (k * 1000 for k in self.d["stage_kimg"])
        return 1 if self.cur_nimg <= g_start else 2 if self.cur_nimg <= gan_start else 3

    def draw(self, phase: int, round_: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, SampleNoise]:
        """One micro-batch of phase 0 (fake score) or 1 (generator): labels, real inputs, latents z and
        the noise of the losses, all determined by the samples' global positions."""
        ctx, d = self.ctx, self.d
        positions = micro_batch_positions(self.cur_nimg // d["batch"], phase, d["batch"], self.batch_gpu,
                                          self.rounds, ctx.rank, ctx.world_size, round_)
        noise = SampleNoise(d["seed"], positions, self.device)
        idx = self.order(positions)
        labels = to_device(self.dataset.one_hot(idx), self.device)
        x_real = None
        if phase == 0 and self.settings["adversarial"]:  # only SiDA's discriminator sees real data
            # a latent's posterior draw comes from the sample's own stream, made on the host
            x_real = to_device(self.dataset.to_model(idx, SampleNoise(d["seed"], positions)), self.device)
        return labels, x_real, noise.randn("z", self.shape), noise

    def accumulate(self, ddp: torch.nn.Module, round_: int):
        """Gradient synchronisation only on the last micro-batch of a step."""
        if self.ctx.world_size == 1 or round_ == self.rounds - 1:
            return contextlib.nullcontext()
        return ddp.no_sync()

    def fake_score_step(self, stats: dict) -> None:
        d, B = self.d, self.batch_total
        self.fake_score.train().requires_grad_(True)
        if self.force_normalization:
            force_weight_normalization_(self.fake_score)
        for r in range(self.rounds):
            labels, x_real, z, noise = self.draw(0, r)
            with torch.no_grad():
                x_g = one_step(self.G, z, labels, d["init_sigma"])
            with self.accumulate(self.fake_score_ddp, r):
                if self.settings["adversarial"]:
                    loss_psi, loss_D, keep = self.loss.fake_score_discriminator(self.fake_score_ddp, x_g, x_real,
                                                                                labels, noise)
                    S_psi = loss_psi.sum() * (d["loss_scaling"] / B)
                    S_D = loss_D.sum() * (d["loss_scaling_D"] / B)
                    (S_psi + S_D).backward()
                    add(stats, loss_D=S_D)
                else:
                    loss_psi, keep = self.loss.fake_score(self.fake_score_ddp, x_g, labels, noise)
                    S_psi = loss_psi.sum() * (d["loss_scaling"] / B)
                    S_psi.backward()
            add(stats, loss_fake_score=S_psi, skipped=(~keep).sum())
        self.fake_score.eval().requires_grad_(False)
        sanitize_grads(self.fake_score, d["clip_fake_grad"] if self.settings["adversarial"] else None)
        self.opt_psi.step()
        self.opt_psi.zero_grad(set_to_none=True)

    def generator_step(self, stage: int, stats: dict) -> None:
        d, B = self.d, self.batch_total
        chw = self.shape[0] * self.shape[1] * self.shape[2]
        self.G.train().requires_grad_(True)
        if self.force_normalization:
            force_weight_normalization_(self.G)
        for r in range(self.rounds):
            labels, _, z, noise = self.draw(1, r)  # a fresh dataset draw, as the official loop
            with self.accumulate(self.G_ddp, r):
                x_g = one_step(self.G_ddp, z, labels, d["init_sigma"])
                loss_sid, loss_gan, keep = self.loss.generator(self.true_score, self.fake_score, x_g, labels, noise,
                                                               adversarial=stage == 3)
                S_sid = loss_sid.sum() * (d["loss_scaling_G"] / B)
                if loss_gan is None:
                    S_sid.backward()
                else:
                    S_gan = loss_gan.sum() * chw * (d["loss_scaling_G_gan"] / B)  # eq. (8): b on every pixel
                    (0.5 * S_sid + 0.5 * S_gan).backward()
                    add(stats, loss_G_gan=S_gan)
            add(stats, loss_G=S_sid, skipped=(~keep).sum())
        self.G.eval().requires_grad_(False)
        sanitize_grads(self.G, None)
        self.opt_G.step()
        self.opt_G.zero_grad(set_to_none=True)

    def update_ema(self) -> None:
        beta = ema_beta(self.cur_nimg, self.d["batch"], self.d["ema_halflife_kimg"], self.d["ema_rampup"])
        update_ema(self.G_ema, self.G, beta)

    def iteration(self, stats: dict) -> int:
        """One SiD / SiDA iteration; returns its stage."""
        stage = self.stage()
        self.fake_score_step(stats)
        if stage >= 2:  # stage 1 keeps G frozen (the official computes, then discards, its update)
            self.generator_step(stage, stats)
        self.update_ema()
        self.cur_nimg += self.d["batch"]
        return stage

    # ------------------------------------------------------------------------------------------
    def run(self, evaluate: EvaluateFn, log: Callable[[str], None] = print) -> bool:
        """Distil until ``duration_kimg``; returns False if a stop signal ended the run early (state saved)."""
        d, ctx = self.d, self.ctx
        total_nimg = int(d["duration_kimg"] * 1000)
        tick_start_nimg, tick_start_time = self.cur_nimg, time.time()
        start_nimg, start_time = self.cur_nimg, time.time()
        say = log if ctx.is_main else (lambda message: None)
        say(f"distilling {self.settings['dataset']} {self.settings['method']} alpha={self.settings['alpha']} "
            f"from {self.cur_nimg / 1000:.1f} to {total_nimg / 1000:.1f} kimg on {self.device} "
            f"(batch {d['batch']} = {ctx.world_size} processes x {self.rounds} rounds x {self.batch_gpu})")
        stats: dict = {}
        iterations = 0
        with stop_signals(self):
            while True:
                if self.cur_nimg < total_nimg:
                    stage = self.iteration(stats)
                    iterations += 1
                else:  # stopped after its last iteration: only the last tick's evaluation and publishing are left
                    stage = self.stage()
                done = self.cur_nimg >= total_nimg
                if any_rank(ctx, self.stop_signal is not None):
                    self.save_state()
                    signum, at_nimg = self.stop_signal or (None, self.cur_nimg)
                    name = signal.Signals(signum).name if signum else "a stop signal on another rank"
                    say(f"{name} received at {at_nimg / 1000:.3f} kimg: state saved at {self.cur_nimg / 1000:.3f} kimg;"
                        " exiting for requeue")
                    return False
                if not done and self.cur_tick != 0 and self.cur_nimg < tick_start_nimg + d["tick_kimg"] * 1000:
                    continue

                now = time.time()
                sec_per_kimg = (now - tick_start_time) / max((self.cur_nimg - tick_start_nimg) / 1000, 1e-8)
                rate = (now - start_time) / max((self.cur_nimg - start_nimg) / 1000, 1e-8)
                record = {"kimg": self.cur_nimg / 1000, "tick": self.cur_tick, "stage": stage,
                          "sec_per_kimg": sec_per_kimg, "eta_sec": rate * (total_nimg - self.cur_nimg) / 1000,
                          "peak_mem_mb": peak_memory_mb(self.device), "device": device_name(self.device),
                          "processes": ctx.world_size, "batch_gpu": self.batch_gpu, **summarize(stats, iterations)}
                stats, iterations = {}, 0
                if self.evaluation_due(done):
                    record.update(self.evaluate(evaluate))
                if ctx.is_main:
                    self.append_log(record)
                say(format_record(record, self.best_fid))
                if done or (self.cur_tick != 0 and self.cur_tick % d["dump_ticks"] == 0):
                    self.save_state()
                if done:
                    break
                self.cur_tick += 1
                tick_start_nimg, tick_start_time = self.cur_nimg, time.time()
        if ctx.is_main:
            self.finish()
        barrier(ctx)
        return True

    def evaluation_due(self, done: bool) -> bool:
        """In-training evaluation as the official loops: at the ticks of ``eval_early_ticks`` and every
        ``snap_ticks`` ticks, none before ``eval_first_tick`` (EDM2: 20), and always at the end."""
        d, tick = self.d, self.cur_tick
        scheduled = tick % d["snap_ticks"] == 0 or tick in d["eval_early_ticks"]
        return done or (scheduled and tick >= d["eval_first_tick"])

    def evaluate(self, evaluate: EvaluateFn) -> dict:
        """In-training metrics of G_ema (every rank generates, rank 0 computes and shares them), snapshots and grid."""
        metrics = broadcast(self.ctx, evaluate(self.G_ema))
        fid = metrics["fid"]
        kimg = self.cur_nimg / 1000
        if fid < self.best_fid:
            self.best_fid, self.best_kimg = fid, kimg
        if self.ctx.is_main:
            self.save_grid()
            snap = checkpoint.network_snapshot(self.G_ema, self.network, kimg=kimg, fid=fid,
                                               alpha=self.settings["alpha"], method=self.settings["method"])
            checkpoint.save_atomic(snap, self.outdir / f"snapshot-{self.cur_nimg:012d}.pt")
            if self.best_kimg == kimg:
                checkpoint.save_atomic(snap, self.outdir / "best-snapshot.pt")
            for old in sorted(self.outdir.glob("snapshot-*.pt"))[:-self.d["keep_snapshots"]]:
                old.unlink()
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
        """Everything needed to continue exactly: networks, optimisers, progress, every rank's random state."""
        rng = gather(self.ctx, rng_state(self.device))
        if self.ctx.is_main:
            state = {
                "G": self.G.state_dict(), "G_ema": self.G_ema.state_dict(),
                "fake_score": self.fake_score.state_dict(),
                "opt_G": self.opt_G.state_dict(), "opt_psi": self.opt_psi.state_dict(),
                "cur_nimg": self.cur_nimg, "cur_tick": self.cur_tick, "stage": self.stage(),
                "best_fid": self.best_fid, "best_kimg": self.best_kimg, "rng": rng,
                "settings_json": json.dumps(self.training_settings(), sort_keys=True),
            }
            checkpoint.save_atomic(state, self.outdir / "training-state.pt")
        barrier(self.ctx)

    def resume(self) -> None:
        path = self.outdir / "training-state.pt"
        if self.ctx.is_main:
            for stale in self.outdir.glob(".*.tmp*"):  # temporary files of writes a crash interrupted
                stale.unlink()
        if not path.exists():
            if self.ctx.is_main:
                for stale in ("progress.jsonl", "best-snapshot.pt", *self.outdir.glob("snapshot-*.pt")):
                    (self.outdir / stale).unlink(missing_ok=True)
            barrier(self.ctx)
            return
        state = checkpoint.load(path)
        saved, current = json.loads(state["settings_json"]), self.training_settings()
        if saved != current:
            changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
            raise ValueError(f"{path}: the run was started with different settings (changed: {changed}); "
                             "delete the run directory to start over")
        if len(state["rng"]) != self.ctx.world_size:
            raise ValueError(f"{path}: written by {len(state['rng'])} processes, resumed with {self.ctx.world_size}")
        self.G.load_state_dict(state["G"])
        self.G_ema.load_state_dict(state["G_ema"])
        self.fake_score.load_state_dict(state["fake_score"])
        self.opt_G.load_state_dict(state["opt_G"])
        self.opt_psi.load_state_dict(state["opt_psi"])
        self.cur_nimg, self.cur_tick = state["cur_nimg"], state["cur_tick"] + 1
        self.best_fid, self.best_kimg = state["best_fid"], state["best_kimg"]
        set_rng_state(state["rng"][self.ctx.rank], self.device)
        if self.ctx.is_main:
            self.truncate_log()
            print(f"resuming {self.outdir} at {self.cur_nimg / 1000:.1f} kimg (best FID {self.best_fid:.4g})",
                  file=sys.stderr)
        barrier(self.ctx)

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


def add(stats: dict, **values) -> None:
    """Accumulate loss tensors and counts without synchronising with the device."""
    for k, v in values.items():
        v = v.detach() if isinstance(v, torch.Tensor) else v
        stats[k] = stats[k] + v if k in stats else v


def summarize(stats: dict, iterations: int) -> dict:
    """Per-iteration means of the accumulated losses; the count of NaN-masked samples (one sync per tick)."""
    out = {k: float(v) / max(iterations, 1) for k, v in stats.items() if k != "skipped"}
    out["nan_skipped"] = int(stats.get("skipped", 0))
    return out


@contextlib.contextmanager
def stop_signals(distiller: Distiller):
    """While distilling, SIGUSR2 / SIGTERM only set a flag that the loop checks after each iteration."""
    def handler(signum, frame):
        distiller.stop_signal = (signum, distiller.cur_nimg)

    if stopping.received() is not None:  # it came while the command was loading
        handler(stopping.received(), None)
    previous = {s: signal.signal(s, handler) for s in stopping.STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def format_record(r: dict, best_fid: float) -> str:
    parts = [f"tick {r['tick']:<4d}", f"kimg {r['kimg']:<8.1f}", f"stage {r['stage']}",
             f"sec/kimg {r['sec_per_kimg']:<7.2f}", f"eta {max(r['eta_sec'], 0) / 60:6.1f} min",
             f"mem {r['peak_mem_mb']:.0f} MB"]
    parts += [f"{k} {v:.4g}" for k, v in r.items() if k.startswith("loss")]
    if r.get("nan_skipped"):
        parts.append(f"nan-skipped {r['nan_skipped']}")
    if "fid" in r:
        parts.append(f"FID {r['fid']:.4g} (best {min(best_fid, r['fid']):.4g})")
    return "  ".join(parts)
