"""The Snakemake DAG: config validation errors, the jobs of each table, exactly-new jobs for a new alpha."""
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def with_local_data(workdir: Path) -> Path:
    """config.yaml's local data folders (ImageNet, FFHQ, AFHQv2), made empty under ``workdir``: a plan needs them
    to exist, as a run does."""
    config = (workdir / "config.yaml").read_text()
    for path in set(re.findall(r"path: (/data/datasets/[^,}\s]+)", config)):
        (workdir / path.lstrip("/")).mkdir(parents=True, exist_ok=True)
    (workdir / "config.yaml").write_text(config.replace("path: /data/datasets/", f"path: {workdir}/data/datasets/"))
    return workdir


@pytest.fixture
def workdir(tmp_path):
    """A copy of the workflow (not of results/) to run Snakemake in."""
    for name in ("Snakefile", "config.yaml"):
        shutil.copy(ROOT / name, tmp_path / name)
    for name in ("workflow", "envs"):  # envs/: the rules' software (their `conda:`)
        shutil.copytree(ROOT / name, tmp_path / name)
    return with_local_data(tmp_path)


def test_a_dry_run_plans_without_the_data_and_a_real_run_refuses_before_any_job(tmp_path):
    """As on a laptop: the paper tables' data folders do not exist. The plan warns once per data folder."""
    for name in ("Snakefile", "config.yaml"):
        shutil.copy(ROOT / name, tmp_path / name)
    for name in ("workflow", "envs"):
        shutil.copytree(ROOT / name, tmp_path / name)
    warning = ("warning: datasets.edm2-xs.data.path: /data/datasets/imagenet/train is not an existing image folder "
               "(source vae-latents); download the data and point this key at it (a dry run plans without it; job "
               "prepare_data for img512-sd will need it)")
    r = snakemake(tmp_path, targets=("results/tables/edm2.csv",))
    assert r.returncode == 0 and r.stderr.count(warning) == 1, r.stderr[-3000:]
    assert job_counts(r.stdout + r.stderr)["distill"] == 18
    r = subprocess.run([*SNAKEMAKE, "--cores", "1", "results/tables/ffhq64.csv"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    assert_refused(r, "datasets.ffhq64.data.path: /data/datasets/ffhq/images1024x1024 is not an existing image folder")
    assert not (tmp_path / "resources").exists() and not (tmp_path / "results").exists()


def snakemake(workdir: Path, *args: str, targets: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([*SNAKEMAKE, "-n", *targets, "--quiet", "rules", *args], cwd=workdir, capture_output=True,
                          text=True, timeout=300)


def assert_refused(r: subprocess.CompletedProcess, text: str, kind: str = "config error") -> None:
    """The plan ended before any job with one line ``<kind>: ...`` containing ``text``, and no traceback."""
    last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
    assert r.returncode != 0 and last.startswith(f"{kind}: ") and text in last, (r.stdout + r.stderr)[-2000:]
    assert "Traceback" not in r.stderr and "Job stats" not in r.stdout + r.stderr


def job_counts(out: str) -> Counter:
    """Parse Snakemake's 'Job stats' table of a dry run."""
    counts = Counter()
    for line in out.splitlines():
        m = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if m and m.group(1) != "total":
            counts[m.group(1)] = int(m.group(2))
    return counts


def overlay(workdir: Path, text: str) -> str:
    path = workdir / "overlay.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("text, key", [
    ("datasets: {tiny: {methods: {sid: {alphas: [one]}}}}", "alphas"),
    ("launcher: pbs", "launcher"),
    ("cluster: {jobs: {distill: {gpus_per_node: 0}}}", "gpus_per_node"),
    ("datasets: {tiny: {cluster: {jobs: {distill: {gpus_per_node: 3}}}}}", "cluster.jobs.distill"),
    ("datasets: {tiny: {cluster: {jobs: {encode: {gpus_per_node: 2}}}}}", "cluster.jobs.encode"),
    ("datasets: {tiny: {metrics: [fid, precision]}}", "tiny.pr_reference"),
    ("datasets: {tiny: {methods: {sid2a: {init: {from: released, alpha: 1.2}}}}}", "tiny.released.sid"),
    ("datasets: {tiny: {released: {sid: {'1.0': sid/no-such-generator}}}}", "sid/no-such-generator"),
    ("evaluation: {released: maybe}", "released"),
    ("datasets: {tiny: {distill: {batch: -64}}}", "batch"),
    ("datasets: {tiny: {bogus_key: 1}}", "bogus_key"),
    ("evaluation: {runs: 0}", "runs"),
    ("tables: [no-such-table]", "no-such-table"),
    ("datasets: {tiny: {data: {source: image-folder}}}", "path"),
    ("datasets: {tiny: {teacher: {source: download, artifact: teacher/no-such-teacher}}}", "teacher/no-such-teacher"),
    ("datasets: {tiny: {ablation: {methods: [dmd]}}}", "dmd"),
    ("datasets: {tiny: {ablation: {alphas: [1.0, 1.0]}}}", "datasets.tiny.ablation.alphas"),
    ("figures: {rows: 0}", "rows"),
    # numbers bounded to what can run (the job would fail or never end)
    ("datasets: {tiny: {distill: {batch: 64.0}}}", "datasets.tiny.distill.batch: 64.0 is not of type 'integer'"),
    ("datasets: {tiny: {distill: {seed: 1180591620717411303424}}}", "datasets.tiny.distill.seed"),
    ("datasets: {tiny: {distill: {batch: 1000000000000000000000000000000}}}", "is greater than the maximum of 65536"),
    ("datasets: {tiny: {distill: {duration_kimg: 1.0e+308}}}", "datasets.tiny.distill.duration_kimg"),
    ("datasets: {tiny: {label_dim: 1000000000000}}", "datasets.tiny.label_dim"),
    ("figures: {rows: 1000000000}", "figures.rows: 1000000000 is greater than the maximum of 64"),
    ("datasets: {tiny: {methods: {sid: {alphas: [1.0e-5]}}}}", "1e-05 is not allowed: α in [0, 10], 0 or at least"),
    ("evaluation: {runs: 1000}", "evaluation.runs"),
    # refusals that say what to do
    ("tabels: [tiny]", "unknown key 'tabels' at the top level (known: cluster, datasets, evaluation, figures, "
                       "launcher, logging, on_changed_settings, tables); did you mean 'tables'?"),
    ("datasets: {tiny: {distil: {lr: 1.0e-4}}}", "unknown key 'distil' in datasets.tiny (known: "),
    ("datasets: {tiny: {distil: {lr: 1.0e-4}}}", "; did you mean 'distill'?"),
    ("datasets: {tiny: {distill: {lr: 1e-4}}}", "datasets.tiny.distill.lr: '1e-4' is not of type 'number': YAML "
                                                "reads 1e-4 as text (a number needs a dot before its exponent); "
                                                "write 1.0e-4"),
    ("datasets: {tiny: {methods: {sid: {by_alpha: {1.2: {lr: 1.0e-4}}}}}}",
     "key 1.2 is read as a number, and by_alpha's keys are the alphas' text: quote it (\"1.2\": ...)"),
])
def test_bad_config_fails_before_any_job_naming_the_key(workdir, text, key):
    assert_refused(snakemake(workdir, "--configfile", overlay(workdir, text)), key)


@pytest.mark.parametrize("key, text", [
    ("cluster.partition", "cluster: {partition: 'gpu$(touch pwned)'}"),
    ("cluster.cpu_partition", "cluster: {cpu_partition: 'cpu;touch pwned'}"),
    ("cluster.account", "cluster: {account: 'lab`touch pwned`'}"),
    ("cluster.qos", "cluster: {qos: \"normal' && touch pwned && '\"}"),
    ("datasets.tiny.cluster.partition", "datasets: {tiny: {cluster: {partition: 'gpu|touch pwned'}}}"),
    ("datasets.tiny.size", "datasets: {tiny: {size: 'xs$(touch pwned)'}}"),
    ("cluster.partition", "cluster: {partition: 'gpu large'}"),  # a space would split the command
])
def test_a_config_value_never_runs_as_shell_code(workdir, key, text):
    """A real run (not a plan) of rules whose commands carry these values: refused naming the key, nothing ran."""
    targets = ("results/tiny/teacher/eval/run0.json", "results/plots/tiny.png", "resources/data/digits.zip")
    r = subprocess.run([*SNAKEMAKE, "--cores", "1", *targets, "--configfile", overlay(workdir, text)], cwd=workdir,
                       capture_output=True, text=True, timeout=300)
    assert_refused(r, key.rsplit(".", 1)[-1])
    assert "does not match" in r.stderr and not (workdir / "pwned").exists()
    assert not (workdir / "resources").exists() and not (workdir / "results").exists()


@pytest.mark.parametrize("text, key", [
    ("datasets: {tiny: {distill: {lr: .nan}}}", "datasets.tiny.distill.lr"),
    ("datasets: {tiny: {distill: {P_mean: -.inf}}}", "datasets.tiny.distill.P_mean"),
    ("datasets: {tiny: {methods: {sid: {by_alpha: {'1.2': {duration_kimg: .inf}}}}}}",
     "datasets.tiny.methods.sid.by_alpha.1.2.duration_kimg"),
    ("datasets: {tiny: {methods: {sid: {by_alpha: {'1.20': {lr: 1.0e-4}}}}}}", "datasets.tiny.methods.sid.by_alpha"),
    ("datasets: {tiny: {methods: {sid: {by_alpha: {'1.5': {lr: 1.0e-4}}}}}}", "alpha 1.5 is not run"),
    ("datasets: {tiny: {distill: {stage_kimg: [4, 2]}}}", "distill.stage_kimg"),
    ("datasets: {tiny: {distill: {bf16: true}}}", "distill.bf16"),
    ("datasets: {tiny: {distill: {augment: 0.12}}}", "network.augment_dim"),
    ("datasets: {edm2-xs: {distill: {augment: 0.12}}}", "EDM2 networks take no augmentation labels"),
    ("datasets: {tiny: {distill: {return_logvar: true}}}", "distill.return_logvar"),
    ("datasets: {tiny: {methods: {sid2a: {init: {from: sid, alpha: 1.5}}}}}", "datasets.tiny.methods.sid2a.init"),
    ("datasets: {tiny: {evaluation: {num_images: 100000000, batch: 1}}}", "datasets.tiny.evaluation"),
    ("datasets: {tiny: {ablation: {distill: {stage_kimg: [4, 2]}}}}", "datasets.tiny.ablation (sida, alpha 0.0)"),
    ("datasets: {tiny: {methods: {sida: {distill: {stage_kimg: [2, 20]}}}}}",
     "datasets.tiny.methods.sida (alpha 1.0): distill.stage_kimg=[2, 20] starts the adversarial loss at or after"),
    ("datasets: {tiny: {distill: {eval_first_tick: 11}}}", "distill.eval_first_tick=11 is past the run's last tick"),
    ("datasets: {tiny: {network: {arch: ddpmpp, channel_mult: [1, 2, 2, 2, 2]}}}",
     "datasets.tiny.network.channel_mult: 5 levels halve the resolution 4 times, which resolution 8 does not allow"),
    ("datasets: {tiny: {network: {arch: ddpmpp, attn_resolutions: [16]}}}",
     "datasets.tiny.network.attn_resolutions: [16] is not among the network's resolutions [8, 4]"),
])
def test_values_no_job_could_run_fail_the_plan_naming_the_key(workdir, text, key):
    """Each is refused by `snakemake -n` before any job, by the checks the jobs themselves make."""
    assert_refused(snakemake(workdir, "--configfile", overlay(workdir, text), targets=("results/tables/tiny.csv",)),
                   key)


def test_a_ready_made_zip_of_another_shape_fails_the_plan(workdir):
    from sidcore.dataset import write_image_zip
    write_image_zip(workdir / "cifar.zip", np.zeros((2, 3, 32, 32), np.uint8), np.array([0, 9]))
    data = f"{{data: {{name: digits, source: edm-zip, path: {workdir / 'cifar.zip'}}}}}"  # both datasets of digits.zip
    r = snakemake(workdir, "--configfile", overlay(workdir, f"datasets: {{tiny: {data}, tiny-claims: {data}}}"))
    assert_refused(r, "datasets.tiny: config says channels/resolution/label_dim = (1, 8, 10), the data has (3, 32, 10)")


@pytest.mark.parametrize("edit, where", [
    (lambda c: c.replace("  batch: 256\n", "  batch: 256\n  batch: 512\n", 1), "duplicate key 'batch'"),
    (lambda c: c.replace("tables: [tiny]", "tables: [tiny"), "config.yaml, line"),
])
def test_malformed_config_yaml_is_reported_with_its_place(workdir, edit, where):
    config = workdir / "config.yaml"
    config.write_text(edit(config.read_text()))
    r = snakemake(workdir)
    assert_refused(r, where)
    assert "column" in r.stderr


def alias_bomb(levels: int = 9) -> str:
    """YAML of nine values whose nested aliases expand to 9 ** (levels + 1) of them."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("text, culprit", [
    ("__use_yte__: true\nevaluation:\n  runs: ?__import__('os').system('touch pwned') or 2\n", "YTE template"),
    (alias_bomb(), "aliases expand to 4,412,961,516 values"),
    ("tables: [tiny]\n# " + "x" * (2 << 20) + "\n", "2,097,170 bytes, more than the 1,048,576"),
    ("- tables\n- tiny\n", "this one is a list"),
    ("# nothing but a comment\n", "this one is empty"),
    ("# caf\xe9\ntables: [tiny]\n", "not UTF-8 text (byte 5 is b'\\xe9')"),
])
def test_a_config_yaml_that_is_not_plain_values_is_refused_before_snakemake_reads_it(workdir, text, culprit):
    """Code in a YTE template never runs; a file that would exhaust memory or time is refused in one sentence."""
    (workdir / "config.yaml").write_bytes(text.encode("latin-1"))
    r = snakemake(workdir)
    assert_refused(r, "config.yaml: ")
    assert culprit in r.stderr and not (workdir / "pwned").exists()


def test_an_overlay_that_is_not_plain_values_is_refused_before_any_plan(workdir):
    """Snakemake reads an overlay on its command line; the workflow refuses it before planning, and
    `sidcore check-config` refuses it without evaluating it."""
    bomb = overlay(workdir, alias_bomb())
    assert_refused(snakemake(workdir, "--configfile", bomb), "overlay.yaml: its aliases expand to 4,412,961,516")
    yte = workdir / "yte.yaml"
    yte.write_text("__use_yte__: true\nevaluation:\n  runs: ?2 + 1\n")
    assert_refused(snakemake(workdir, "--configfile", str(yte)), "yte.yaml: __use_yte__ makes it a YTE template")
    for path, returncode, said in [(yte, 2, "YTE template"), (bomb, 2, "aliases expand"), ("config.yaml", 0, "plain")]:
        r = subprocess.run([sys.executable, "-m", "sidcore.cli", "check-config", str(path)], cwd=workdir,
                           capture_output=True, text=True)
        assert r.returncode == returncode and said in r.stdout + r.stderr, r.stderr


def test_a_dataset_block_copied_as_the_readme_says_plans(workdir):
    """README, "Add a dataset": copy a block, rename it, set its table, delete the anchors it defines."""
    config = (workdir / "config.yaml").read_text()
    block = re.search(r"\n  tiny:\n(?:    .*\n|\s*\n)*", config).group(0).rstrip() + "\n"
    copy = block.replace("\n  tiny:\n", "\n  tiny2:\n").replace("    table: tiny\n", "    table: tiny2\n")
    assert copy.count("tiny2") == 2
    (workdir / "config.yaml").write_text(config.replace(block, block + copy))
    r = snakemake(workdir, targets=("results/tables/tiny2.csv",))
    assert_refused(r, ": anchor &digits is defined again (first at line ")
    assert "give this one another name, or drop it and refer to the first as *digits" in r.stderr
    (workdir / "config.yaml").write_text(config.replace(block, block + copy.replace("&digits ", "")))
    r = snakemake(workdir, targets=("results/tables/tiny2.csv",))
    assert r.returncode == 0, r.stderr[-3000:]
    counts = job_counts(r.stdout + r.stderr)
    assert counts["distill"] == 5 and counts["tabulate"] == counts["prepare_data"] == 1


def test_duplicate_key_in_an_overlay_is_refused(workdir):
    r = snakemake(workdir, "--configfile", overlay(workdir, "evaluation: {runs: 2}\nevaluation: {runs: 3}\n"))
    assert_refused(r, "overlay.yaml, line 2, column 1: duplicate key 'evaluation'")


@pytest.mark.parametrize("target, known", [
    ("results/tables/edm3.csv", "table 'edm3' is not in config.yaml (known: afhq64-v2, cifar10-cond"),
    ("results/plots/cifar100.png", "dataset 'cifar100' is not in config.yaml (known: afhq64-v2"),
    ("results/tiny/sid/alpha1.5/eval/summary.json", "'sid/alpha1.5' is not in config.yaml (known:"),
    ("results/tiny/sida/alpha1.2/generator.pt", "'sida/alpha1.2' is not in config.yaml (known:"),
    ("results/edm2-xs/teacher/eval/summary.json", "'teacher' is not in config.yaml (known:"),
    ("results/tiny/ablation/sida/alpha0.5/log.jsonl", "ablation of datasets.tiny 'sida/alpha0.5' is not in config"),
    ("results/tiny/ablation/sid/alpha1.0/log.jsonl", "ablation of datasets.tiny 'sid/alpha1.0' is not in config.yaml"),
    ("results/plots/alpha-ablation-ffhq64.png", "datasets.ffhq64.ablation: no α ablation configured"),
    ("results/figures/tiny-sida-alpha1.2.png", "'sida/alpha1.2' is not in config.yaml (known:"),
    ("results/tiny/sdi/alpha1.0/generator.pt", "run of datasets.tiny 'sdi/alpha1.0' is not in config.yaml (known:"),
    ("results/tiny/sida/alphaX/eval/summary.json", "'sida/alphaX' is not in config.yaml (known:"),
    ("results/tiny/sid/alpha1/log.jsonl", "'sid/alpha1' is not in config.yaml (known:"),
    ("results/figures/tiny-dmd-alpha1.0.png", "'dmd/alpha1.0' is not in config.yaml (known:"),
    ("results/tiny/released/sdi/alpha1.2/eval/summary.json", "'released/sdi/alpha1.2' is not in config.yaml"),
    ("results/claims/cifar10-cond.csv", "datasets.cifar10-cond: the claims need ablation (of sida)"),
    ("results/claims/edm2-xs.csv", "datasets.edm2-xs: the claims need teacher_eval, ablation (of sida)"),
])
def test_a_target_config_yaml_does_not_define_fails_listing_the_known_ones(workdir, target, known):
    assert_refused(snakemake(workdir, targets=(target,)), known, kind="target error")
    assert not (workdir / target).exists()


def distill_commands(workdir: Path, *args: str) -> dict[str, str]:
    """The distill command of every job of the tiny table's dry run, by run folder."""
    r = subprocess.run([*SNAKEMAKE, "-n", "-p", "results/tables/tiny.csv", *args], cwd=workdir, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return dict((m.group(2), m.group(0)) for m in re.finditer(r"-- distill --settings '([^']*)'.*--outdir (\S+).*",
                                                               r.stdout + r.stderr))


def started(workdir: Path, folder: str, settings_json: str) -> None:
    """A run in ``folder`` started with ``settings_json``, with a training state (the plan looks for its file)."""
    from sidcore import run_record
    from sidcore.settings import from_json
    (workdir / folder).mkdir(parents=True)
    run_record.write(workdir / folder, from_json(settings_json, "distill"), {"teacher": "0" * 64}, None)
    (workdir / folder / "training-state.pt").write_bytes(b"")


def test_changed_settings_are_named_in_one_line_and_stop_the_plan_unless_the_user_chooses_to_start_over(workdir):
    folder = "results/tiny/sida/alpha1.0"
    commands = distill_commands(workdir)
    assert "--on-changed-settings stop" in commands[folder] and "--start-over" not in commands[folder]
    started(workdir, folder, re.search(r"--settings '([^']*)'", commands[folder]).group(1))
    assert distill_commands(workdir) == commands  # same settings: the plan says nothing
    config = (workdir / "config.yaml").read_text()
    sida = "sida: {alphas: [1.0], distill: {<<: *sida_edm}}"  # tiny's (tiny-claims' comes later)
    changed = config.replace(sida, sida.replace("}}", ", glr: 2.0e-4}}"), 1)
    assert changed != config, "the tiny SiDA block moved"
    (workdir / "config.yaml").write_text(changed)
    assert_refused(snakemake(workdir, targets=("results/tables/tiny.csv",)),
                   f"{folder} was started with other settings: distill.glr 0.0001 -> 0.0002. Restore them, or "
                   "train it again from image 0 with the earlier run kept aside: "
                   "--config on_changed_settings=start-over", kind="rerun error")
    r = snakemake(workdir, "--config", "on_changed_settings=start-over", targets=("results/tables/tiny.csv",))
    assert r.returncode == 0 and (f"{folder} was started with other settings: distill.glr 0.0001 -> 0.0002; it "
                                  "starts over from image 0") in r.stderr, r.stderr[-3000:]
    assert "--on-changed-settings start-over" in distill_commands(
        workdir, "--config", "on_changed_settings=start-over")[folder]


def test_a_forced_distillation_starts_over_once_per_plan(workdir):
    """--forcerun naming a run's generator passes that job, and only it, the plan's start-over id."""
    folder = "results/tiny/sida/alpha1.0"
    commands = distill_commands(workdir, "--forcerun", f"{folder}/generator.pt")
    assert [f for f, c in commands.items() if "--start-over" in c] == [folder]
    assert re.search(r"--start-over \d{8}T\d{6}-\d+ ", commands[folder])
    everything = distill_commands(workdir, "--forcerun", "distill")
    assert all("--start-over" in c for c in everything.values()) and len(everything) == 5


def test_every_sid2a_run_starts_from_the_configured_sid_generator(workdir):
    """As run_sid_sida.sh: CIFAR-10's SiD²A α = 1.0 and 1.2 both start from SiD α = 1.2 (ours, or the released)."""
    def sid2a_inits(*args: str) -> dict[str, str]:
        r = subprocess.run([*SNAKEMAKE, "-n", "results/tables/cifar10-uncond.csv", *args], cwd=workdir,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        jobs = re.findall(r"rule distill:\n    input: .*, (\S+)\n    output: \S+/sid2a/alpha([0-9.]+)/generator",
                          r.stdout + r.stderr)
        return {alpha: init for init, alpha in jobs}

    assert sid2a_inits() == {"1.0": "results/cifar10-uncond/sid/alpha1.2/generator.pt",
                             "1.2": "results/cifar10-uncond/sid/alpha1.2/generator.pt"}
    released = overlay(workdir, "datasets: {cifar10-uncond: {methods: {sid2a: {init: {from: released, alpha: 1.2}}}}}")
    assert sid2a_inits("--configfile", released) == {"1.0": "resources/generators/sid/cifar10-uncond-alpha1.2.pt",
                                                     "1.2": "resources/generators/sid/cifar10-uncond-alpha1.2.pt"}


def test_tiny_dag(workdir):
    r = snakemake(workdir, "-c1")
    assert r.returncode == 0, r.stderr[-3000:]
    counts = job_counts(r.stdout + r.stderr)
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())["datasets"]["tiny"]
    n_alphas = {m: len(spec["alphas"]) for m, spec in cfg["methods"].items()}
    assert counts["distill"] == sum(n_alphas.values())
    assert counts["evaluate_generator"] == counts["figure"] == sum(n_alphas.values())
    assert counts["evaluate_teacher"] == 1
    assert counts["summarize"] == sum(n_alphas.values()) + 1
    for rule in ("prepare_data", "train_teacher", "train_detector", "compute_reference", "tabulate", "plot"):
        assert counts[rule] == 1, rule
    assert not counts["distill_ablation"]  # the ablation is a target of its own


def test_cpu_rules_get_their_jobs_cores(workdir):
    """Snakemake sets OMP_NUM_THREADS to a rule's threads: a CPU rule's are its job's cpus_per_task."""
    r = subprocess.run([*SNAKEMAKE, "-n", "-c8", "resources/teachers/trained/tiny-claims.pt"], cwd=workdir,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    cores = yaml.safe_load((ROOT / "config.yaml").read_text())["datasets"]["tiny-claims"]["cluster"]["jobs"]["cpu"]
    assert cores["cpus_per_task"] > 1  # Snakemake prints threads above 1
    blocks = (r.stdout + r.stderr).split("rule ")
    teacher = next(b for b in blocks if b.startswith("train_teacher:"))
    assert f"threads: {cores['cpus_per_task']}" in teacher


@pytest.mark.parametrize("target, jobs", [
    # 5 α of SiDA and SiD²A; SiD²A starts from the SiD α = 1.2 run; the teacher is downloaded and converted.
    ("results/plots/alpha-ablation-cifar10-uncond.png",
     {"distill_ablation": 10, "distill": 1, "alpha_ablation": 1, "convert_teacher": 1}),
    # every run of the default tables (tiny's 5) and its benchmark
    ("results/tables/cost.csv", {"distill": 5, "cost": 1, "train_teacher": 1}),
    ("results/figures/cifar10-uncond-sid2a-alpha1.0.png", {"figure": 1, "distill": 2, "convert_teacher": 1}),
    # tiny-claims: 4 runs, 5 ablation runs, 5 evaluations (teacher included), the tables and plots
    ("results/claims/tiny-claims.csv", {"distill": 4, "distill_ablation": 5, "evaluate_generator": 4,
                                        "evaluate_teacher": 1, "summarize": 5, "alpha_ablation": 1, "plot": 1,
                                        "dynamics": 1, "claims": 1, "train_teacher": 1}),
])
def test_study_targets_plan_exactly_their_jobs(workdir, target, jobs):
    r = snakemake(workdir, "-c1", targets=(target,))
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    counts = job_counts(r.stdout + r.stderr)
    assert {rule: counts[rule] for rule in jobs} == jobs


@pytest.mark.parametrize("table, datasets", [
    ("edm2", ["edm2-xs", "edm2-s", "edm2-m", "edm2-l", "edm2-xl", "edm2-xxl"]),
    ("cifar10-uncond", ["cifar10-uncond"]),
    ("cifar10-cond", ["cifar10-cond"]),
    ("imagenet64", ["imagenet64-cond"]),
    ("ffhq64", ["ffhq64"]),
    ("afhq64-v2", ["afhq64-v2"]),
])
def test_paper_table_dags(workdir, table, datasets):
    r = subprocess.run([*SNAKEMAKE, "-n", f"results/tables/{table}.csv"], cwd=workdir, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())["datasets"]
    counts = job_counts(out)
    for d in datasets:
        for method, spec in cfg[d]["methods"].items():
            for alpha in spec["alphas"]:
                assert f"results/{d}/{method}/alpha{float(alpha)}/generator.pt" in out, (d, method, alpha)
                assert f"results/{d}/{method}/alpha{float(alpha)}/eval/summary.json" in out
        assert f"resources/data/{cfg[d]['data'].get('name', d)}.zip" in out
        for part in ("teacher", "reference", "detector"):
            assert f"resources/downloads/{cfg[d][part]['artifact']}" in out, (d, part)
    n_runs = sum(len(s["alphas"]) for d in datasets for s in cfg[d]["methods"].values())
    assert counts["evaluate_generator"] == n_runs
    assert counts["convert_teacher"] == len(datasets)
    assert counts["prepare_data"] + counts["encode_latents"] == len({cfg[d]["data"].get("name", d) for d in datasets})
    assert counts["tabulate"] == 1
    teachers = [d for d in datasets if "teacher_eval" in cfg[d]]  # the EDM teachers, at the papers' NFE
    assert counts["evaluate_teacher"] == len(teachers) and (table == "edm2") == (not teachers)


LOCAL_RULES = """
from pathlib import Path
from snakemake.api import SnakemakeApi
from snakemake.settings.types import ConfigSettings, OutputSettings, ResourceSettings, StorageSettings
with SnakemakeApi(OutputSettings(quiet=True)) as api:
    wf = api.workflow(resource_settings=ResourceSettings(), config_settings=ConfigSettings(),
                      storage_settings=StorageSettings(), snakefile=Path("Snakefile"))
    print(" ".join(sorted(wf._workflow._localrules)))  # rules marked `localrule: True`
"""


def test_edm2_prefetch_jobs_run_on_the_login_node(workdir):
    """Every artifact of the EDM2 table is downloaded by a local (login-node) job before compute starts."""
    r = subprocess.run([*SNAKEMAKE, "-n", "results/tables/edm2.csv"], cwd=workdir, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    downloads = set(re.findall(r"output: resources/downloads/(\S+)", r.stdout + r.stderr))
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    teachers = {cfg["datasets"][f"edm2-{s}"]["teacher"]["artifact"] for s in ("xs", "s", "m", "l", "xl", "xxl")}
    assert downloads == teachers | {
        "refs/img512", cfg["datasets"]["edm2-xs"]["detector"]["artifact"], cfg["evaluation"]["fd_dinov2_detector"],
        "vae/sd-vae-ft-mse/config.json", "vae/sd-vae-ft-mse/diffusion_pytorch_model.safetensors"}
    assert job_counts(r.stdout + r.stderr)["download"] == len(downloads)
    local = subprocess.run([sys.executable, "-c", LOCAL_RULES], cwd=workdir, capture_output=True, text=True,
                           timeout=300)
    assert local.returncode == 0, local.stderr[-3000:]
    local_rules = set(local.stdout.split())
    # Local: downloads, and the GPU stages, which only wait for the job `sidcore launch` submits.
    assert {"download", "distill", "distill_ablation", "evaluate_generator", "evaluate_teacher", "evaluate_released",
            "encode_latents", "figure"} <= local_rules
    assert not local_rules & {"prepare_data", "convert_teacher", "convert_generator"}  # CPU jobs, sent to SLURM


STUB = f"#!{sys.executable}\n" + """\
# Stands in for sidcore: creates the files a command was asked to write (a real zip for prepared data).
import sys
from pathlib import Path
import numpy as np
from sidcore.dataset import write_image_zip
args = sys.argv[1:]
if args[0] == "--log":  # the rule's log
    Path(args[1]).write_text("stub")
    args = args[2:]
if args[0] == "launch":  # a GPU stage: the command after `--`
    args = args[args.index("--") + 1:]
outs = [args[i + 1] for i, a in enumerate(args) if a == "--out"]
for i, a in enumerate(args):
    if a == "--outdir":
        names = [f"run{r}.json" for r in range(10)] if args[0] == "evaluate" else ["generator.pt", "log.jsonl"]
        outs += [args[i + 1] + "/" + name for name in names]
extra = {".csv": ".md", ".png": ".pdf"}
for out in outs:
    p = Path(out)
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.suffix == ".zip":
        write_image_zip(p, np.zeros((10, 1, 8, 8), np.uint8), np.arange(10))
        continue
    for q in (p, p.with_suffix(extra.get(p.suffix, p.suffix))):
        q.write_text("stub")
"""


def with_stub(workdir: Path) -> dict:
    """An environment whose `sidcore` is the stub (in ``workdir/bin``)."""
    stub = workdir / "bin" / "sidcore"
    stub.parent.mkdir()
    stub.write_text(STUB)
    stub.chmod(0o755)
    return {**os.environ, "PATH": f"{stub.parent}{os.pathsep}{os.environ['PATH']}"}


def test_a_job_that_reads_a_damaged_input_names_it_the_rule_that_made_it_and_the_command(workdir):
    """The stub makes placeholder networks; the real figure command then reads one and refuses it."""
    env = with_stub(workdir)
    made = subprocess.run([*SNAKEMAKE, "-c2", "results/tiny/sid/alpha1.0/generator.pt"], cwd=workdir,
                          capture_output=True, text=True, timeout=600, env=env)
    assert made.returncode == 0, made.stderr[-3000:]
    r = subprocess.run([*SNAKEMAKE, "-c1", "results/figures/tiny-sid-alpha1.0.png"], cwd=workdir,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode != 0
    said = re.findall(r"damaged input: .*", r.stderr)
    assert said and said[0] in (
        "damaged input: results/tiny/sid/alpha1.0/generator.pt (made by the distill rule); make it again with "
        "snakemake results/tiny/sid/alpha1.0/generator.pt --forcerun results/tiny/sid/alpha1.0/generator.pt (and "
        "your other options)",
        "damaged input: resources/teachers/trained/tiny.pt (made by the train_teacher rule); make it again with "
        "snakemake resources/teachers/trained/tiny.pt --forcerun resources/teachers/trained/tiny.pt (and your "
        "other options)"), r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]


def copy_repository(dest: Path) -> Path:
    """The files a fresh clone has at its root that Snakemake reads."""
    for name in ("Snakefile", "config.yaml"):
        shutil.copy(ROOT / name, dest / name)
    for name in ("workflow", "envs", "profiles", "slurm"):
        shutil.copytree(ROOT / name, dest / name)
    return with_local_data(dest)


def test_slurm_profile_plans_the_edm2_table_with_gpu_resources(tmp_path):
    """`snakemake --profile slurm -n results/tables/edm2.csv`, typed at the repository root."""
    work = copy_repository(tmp_path)
    r = subprocess.run([*SNAKEMAKE, "--profile", "slurm", "-n", "-p", "results/tables/edm2.csv"], cwd=work,
                       capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "Using profiles slurm and workflow specific profile profiles/default" in out
    blocks = out.split("\n\n")
    distill = [b for b in blocks if "rule distill:" in b]
    assert len(distill) == 18  # 6 sizes × SiD, SiDA, SiD²A
    for b in distill:  # Table 8's node of 8 GPUs, the GPU partition, and a SLURM job through the launcher
        assert "nodes=1, gpus_per_node=8" in b and "slurm_partition=gpu" in b, b
        assert " launch --executor slurm" in b and "--gpus-per-node 8" in b, b
    xxl = next(b for b in distill if "edm2-xxl/sida/" in b)
    assert "--name distill-edm2-xxl-sida-1.0 " in xxl and "--logdir logs/jobs/distill-edm2-xxl-sida-1.0 " in xxl


def test_default_profile_runs_gpu_stages_as_local_processes(tmp_path):
    work = copy_repository(tmp_path)
    r = subprocess.run([*SNAKEMAKE, "-n", "-p", "results/tables/tiny.csv"], cwd=work, capture_output=True, text=True,
                       timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "Using workflow specific profile profiles/default" in out
    assert " launch --executor local" in out and "--executor slurm" not in out
    # Locally a GPU stage takes the cores of all its threads: 2 processes × 1 (distill), 1 process × 1 (evaluate)
    blocks = out.split("\n\n")
    distill, evaluate = (next(b for b in blocks if f"rule {rule}:" in b) for rule in ("distill", "evaluate_teacher"))
    assert "threads: 2" in distill and "threads:" not in evaluate, evaluate  # Snakemake prints threads above 1


def test_new_alpha_adds_only_its_jobs(workdir):
    """With every output made, a new SiD alpha adds its distillation and evaluations and re-tabulates."""
    env = with_stub(workdir)
    target = "results/tables/tiny.csv"
    r = subprocess.run([*SNAKEMAKE, "-c2", target], cwd=workdir, capture_output=True, text=True, timeout=600,
                       env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    r = snakemake(workdir, "-c1", target)
    assert "Nothing to be done" in r.stdout + r.stderr, (r.stdout + r.stderr)[-3000:]

    config = (workdir / "config.yaml").read_text()
    new = re.sub(r"(\n      sid: \{alphas: \[)([^\]]*)\]", r"\1\2, 1.5]", config)
    assert new != config
    (workdir / "config.yaml").write_text(new)
    r = snakemake(workdir, "-c1", target)
    assert r.returncode == 0, r.stderr[-3000:]
    counts = job_counts(r.stdout + r.stderr)
    assert dict(counts) == {"distill": 1, "evaluate_generator": 1, "summarize": 1, "tabulate": 1}

    # A distillation hyper-parameter reruns the distillations and what depends on them, not the data,
    # the teacher, the reference statistics or the teacher's evaluation.
    new = config.replace("      lr: 1.0e-4\n", "      lr: 2.0e-4\n", 1)  # tiny's (tiny-claims' comes later)
    assert new.count("lr: 2.0e-4") == 1
    (workdir / "config.yaml").write_text(new)
    r = snakemake(workdir, "-c1", target)
    assert r.returncode == 0, r.stderr[-3000:]
    counts = job_counts(r.stdout + r.stderr)
    assert set(counts) == {"distill", "evaluate_generator", "summarize", "tabulate"}, counts
    assert counts["evaluate_generator"] == counts["distill"]


def test_the_released_switch_adds_exactly_the_released_generators_evaluations(workdir):
    """evaluation.released: true adds, per released generator, its download, conversion, evaluation, summary."""
    def dry_run(*args: str) -> Counter:
        r = subprocess.run([*SNAKEMAKE, "-n", "results/tables/cifar10-uncond.csv", *args], cwd=workdir,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        return job_counts(r.stdout + r.stderr)

    off = dry_run()
    on = dry_run("--configfile", overlay(workdir, "evaluation: {released: true}"))
    released = yaml.safe_load((ROOT / "config.yaml").read_text())["datasets"]["cifar10-uncond"]["released"]
    n = sum(len(by_alpha) for by_alpha in released.values())
    assert n == 4 and off["evaluate_released"] == 0
    assert on - off == Counter(evaluate_released=n, convert_generator=n, download=n, summarize=n)


def test_only_evaluations_read_the_precision_recall_batch_and_dinov2(workdir):
    """ImageNet 64's evaluations get OpenAI's reference batch, EDM2's get DINOv2; distillations neither."""
    r = subprocess.run([*SNAKEMAKE, "-n", "-p", "results/tables/imagenet64.csv", "results/tables/edm2.csv"],
                       cwd=workdir, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    commands = [line for line in r.stdout.splitlines() if " launch --executor" in line and " -- " in line]
    evaluations = [c for c in commands if " evaluate " in c]
    distillations = [c for c in commands if " distill " in c]
    assert len(evaluations) == 6 + 18 and len(distillations) == 5 + 18  # ImageNet's teacher is evaluated too
    virtual = "--pr-reference resources/downloads/refs/VIRTUAL_imagenet64_labeled"
    assert sum(virtual in c for c in evaluations) == 6
    assert sum("--dinov2-weights resources/downloads/detector/dinov2-vitl14" in c for c in evaluations) == 18
    assert not any("--pr-reference" in c or "--dinov2-weights" in c for c in distillations)
