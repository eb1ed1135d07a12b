"""The SiD / SiDA / SiD²A distillation loop (algorithm.md: alternating fake-score and generator updates).

One iteration: (1) fake-score ψ step on generator samples drawn without gradient (SiDA adds the
discriminator loss on real images); (2) generator θ step on the SiD loss (SiDA mixes in the
adversarial term once its third stage starts); (3) EMA of the generator. Each step accumulates R
micro-batches per process; with several processes DDP averages the gradients, synchronising only on the
last micro-batch. Losses are sums over pixels divided by the per-process batch, as the official code.

Every ``tick_kimg`` images the loop writes a record to the progress log (``sidcore.progress_log``; also to
TensorBoard where asked, ``sidcore.tensorboard``) with the tick's instruments (``sidcore.instruments``: SiDA's
discriminator, one gradient probe of the adversarial term), evaluates G_ema when due (``sidcore.model_selection``:
snapshots, sample grids, the published ``generator.pt`` and ``log.jsonl``) and saves the training state when due
(``sidcore.training_state``). Restarting on the same directory resumes from the last training state,
bit-identically, with the same ticks. A stop signal (``sidcore.stopping``) makes the loop finish its iteration,
save the state and return False (the command exits with ``REQUEUE_EXIT``).
"""
from __future__ import annotations

import contextlib
import copy
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from sidcore import checkpoint, engine, stopping, training_state
from sidcore.augment import AugmentPipe
from sidcore.dataset import ShuffledOrder, read_image_zip
from sidcore.distributed import Context, barrier, broadcast, to_device
from sidcore.ema import ema_beta, update_ema
from sidcore.instruments import gradient_probe
from sidcore.latent import load_vae
from sidcore.losses import SiDLoss
from sidcore.model_selection import EvaluateFn, ModelSelection
from sidcore.networks import build_network
from sidcore.networks.edm2 import force_weight_normalization_
from sidcore.preflight import check_data_shape, check_distill
from sidcore.progress import Progress
from sidcore.progress_log import add, append, device_name, format_record, peak_memory_mb, summarize
from sidcore.randomness import SampleNoise, micro_batch_positions
from sidcore.sampling import one_step
from sidcore.settings import Distill, generator_settings
from sidcore.tensorboard import Board


