"""EDM2 in latent space on CPU: a tiny random SD-style VAE, a tiny EDM2 teacher, SiD and SiDA iterations."""
import json

import numpy as np
import pytest
import torch
from configured import job, without_compile
from PIL import Image

from sidcore import checkpoint, evaluate, latent
from sidcore.dataset import read_image_zip, write_latent_zip
from sidcore.distill import Distiller
from sidcore.evaluate import Evaluator
from sidcore.networks import build_network
from sidcore.networks.edm2 import MPConv
from sidcore.sampling import LabelSampler

TEACHER = dict(arch="edm2", img_resolution=8, img_channels=4, label_dim=10, model_channels=16, channel_mult=[1, 2],
               num_blocks=1, attn_resolutions=[4], dropout=0.0, logvar=True)
PIXELS = 64  # the tiny VAE downsamples by 8, like the SD VAE: 64×64 pixels <-> 8×8 latents


def settings(method: str) -> dict:
    """EDM2-XS's settings of ``method`` at α = 1.0 with a toy network, latents and budget."""
    toy = dict(batch=8, batch_gpu=4, lr=1e-4, glr=1e-4, ema_halflife_kimg=0.05, ema_rampup=0.05,
               stage_kimg=[0.008, 0.016], duration_kimg=0.032, tick_kimg=0.008, snap_ticks=2, eval_early_ticks=[0],
               eval_first_tick=0, dump_ticks=2, keep_snapshots=2, eval_images=8, seed=5, return_logvar=True)
    network = {k: v for k, v in TEACHER.items() if k not in ("img_resolution", "img_channels", "label_dim", "logvar")}
    return without_compile(job("edm2-xs", method, 1.0, distill=toy, network=network, init=None,
                               dataset="toy-edm2", resolution=8, label_dim=10,
                               latent={"vae": "vae/tiny", "resolution": PIXELS}))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from diffusers import AutoencoderKL
    root = tmp_path_factory.mktemp("edm2")
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, norm_num_groups=4, sample_size=PIXELS)
    vae.save_pretrained(root / "vae")
    rng = np.random.default_rng(0)
    pixels = torch.from_numpy(rng.integers(0, 256, (24, 3, PIXELS, PIXELS), dtype=np.uint8))
    mean_std = latent.StabilityVAE(root / "vae").encode(pixels)
    write_latent_zip(root / "latents.zip", [mean_std.numpy()], rng.integers(0, 10, 24))
    teacher = build_network(**TEACHER)
    checkpoint.save_atomic(checkpoint.network_snapshot(teacher, TEACHER), root / "teacher.pt")
    return root


def fake_fid(G):
    return {"fid": float(sum(p.double().abs().sum() for p in G.parameters()) % 97)}


def test_latent_dataset_and_vae_round_trip(files):
    ds = read_image_zip(files / "latents.zip")
    assert (ds.kind, ds.channels, ds.resolution, ds.label_dim) == ("latent", 4, 8, 10)
    x = ds.to_model(torch.arange(4))
    assert x.shape == (4, 4, 8, 8) and x.dtype == torch.float32
    images = latent.StabilityVAE(files / "vae").decode(x)
    assert images.shape == (4, 3, PIXELS, PIXELS) and images.dtype == torch.uint8


@pytest.mark.parametrize("method", ["sid", "sida"])
def test_sid_and_sida_iterations_in_latent_space(files, tmp_path, method):
    out = tmp_path / method
    out.mkdir()
    distiller = Distiller(settings(method), files / "teacher.pt", files / "latents.zip", out,
                          vae_path=str(files / "vae"))
    assert "logvar_linear.weight" in distiller.fake_score.state_dict()
    assert not any(k.startswith("logvar") for k in distiller.G.state_dict())  # the generator has no logvar head
    G0 = {k: v.clone() for k, v in distiller.G.state_dict().items()}
    u0 = distiller.fake_score.logvar_linear.weight.clone()
    distiller.run(fake_fid, log=lambda m: None)

    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert records[-1]["kimg"] == pytest.approx(0.032)
    assert all(np.isfinite(v) for r in records for k, v in r.items() if k.startswith("loss"))
    assert records[-1]["stage"] == (3 if method == "sida" else 2)
    if method == "sida":
        assert "loss_D" in records[0] and "loss_G_gan" in records[-1]
    assert any(not torch.equal(G0[k], v) for k, v in distiller.G.state_dict().items())
    assert not torch.equal(u0, distiller.fake_score.logvar_linear.weight)  # the uncertainty head is trained
    for net in (distiller.G, distiller.fake_score):  # forced weight normalisation: unit RMS per output unit
        for m in net.modules():
            if isinstance(m, MPConv):
                rms = m.weight.detach().flatten(1).square().mean(dim=1).sqrt()
                assert torch.allclose(rms, torch.ones_like(rms), atol=1e-3)
    grid = Image.open(sorted(out.glob("fakes-*.png"))[-1])
    assert grid.size == (8 * PIXELS, 8 * PIXELS) and grid.mode == "RGB"  # decoded through the VAE
    G, network = checkpoint.load_network(out / "generator.pt")
    assert network["arch"] == "edm2" and network["logvar"] is False


def test_evaluator_decodes_latents_before_the_detector(files, monkeypatch):
    seen = []

    def extract(detector, images):  # stands in for the detector: records what would reach it
        seen.append(images)
        return {"fid": torch.zeros(len(images), 2, dtype=torch.float64)}

    monkeypatch.setattr(evaluate.metrics, "extract", extract)
    ds = read_image_zip(files / "latents.zip")
    ev = Evaluator({"inception": None}, {"fid": {"mu": np.zeros(2), "sigma": np.eye(2)}}, LabelSampler(ds.labels, 10),
                   (4, 8, 8), ["fid"], torch.device("cpu"), seed=1, vae=latent.StabilityVAE(files / "vae"))
    G = build_network(**{**TEACHER, "logvar": False}).eval()
    result = ev(lambda z, labels: G(2.5 * z, torch.full([len(z), 1, 1, 1], 2.5), labels), 6, 3, run=0)
    assert result["fid"] == pytest.approx(2.0)  # zero features against N(0, I) in 2-d: tr(0 + I − 2·0) = 2
    assert [tuple(x.shape) for x in seen] == [(3, 3, PIXELS, PIXELS)] * 2 and seen[0].dtype == torch.uint8
