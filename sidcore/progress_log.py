"""The progress log of a distillation run: ``progress.jsonl``, one record per tick (images seen, stage, pace,
memory, mean losses, in-training metrics and the seconds they took), and the line printed for each record."""
from __future__ import annotations

import json
import resource
from pathlib import Path

import torch

from sidcore.atomic import write_text

FILE = "progress.jsonl"


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


def device_name(device: torch.device) -> str:
    """What runs the distillation: the GPU's model, or ``cpu``."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA max allocated on a GPU, else the resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def format_record(r: dict, best_fid: float) -> str:
    parts = [f"tick {r['tick']:<4d}", f"kimg {r['kimg']:<8.1f}", f"stage {r['stage']}",
             f"sec/kimg {r['sec_per_kimg']:<7.2f}", f"eta {max(r['eta_sec'], 0) / 60:6.1f} min",
             f"mem {r['peak_mem_mb']:.0f} MB"]
    parts += [f"{k} {v:.4g}" for k, v in r.items() if k.startswith("loss")]
    if r.get("nan_skipped"):
        parts.append(f"nan-skipped {r['nan_skipped']}")
    if "D_acc_real" in r:
        parts.append(f"D acc real/fake {r['D_acc_real']:.2f}/{r['D_acc_fake']:.2f}")
    if "G_grad_ratio" in r:
        parts.append(f"|grad gan|/|grad sid| {r['G_grad_ratio']:.3g} cos {r['G_grad_cos']:+.2f}")
    if "fid" in r:
        parts.append(f"FID {r['fid']:.4g} (best {min(best_fid, r['fid']):.4g})")
    if "fid_raw" in r:
        parts.append(f"raw-G FID {r['fid_raw']:.4g}")
    return "  ".join(parts)


def append(run_dir: Path, record: dict) -> None:
    with open(run_dir / FILE, "a") as f:
        f.write(json.dumps(record) + "\n")


def read(run_dir: str | Path) -> list[dict]:
    """The records of ``run_dir``'s progress log (none before its first tick)."""
    path = Path(run_dir) / FILE
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []


def truncate(run_dir: Path, ticks: int) -> None:
    """Keep the records of ticks 0 … ``ticks`` − 1 (drop those written after the training state being resumed)."""
    path = run_dir / FILE
    if path.exists():
        lines = [ln for ln in path.read_text().splitlines() if json.loads(ln)["tick"] < ticks]
        write_text(path, "".join(ln + "\n" for ln in lines))