def adam_eps(fp16: bool) -> float:
    return 1e-6 if fp16 else 1e-8


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
        d: Distill = settings["distill"]
        self.settings, self.d = settings, d
        self.outdir = Path(outdir)
        self.ctx = ctx or Context(0, 1, 0, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        self.batch_total, self.rounds = check_distill(settings, self.ctx.world_size)
        self.device = self.ctx.device
        torch.manual_seed(d.seed * self.ctx.world_size + self.ctx.rank)  # dropout masks, per rank

        self.dataset = read_image_zip(data_path, use_labels=settings["label_dim"] > 0)
        check_data_shape(settings, self.dataset)
        self.order = ShuffledOrder(len(self.dataset), d.seed)
        self.vae = load_vae(settings, vae_path, self.device)
        overrides = dict(dropout=d.dropout, use_fp16=d.fp16)
        teacher, network = checkpoint.load_network(teacher_path, **overrides)
        logvar = d.return_logvar
        if logvar and not network.get("logvar"):
            raise ValueError(f"datasets.{settings['dataset']}.distill.return_logvar: the teacher {teacher_path} "
                             "has no log-variance head")
        self.network = generator_settings(network)
        self.true_score = teacher.to(self.device).eval().requires_grad_(False)
        # The fake score starts as the teacher; it keeps the log-variance head only if the losses use it.
        self.fake_score = self.copy_weights(teacher, network if logvar else self.network)
        self.start_kimg = 0.0  # images the generator had seen when this run began (SiD²A: its SiD start's)
        if init_path is not None:  # SiD²A: the generator starts from a distilled SiD generator
            init = checkpoint.load_snapshot(init_path)
            G, _ = checkpoint.load_network(init_path, init, **overrides)
            self.G = G.to(self.device).eval().requires_grad_(False)  # train mode only inside its own step
            self.start_kimg = float(init["meta"].get("kimg") or 0.0)
        else:
            self.G = self.copy_weights(teacher, self.network)
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        half = torch.bfloat16 if d.bf16 else torch.float16
        for net in (self.true_score, self.fake_score, self.G, self.G_ema):
            net.half_dtype = half
            engine.prepare(net, d.engine)
        # EDM2's forced weight normalisation, once per optimiser step (SiDA may switch it off).
        self.force_normalization = network.get("arch") == "edm2" and (
            d.force_normalization or not settings["adversarial"])
        self.fake_score_ddp, self.G_ddp = self.parallel(self.fake_score), self.parallel(self.G)

        eps = adam_eps(d.fp16)
        self.opt_psi = engine.adam(self.fake_score.parameters(), d.engine, lr=d.lr, betas=(0.0, 0.999), eps=eps)
        self.opt_G = engine.adam(self.G.parameters(), d.engine, lr=d.glr, betas=(d.g_beta1, 0.999), eps=eps)
        self.loss = SiDLoss(alpha=settings["alpha"], tmax=d.tmax, P_mean=d.P_mean, P_std=d.P_std,
                            logvar=logvar, augment=AugmentPipe(d.augment) if d.augment > 0 else None)
        self.batch_gpu = self.batch_total // self.rounds
        self.shape = (settings["channels"], settings["resolution"], settings["resolution"])
        g = torch.Generator().manual_seed(d.seed + 7)  # fixed latents and labels of the sample grids
        grid_z = torch.randn([64, *self.shape], generator=g)
        grid_labels = self.dataset.one_hot(torch.randint(len(self.dataset), (64,), generator=g))
        self.selection = ModelSelection(settings, self.network, self.outdir, self.ctx, grid_z, grid_labels, self.vae,
                                        self.start_kimg)

        self.cur_nimg = 0  # images seen
        self.cur_tick, self.tick_start_nimg = 0, 0  # the tick under way (its record not written yet), its start
        self.probes: dict[str, float] = {}  # the tick's gradient probe (``generator_step``)
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
    def stage(self, nimg: int | None = None) -> int:
        """SiDA's stage (1: ψ only, 2: + SiD generator, 3: + adversarial) of the iteration starting at ``nimg``
        images seen (default: the next one); SiD is always stage 2."""
        if not self.settings["adversarial"]:
            return 2
        nimg = self.cur_nimg if nimg is None else nimg
        g_start, gan_start = (k * 1000 for k in self.d.stage_kimg)
        return 1 if nimg <= g_start else 2 if nimg <= gan_start else 3

    def draw(self, phase: int, round_: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, SampleNoise]:
        """One micro-batch of phase 0 (fake score) or 1 (generator): labels, real inputs, latents z and
        the noise of the losses, all determined by the samples' global positions."""
        ctx, d = self.ctx, self.d
        positions = micro_batch_positions(self.cur_nimg // d.batch, phase, d.batch, self.batch_gpu,
                                          self.rounds, ctx.rank, ctx.world_size, round_)
        noise = SampleNoise(d.seed, positions, self.device)
        idx = self.order(positions)
        labels = to_device(self.dataset.one_hot(idx), self.device)
        x_real = None
        if phase == 0 and self.settings["adversarial"]:  # only SiDA's discriminator sees real data
            # a latent's posterior draw comes from the sample's own stream, made on the host
            x_real = to_device(self.dataset.to_model(idx, SampleNoise(d.seed, positions)), self.device)
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
                x_g = one_step(self.G, z, labels, d.init_sigma)
            with self.accumulate(self.fake_score_ddp, r):
                if self.settings["adversarial"]:
                    loss_psi, loss_D, keep, readout = self.loss.fake_score_discriminator(
                        self.fake_score_ddp, x_g, x_real, labels, noise)
                    S_psi = loss_psi.sum() * (d.loss_scaling / B)
                    S_D = loss_D.sum() * (d.loss_scaling_D / B)
                    (S_psi + S_D).backward()
                    add(stats, loss_D=S_D, **{k: v / self.rounds for k, v in readout.items()})
                else:
                    loss_psi, keep = self.loss.fake_score(self.fake_score_ddp, x_g, labels, noise)
                    S_psi = loss_psi.sum() * (d.loss_scaling / B)
                    S_psi.backward()
            add(stats, loss_fake_score=S_psi, skipped=(~keep).sum())
        self.fake_score.eval().requires_grad_(False)
        sanitize_grads(self.fake_score, d.clip_fake_grad if self.settings["adversarial"] else None)
        self.opt_psi.step()
        self.opt_psi.zero_grad(set_to_none=True)

    def generator_step(self, stage: int, stats: dict, probe: bool = False) -> None:
        """G's step; with ``probe`` (stage 3), its first micro-batch also measures the adversarial gradient
        against SiD's (``sidcore.instruments.gradient_probe``) into ``self.probes``."""
        d, B = self.d, self.batch_total
        chw = self.shape[0] * self.shape[1] * self.shape[2]
        self.G.train().requires_grad_(True)
        if self.force_normalization:
            force_weight_normalization_(self.G)
        for r in range(self.rounds):
            labels, _, z, noise = self.draw(1, r)  # a fresh dataset draw, as the official loop
            with self.accumulate(self.G_ddp, r):
                x_g = one_step(self.G_ddp, z, labels, d.init_sigma)
                loss_sid, loss_gan, keep = self.loss.generator(self.true_score, self.fake_score, x_g, labels, noise,
                                                               adversarial=stage == 3)
                S_sid = loss_sid.sum() * (d.loss_scaling_G / B)
                if loss_gan is None:
                    S_sid.backward()
                else:
                    S_gan = loss_gan.sum() * chw * (d.loss_scaling_G_gan / B)  # eq. (8): b on every pixel
                    if probe and r == 0:
                        self.probes = gradient_probe(S_sid, S_gan, self.G.parameters())
                    (0.5 * S_sid + 0.5 * S_gan).backward()
                    add(stats, loss_G_gan=S_gan)
            add(stats, loss_G=S_sid, skipped=(~keep).sum())
        self.G.eval().requires_grad_(False)
        sanitize_grads(self.G, None)
        self.opt_G.step()
        self.opt_G.zero_grad(set_to_none=True)

    def update_ema(self) -> None:
        beta = ema_beta(self.cur_nimg, self.d.batch, self.d.ema_halflife_kimg, self.d.ema_rampup)
        update_ema(self.G_ema, self.G, beta)

    def iteration(self, stats: dict) -> int:
        """One SiD / SiDA iteration; returns its stage."""
        stage = self.stage()
        self.fake_score_step(stats)
        if stage >= 2:  # stage 1 keeps G frozen (the official computes, then discards, its update)
            self.generator_step(stage, stats, probe=stage == 3 and not self.probes)  # one probe per tick
        self.update_ema()
        self.cur_nimg += self.d.batch
        return stage

    # ------------------------------------------------------------------------------------------
    def run(self, evaluate: EvaluateFn, log: Callable[[str], None] = print, tensorboard: bool = False) -> bool:
        """Distil until ``duration_kimg``; returns False if a stop signal ended the run early (state saved).
        ``tensorboard``: rank 0 also writes the records and sample grids as TensorBoard events."""
        d, ctx = self.d, self.ctx
        total_nimg = int(d.duration_kimg * 1000)
        say = log if ctx.is_main else (lambda message: None)
        say(f"distilling {self.settings['dataset']} {self.settings['method']} alpha={self.settings['alpha']} "
            f"from {self.cur_nimg / 1000:.1f} to {total_nimg / 1000:.1f} kimg on {self.device} "
            f"(batch {d.batch} = {ctx.world_size} processes x {self.rounds} rounds x {self.batch_gpu})")
        with Board(self.outdir, self.cur_nimg, ctx.is_main and tensorboard) as board:
            return self.ticks(total_nimg, evaluate, say, board)

    def ticks(self, total_nimg: int, evaluate: EvaluateFn, say: Callable[[str], None],
              board: Board) -> bool:
        """``run``'s loop: iterations and, at the end of each tick, its record (progress log, ``board``), the
        evaluation and the training state when due."""
        d, ctx = self.d, self.ctx
        run_pace = Progress(total_nimg, "kimg", scale=1000, done=self.cur_nimg)  # of this session, for the ETA
        tick_pace = Progress(None, "kimg", scale=1000, done=self.cur_nimg)
        stats: dict = {}
        iterations = 0
        while True:
            done = self.cur_nimg >= total_nimg
            if self.tick_over(done):
                tick = self.cur_tick
                run_pace.update(self.cur_nimg)
                tick_pace.update(self.cur_nimg)
                record = {"kimg": self.cur_nimg / 1000, "tick": tick, "stage": self.stage(self.cur_nimg - d.batch),
                          "sec_per_kimg": tick_pace.seconds_per_unit(), "eta_sec": run_pace.eta(),
                          "peak_mem_mb": peak_memory_mb(self.device), "device": device_name(self.device),
                          "processes": ctx.world_size, "batch_gpu": self.batch_gpu,
                          **({"start_kimg": self.start_kimg} if self.start_kimg else {}),
                          **summarize(stats, iterations),
                          **self.probes}
                stats, iterations, self.probes = {}, 0, {}
                if self.selection.due(tick, done):
                    start = time.monotonic()
                    record.update(self.selection.evaluate(self.G_ema, self.cur_nimg, evaluate, board))
                    if d.eval_raw_generator:  # the raw G on the same seeds, beside G_ema
                        raw = broadcast(ctx, evaluate(self.G))
                        record.update({f"{k}_raw": v for k, v in raw.items()})
                    record["eval_sec"] = time.monotonic() - start  # apart from sec_per_kimg, as Table 8's
                if ctx.is_main:
                    append(self.outdir, record)
                    board.record(record, self.cur_nimg)
                say(format_record(record, self.selection.best_fid))
                self.cur_tick, self.tick_start_nimg = tick + 1, self.cur_nimg
                if done or (tick != 0 and tick % d.dump_ticks == 0):
                    self.save_state()
                tick_pace = Progress(None, "kimg", scale=1000, done=self.cur_nimg)
            if done:
                break
            start_nimg = self.cur_nimg
            self.iteration(stats)
            iterations += 1
            signum = stopping.requested(ctx)
            if signum is not None:
                self.save_state()
                say(f"{signum.name} received at {start_nimg / 1000:.3f} kimg: state saved at "
                    f"{self.cur_nimg / 1000:.3f} kimg; exiting for requeue")
                return False
        if ctx.is_main:
            self.selection.publish()
        barrier(ctx)
        return True

    def tick_over(self, done: bool) -> bool:
        """Whether the tick under way ends here: tick 0 after one iteration, the others after ``tick_kimg``,
        the last at the end of the run; never before an iteration (a resumed run may have none left)."""
        if self.cur_nimg == self.tick_start_nimg:
            return False
        return done or self.cur_tick == 0 or self.cur_nimg >= self.tick_start_nimg + self.d.tick_kimg * 1000

    # ------------------------------------------------------------------------------------------
    def save_state(self) -> None:
        """Everything needed to continue exactly (see ``sidcore.training_state``)."""
        training_state.save(self.outdir, self.ctx, self.settings, {
            "G": self.G.state_dict(), "G_ema": self.G_ema.state_dict(), "fake_score": self.fake_score.state_dict(),
            "opt_G": self.opt_G.state_dict(), "opt_psi": self.opt_psi.state_dict(),
            "cur_nimg": self.cur_nimg, "cur_tick": self.cur_tick, "tick_start_nimg": self.tick_start_nimg,
            "stage": self.stage(), "best_fid": self.selection.best_fid, "best_kimg": self.selection.best_kimg})

    def resume(self) -> None:
        """Continue from the run directory's training state, if there is one."""
        state = training_state.load(self.outdir, self.ctx, self.settings)
        if state is None:
            return
        for name in ("G", "G_ema", "fake_score", "opt_G", "opt_psi"):
            getattr(self, name).load_state_dict(state[name])
        self.cur_nimg, self.cur_tick = state["cur_nimg"], state["cur_tick"]
        self.tick_start_nimg = state["tick_start_nimg"]
        self.selection.best_fid, self.selection.best_kimg = state["best_fid"], state["best_kimg"]
        if self.ctx.is_main:
            print(f"resuming {self.outdir} at {self.cur_nimg / 1000:.1f} kimg "
                  f"(best FID {self.selection.best_fid:.4g})", file=sys.stderr)
