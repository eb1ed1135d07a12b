"""Training an EDM teacher from scratch (used by the tiny experiment; paper teachers are downloaded).

EDM's loss (Karras et al. 2022, eq. 2 with Table 1's σ distribution and weight): ln σ ~ N(P_mean, P_std²),
L = λ(σ)·‖D(y + σε; σ) − y‖². The snapshot saved is the EMA of the weights, in the same format as
converted NVIDIA teachers.
"""
from __future__ import annotations

import copy

import torch

from sidcore import checkpoint
from sidcore.dataset import ShuffledOrder, read_image_zip
from sidcore.ema import ema_beta, update_ema
from sidcore.losses import edm_weight, sigma_lognormal
from sidcore.networks import build_network, count_parameters
from sidcore.progress import Progress
from sidcore.settings import TeacherTraining, network_settings


def edm_loss(net, y: torch.Tensor, labels: torch.Tensor, P_mean: float, P_std: float) -> torch.Tensor:
    """Per-sample EDM denoising loss, summed over pixels."""
    sigma = sigma_lognormal(torch.randn([y.shape[0], 1, 1, 1], device=y.device), P_mean, P_std)
    D_yn = net(y + sigma * torch.randn_like(y), sigma, labels)
    return (edm_weight(sigma, net.sigma_data) * (D_yn - y) ** 2).flatten(1).sum(dim=1)


def train_teacher(settings: dict, data_path: str, out_path: str, log=print) -> None:
    """Train the teacher of ``settings`` (``teacher.train``) on the dataset zip; save its EMA snapshot."""
    t: TeacherTraining = settings["teacher"]["train"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(t.seed)
    dataset = read_image_zip(data_path, use_labels=settings["label_dim"] > 0)
    network = network_settings(settings)
    net = build_network(**network).to(device).train()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=t.lr, betas=(0.9, 0.999), eps=1e-8)
    order = ShuffledOrder(len(dataset), seed=t.seed)
    total = int(t.kimg * 1000)
    log(f"training a {count_parameters(net):,}-parameter teacher on {len(dataset)} images for {t.kimg} kimg")
    nimg, next_report = 0, 0
    progress = Progress(total, "kimg", scale=1000)
    while nimg < total:
        idx = order(range(nimg, nimg + t.batch))
        y, labels = dataset.to_model(idx).to(device), dataset.one_hot(idx).to(device)
        loss = edm_loss(net, y, labels, t.P_mean, t.P_std).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        update_ema(ema, net, ema_beta(nimg, t.batch, t.ema_halflife_kimg, rampup=0.05))
        nimg += t.batch
        if nimg >= next_report or nimg >= total:
            progress.update(nimg)
            log(f"{progress.line(rate='seconds_per_unit')}  loss {loss.item():.4f}")
            next_report += total // 20
    checkpoint.save_atomic(checkpoint.network_snapshot(ema, network, kimg=nimg / 1000, source="trained"), out_path)
