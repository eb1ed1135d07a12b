"""The bill of a table before it runs (sidcore.plan, sidcore.report.bill): its FLOP counts, its calibration on
Table 8, and what it reads from a run under way."""
import json
import subprocess

import numpy as np
import pandas as pd
import pytest
import test_workflow
import torch
from configured import CONFIG, job
from test_workflow import SNAKEMAKE
from torch.utils.flop_counter import FlopCounterMode

from sidcore import checkpoint, plan
from sidcore.dataset import write_image_zip
from sidcore.distill import Distiller
from sidcore.errors import UserError
from sidcore.methods import METHOD_NAMES, alpha_text
from sidcore.networks import build_network
from sidcore.report import bill
from sidcore.settings import network_settings, resolve

workdir = test_workflow.workdir  # the fixture: a copy of the workflow to run Snakemake in
TOTALS = ["total, one job after another", "total, as the DAG allows"]


def networks() -> dict[str, dict]:
    out = {}
    for dataset in CONFIG["datasets"]:
        out.setdefault(CONFIG["datasets"][dataset]["table"], network_settings(resolve(CONFIG, dataset)))
    return out


def count(fn, *args) -> float:
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops() / 1e9


def test_a_sid_iteration_is_eleven_forward_passes_per_image(tmp_path):
    s = job("tiny", "sid", 1.2, distill=dict(batch=16, batch_gpu=16, duration_kimg=1), init=None)
    rng = np.random.default_rng(0)
    write_image_zip(tmp_path / "data.zip", rng.integers(0, 256, (32, 1, 8, 8), dtype=np.uint8), rng.integers(0, 10, 32))
    network = network_settings(s)
    checkpoint.save_atomic(checkpoint.network_snapshot(build_network(**network), network), tmp_path / "teacher.pt")
    dist = Distiller(s, tmp_path / "teacher.pt", tmp_path / "data.zip", tmp_path / "run")
    iteration = count(dist.iteration, {}) * 1e9
    assert iteration / (16 * bill.forward_flops(network)) == pytest.approx(bill.ITERATION_PASSES, rel=0.01)


def test_the_evaluation_networks_costs_are_those_of_their_architectures():
    import torchvision
    from diffusers import AutoencoderKL
    from timm.models.vision_transformer import VisionTransformer

    from sidcore.detectors.digits import DigitNet
    ref = bill.reference_flops()
    with torch.device("meta"):
        inception = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False).eval()
        vit_l14 = VisionTransformer(img_size=224, patch_size=14, embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4,
                                    init_values=1.0, num_classes=0, global_pool="token", weight_init="skip").eval()
        sd_vae = AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                               block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4)
        measured = {
            "inception": count(inception, torch.zeros(1, 3, 299, 299)),
            "digits": count(DigitNet(), torch.zeros(1, 1, 8, 8)),
            "dinov2": count(vit_l14, torch.zeros(1, 3, 224, 224)),
            "vae_decoder": count(sd_vae.decode, torch.zeros(1, 4, 64, 64)),
            "vae_encoder": count(sd_vae.encode, torch.zeros(1, 3, 512, 512)),
        }
    expected = {"inception": ref["detectors"]["inception-2015-12-05"], "digits": ref["detectors"]["sidcore-digits"],
                **{k: ref[k] for k in ("dinov2", "vae_decoder", "vae_encoder")}}
    assert ref["detectors"]["inception-v3-compat"] == ref["detectors"]["inception-2015-12-05"]
    for key, value in measured.items():
        assert value == pytest.approx(expected[key], rel=2e-3), key


def test_flops_predict_table8s_h100_columns_from_each_other_within_15_percent():
    rates = bill.Throughputs(networks(), {})
    for method in ("sid", "sida"):
        h100 = [rates.columns[(t, method)][0] for t in ("imagenet64", "ffhq64", "afhq64-v2")]
        assert max(h100) / min(h100) < 1.15, (method, h100)


def distill_job(tmp_path, dataset="cifar10-uncond", method="sid", alpha=1.2, gpus=8, **distill) -> dict:
    s = job(dataset, method, alpha, distill=distill or None)
    return plan.distill_job(s, gpus, False, str(tmp_path / f"{dataset}-{method}"), [])


