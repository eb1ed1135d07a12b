"""A distillation process for the parallelism and resilience tests (run as a script, one per rank).

    python distill_worker.py ROOT OUT METHOD BATCH_GPU AUGMENT ITERATIONS|grads|run [KILL_AT_STATE_WRITE]

ROOT holds the toy teacher and data (see test_distill.make_toy); AUGMENT is distill.augment, the probability of
EDM's augmentation in the fake-score (and discriminator) loss. ``ITERATIONS`` runs that many iterations
and writes rank 0's weights to OUT/weights.pt; ``grads`` writes the gradients of the first fake-score and
generator steps to OUT/grads.pt; ``run`` runs the whole loop (resuming from OUT). With
KILL_AT_STATE_WRITE = n, the process kills itself with SIGKILL halfway through writing its n-th training
state, as a node failure would.
"""
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_distill import fake_fid, settings  # noqa: E402

from sidcore import REQUEUE_EXIT, checkpoint, stopping  # noqa: E402
from sidcore.distill import Distiller  # noqa: E402
from sidcore.distributed import init_from_env  # noqa: E402


def kill_during_state_write(n: int) -> None:
    real_save = torch.save
    count = [0]

    def save(obj, f, *args, **kwargs):  # f: the temporary file, open (checkpoint.save_atomic)
        if isinstance(obj, dict) and "opt_G" in obj:
            count[0] += 1
            if count[0] == n:
                real_save(obj, f, *args, **kwargs)
                f.flush()
                f.truncate(f.tell() // 2)  # cut short, then the node dies
                print("killed during a state write", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *args, **kwargs)

    torch.save = save


def main() -> int:
    stopping.watch(resumable=True)  # as the sidcore command does for distill
    root, out, method, batch_gpu, augment, what = sys.argv[1:7]
    if len(sys.argv) > 7:
        kill_during_state_write(int(sys.argv[7]))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    s = settings(method, batch=16, batch_gpu=int(batch_gpu), augment=float(augment), stage_kimg=[0.016, 0.032],
                 duration_kimg=0.32, tick_kimg=0.016, snap_ticks=3, eval_early_ticks=[0], dump_ticks=1)
    ctx = init_from_env()
    distiller = Distiller(s, Path(root) / "teacher.pt", Path(root) / "data.zip", out, ctx=ctx)
    if what == "run":
        def log(message: str) -> None:
            print(message, flush=True)
        return 0 if distiller.run(fake_fid, log=log) else REQUEUE_EXIT
    stats = {}
    if what == "grads":
        grads = {}
        def record(name: str, net: torch.nn.Module):
            return lambda: grads.setdefault(name, {k: p.grad.clone() for k, p in net.named_parameters()})

        for name, opt, net in (("fake_score", distiller.opt_psi, distiller.fake_score),
                               ("G", distiller.opt_G, distiller.G)):
            opt.step = record(name, net)
        distiller.iteration(stats)
        if ctx.is_main:
            checkpoint.save_atomic(grads, out / "grads.pt")
        return 0
    for _ in range(int(what)):
        distiller.iteration(stats)
    if ctx.is_main:
        checkpoint.save_atomic({"G": distiller.G.state_dict(), "fake_score": distiller.fake_score.state_dict(),
                                "G_ema": distiller.G_ema.state_dict()}, out / "weights.pt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