def test_a_run_not_started_costs_table8s_rate_and_its_evaluations(tmp_path):
    j = distill_job(tmp_path, gpus=4, duration_kimg=1000, eval_early_ticks=[], snap_ticks=1000)
    row = bill.bill([j], networks()).iloc[0]
    table8 = bill.paper_costs()[("cifar10-uncond", "sid")]
    training_hours = 1000 * table8["sec_per_kimg"] * table8["gpus"] / 4 / 3600
    assert row["rate from"] == "Table 8" and row["device"] == "V100" and row["GPUs"] == 4
    assert "2 in-training FIDs" in row["work left"]  # tick 0 (snap_ticks divides 0) and the last
    assert training_hours < row["hours"] < training_hours * 1.05
    assert row["GPU-hours"] == pytest.approx(4 * row["hours"], abs=0.1)


def test_a_run_under_way_is_billed_from_its_own_log_for_what_remains(tmp_path):
    j = distill_job(tmp_path, gpus=8, duration_kimg=1000, eval_early_ticks=[], snap_ticks=1000, tick_kimg=10)
    run = tmp_path / "cifar10-uncond-sid"
    run.mkdir()
    ticks = [{"tick": t, "kimg": 10.0 * t, "sec_per_kimg": 99.0 if t == 0 else 2.0, "processes": 2,
              "device": "NVIDIA A100"} for t in range(51)]
    (run / "progress.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ticks))
    row = bill.bill([j], networks()).iloc[0]
    assert row["rate from"] == "own log" and row["device"] == "NVIDIA A100"
    assert row["work left"].startswith("500 of 1,000 kimg")
    training_hours = 500 * 2.0 * 2 / 8 / 3600  # its rate on 2 processes, spread over the 8 GPUs configured
    assert training_hours < row["hours"] < training_hours * 1.5


def test_the_jobs_a_bill_reads_are_the_jobs_the_workflow_describes(tmp_path):
    """``sidcore plan --jobs`` takes exactly what the job builders write, and names what a job lacks."""
    s = resolve(CONFIG, "cifar10-uncond")
    jobs = [distill_job(tmp_path), plan.evaluation_job(s, 1, False, "teacher", ["r.json"], [])]
    for described in jobs:
        assert set(described) == set(plan.COMMON_KEYS + plan.STAGE_KEYS[described["stage"]])
    assert plan.loads_jobs(plan.dumps(jobs), "--jobs") == json.loads(plan.dumps(jobs))["jobs"]
    with pytest.raises(UserError, match=r"--jobs: jobs\[1\] \(evaluate\) without 'num_images'"):
        plan.loads_jobs(json.dumps({"jobs": [jobs[0], {k: v for k, v in jobs[1].items() if k != "num_images"}]}),
                        "--jobs")
    with pytest.raises(UserError, match="--jobs: a JSON object with a list 'jobs'"):
        plan.loads_jobs("{}", "--jobs")


def test_finished_jobs_are_not_billed_and_evaluations_count_missing_runs(tmp_path):
    s = resolve(CONFIG, "cifar10-uncond")
    runs = [tmp_path / f"run{r}.json" for r in range(10)]
    for r in runs[:7]:
        r.write_text("{}")
    evaluation = plan.evaluation_job(s, 1, False, "teacher", [str(r) for r in runs], [])
    done = distill_job(tmp_path)
    (tmp_path / "cifar10-uncond-sid").mkdir()
    (tmp_path / "cifar10-uncond-sid" / "generator.pt").write_bytes(b"")
    frame = bill.bill([evaluation, done], networks())
    assert list(frame["job"]) == ["evaluate cifar10-uncond teacher", *TOTALS]
    assert frame.iloc[0]["work left"] == "3 runs × 50,000 images, 35 NFE"


def test_a_dataset_table8_does_not_cover_is_scaled_from_its_h100_columns(tmp_path):
    row = bill.bill([distill_job(tmp_path, "edm2-xs", "sid", 1.0)], networks()).iloc[0]
    assert row["rate from"] == "Table 8 H100, scaled" and row["device"] == "H100"
    assert row["GPUs"] == 8 and row["hours"] > 0


def test_the_bill_target_is_written_again_when_a_run_progresses(workdir):
    """`snakemake results/plans/tiny.md` bills every job of the tiny table; once a run has a progress log, the same
    command writes the bill again, that run billed from its log."""
    def plan_tiny() -> str:
        r = subprocess.run([*SNAKEMAKE, "--cores", "1", "results/plans/tiny.md"], cwd=workdir, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stderr

    assert "rule plan" in plan_tiny()
    frame = pd.read_csv(workdir / "results/plans/tiny.csv")
    methods = CONFIG["datasets"]["tiny"]["methods"]
    runs = [f"distill tiny {METHOD_NAMES[m]} α={alpha_text(a)}" for m, spec in methods.items() for a in spec["alphas"]]
    assert [j for j in frame["job"] if j.startswith("distill")] == runs
    assert "evaluate tiny teacher" in set(frame["job"]) and list(frame["job"].iloc[-2:]) == TOTALS
    assert "rule plan" not in plan_tiny()  # nothing changed: nothing to do
    run = workdir / "results/tiny/sid/alpha1.0"
    run.mkdir(parents=True)
    duration = CONFIG["datasets"]["tiny"]["distill"]["duration_kimg"]
    ticks = [{"tick": t, "kimg": float(t), "sec_per_kimg": 3.0, "processes": 2, "device": "cpu"}
             for t in range(duration // 2 + 1)]
    (run / "progress.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ticks))
    assert "rule plan" in plan_tiny()
    row = pd.read_csv(workdir / "results/plans/tiny.csv").set_index("job").loc["distill tiny SiD α=1.0"]
    assert row["rate from"] == "own log" and row["work left"].startswith(f"{duration // 2} of {duration} kimg")


def test_the_dag_total_is_the_longest_chain_of_jobs_waiting_for_jobs():
    def job(name: str, after: list[str]) -> dict:
        return {"outputs": [name], "after": after}

    jobs = [job("teacher", []), job("sid", ["teacher"]), job("sid-eval", ["sid"]), job("sida", ["teacher"]),
            job("sid2a", ["teacher", "sid"]), job("sid2a-eval", ["sid2a"]), job("teacher-eval", ["teacher", "data"])]
    hours = [2.0, 5.0, 1.0, 7.5, 4.0, 1.5, 3.0]
    assert bill.longest_chain(jobs, hours) == (12.5, [0, 1, 4, 5])  # 2 + 5 + 4 + 1.5 > 2 + 7.5
    hours[1] = 0.0  # SiD done
    assert bill.longest_chain(jobs, hours) == (9.5, [0, 3])
    assert bill.longest_chain([], []) == (0.0, [])


def test_cpu_jobs_are_billed_on_the_cpu_timed_here_and_use_no_gpu(tmp_path, monkeypatch):
    """The tiny table run here without a GPU: the teacher training and the GPU stages on CPU cores."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    s = resolve(CONFIG, "tiny")
    teacher = str(tmp_path / "teacher.pt")
    run = str(tmp_path / "sid")
    jobs = [plan.teacher_training_job(s, teacher),
            plan.distill_job(job("tiny", "sid", 1.2), 2, True, run, [teacher]),
            plan.evaluation_job(s, 1, True, "SiD α=1.2", [f"{run}/eval/run0.json"], [f"{run}/generator.pt"]),
            plan.distill_job(job("tiny", "sid", 1.0), 2, True, str(tmp_path / "sid1.0"), [teacher]),
            plan.distill_job(job("tiny", "sid", 1.2), 2, False, str(tmp_path / "cluster"), [teacher])]
    frame = bill.bill(jobs, networks()).set_index("job")
    training = frame.loc["train teacher tiny"]
    assert training["device"] == "cpu" and training["rate from"] == "timed here"
    assert training["GPUs"] == 0 and training["GPU-hours"] == 0 and training["hours"] > 0
    assert training["work left"] == f"{s['teacher']['train'].kimg:,.0f} kimg"
    local, cluster = frame.loc["distill tiny SiD α=1.2"].iloc[0], frame.loc["distill tiny SiD α=1.2"].iloc[1]
    assert (local["device"], local["GPUs"], local["GPU-hours"]) == ("cpu", 0, 0) and local["hours"] > 0
    assert cluster["device"] == "H100" and cluster["GPUs"] == 2  # launcher: slurm, a GPU node
    one_by_one, dag = frame.loc["total, one job after another"], frame.loc["total, as the DAG allows"]
    assert one_by_one["GPU-hours"] == cluster["GPU-hours"]
    assert dag["hours"] < one_by_one["hours"]  # SiD α=1.0 trains beside SiD α=1.2
    assert dag["work left"] == "longest chain: train teacher tiny → distill tiny SiD α=1.2 → evaluate tiny SiD α=1.2"
