# Paths and settings shared by the rules. The layout:
#   resources/data/{data}.zip                         training images or latents (EDM zip layout); {data} is
#                                                     data.name, shared by datasets with the same data
#   resources/downloads/{group}/{name}                downloaded artifacts, by registry key
#   resources/teachers/{name}.pt, resources/generators/{family}/{name}.pt   converted networks
#   resources/teachers/trained/, resources/refs/computed/, resources/detectors/trained/   made here
#   results/{dataset}/{method}/alpha{alpha}/          one distillation run (generator.pt, log.jsonl)
#   results/{dataset}/{method}/alpha{alpha}/eval/     run{r}.json per evaluation run, summary.json
#   results/{dataset}/ablation/{method}/alpha{alpha}/ one run of the α ablation (config `ablation`)
#   results/{dataset}/teacher/eval/                   the teacher's evaluation (where configured)
#   results/{dataset}/released/{method}/alpha{alpha}/eval/   a released generator's evaluation (evaluation.released)
#   results/tables/{table}.csv|md, results/plots/{dataset}.png|pdf
#   logs/jobs/{job}/                                  a GPU stage's job ids (jobs.txt) and per-task logs
#
# GPU stages (distill, evaluate, VAE encoding) are local rules that call `sidcore launch`, which runs the
# stage as local processes or as one SLURM job (config.yaml `launcher`) and waits for it; the other rules
# are CPU jobs, sent to SLURM by Snakemake's executor under the slurm profile.
import functools
import os
import re
import shlex
import sys
import time
from types import SimpleNamespace

from sidcore.registry import artifacts
from sidcore import plan, preflight, run_record, tensorboard
from sidcore.errors import UserError
from sidcore.methods import METHOD_NAMES, METHODS, alpha_text
from sidcore.tables import TABLES, table as report_table
from sidcore.settings import (
    STUDIES,
    cluster_job,
    dumps,
    for_stage,
    generator_settings,
    network_settings,
    resolve,
    sampling,
)

DATASETS = config["datasets"]
# The software of every rule: the environment `make install` builds (`conda env create -f envs/sidcore.yaml`).
SOFTWARE_ENV = "../../envs/sidcore.yaml"
METHOD_PATTERN = "|".join(METHODS)
ARTIFACT_GROUPS = sorted({key.split("/", 1)[0] for key in artifacts()})


wildcard_constraints:
    dataset="[a-z0-9][a-z0-9_.-]*",
    data="[a-z0-9][a-z0-9_.-]*",
    method="[a-z0-9]+",  # any name: an unknown method or alpha is a target error (check_target), not a missing rule
    alpha="[^/]+",
    run=r"[0-9]+",
    name="[^/]+",


def check_config() -> None:
    """Checks the schema cannot express, and every check a distillation or evaluation job would make of its
    settings (sidcore.preflight and sidcore.tensorboard, the code the jobs run). Each error names the config key."""
    if tensorboard.enabled(config):
        tensorboard.require()
    preflight.check_config(config)
    for t in config["tables"]:
        if t not in known_tables():
            raise UserError(f"tables: {t!r} is the table of no dataset (known: {sorted(known_tables())})")
    for name, d in DATASETS.items():
        first = dataset_of_data(data_name(name))
        if DATASETS[first]["data"] != d["data"]:
            raise UserError(
                f"datasets.{name}.data: name {data_name(name)!r} is also used by datasets.{first} "
                "with different settings; give one of them another data.name"
            )
        if {"precision", "recall"} & set(d["metrics"]) and "pr_reference" not in d:
            raise UserError(f"datasets.{name}.pr_reference: precision/recall need a reference batch of real images")
        if d["data"]["source"] == "vae-latents" and "latent" not in d:
            raise UserError(f"datasets.{name}.latent: data.source vae-latents needs the VAE (latent.vae)")
        for key in artifact_keys(name):
            if key not in artifacts():
                raise UserError(f"datasets.{name}: unknown artifact key {key!r} (see sidcore/data/artifacts.yaml)")
        preflight.check_evaluation(resolve(config, name))
        job = cluster_job(config, name, "distill")
        for study in STUDIES:
            for method, alpha in runs(name, study):
                settings = resolve(config, name, method, alpha, study)
                preflight.check_distill(settings, job["nodes"] * job["gpus_per_node"])
                preflight.check_schedule(settings)
        job = cluster_job(config, name, "encode")
        if job["nodes"] * job["gpus_per_node"] != 1:
            raise UserError(
                f"datasets.{name}.cluster.jobs.encode: this stage runs as one process; "
                "set nodes and gpus_per_node to 1"
            )


@functools.cache
def warn_once(message) -> None:
    """Print a warning of the plan once (input functions run more than once per job)."""
    print(message, file=sys.stderr)


# A sidcore command's refusal of an input file that is not what was written (its message starts so).
DAMAGED_INPUT = re.compile(r"sidcore [a-z-]+: error: (\S+): (?:not a readable|its content is not what was written)")


def explain_failure(logs) -> None:
    """After a failed run (``onerror``, given Snakemake's log files): for each input a job found damaged, the
    rule that makes it and the command that makes it again."""

    def read(path) -> str:
        try:
            return open(path, errors="replace").read()
        except OSError:
            return ""

    text = "".join(read(log) for log in ([logs] if isinstance(logs, str) else logs))
    text += "".join(read(job_log) for job_log in re.findall(r"log: (\S+) \(check log file", text))  # failed jobs'
    for path in dict.fromkeys(DAMAGED_INPUT.findall(text)):
        makers = [r.name for r in workflow.rules if r.is_producer(path)]
        if makers:
            print(
                f"damaged input: {path} (made by the {makers[0]} rule); make it again with snakemake "
                f"{shlex.quote(path)} --forcerun {shlex.quote(path)} (and your other options)",
                file=sys.stderr,
            )


def known_tables() -> set[str]:
    tables = {d["table"] for d in DATASETS.values()}
    return tables | {t.name for t in TABLES.values() if t.source in tables}


def refuse_target(message) -> None:
    """End the plan with one line naming what the target asks for that config.yaml does not have."""
    sys.exit(f"target error: {message}")


def check_target(w, study="main") -> None:
    """A target's table, dataset, method and alpha must be config.yaml's (in ``study``: the configured runs or
    the α ablation): Snakemake would otherwise make an empty table or a run nobody configured. Called by the
    input functions of the rules with these wildcards."""

    def refuse(what, value, known):
        refuse_target(f"{what} {value!r} is not in config.yaml (known: {', '.join(sorted(known)) or 'none'})")

    if "table" in w.keys() and w.table not in known_tables():
        refuse("table", w.table, known_tables())
    if "dataset" in w.keys() and w.dataset not in DATASETS:
        refuse("dataset", w.dataset, DATASETS)
    model = w.get("model") or (f"{w.method}/alpha{w.alpha}" if "method" in w.keys() else None)
    if model is not None:
        known = [f"{m}/alpha{a}" for m, a in runs(w.dataset, study)]
        if study == "main":
            known += [
                f"released/{m}/alpha{a}"
                for m in DATASETS[w.dataset].get("released", {})
                for a in released_keys(w.dataset, m)
            ]
            known += ["teacher"] if "teacher_eval" in DATASETS[w.dataset] else []
        if model not in known:
            refuse(f"{'ablation' if study == 'ablation' else 'run'} of datasets.{w.dataset}", model, known)


RUNS = expand("run{run}.json", run=range(config["evaluation"]["runs"]))  # the records of one evaluation


def run_records(w):
    """The evaluation records a summary of ``{dataset}/{model}`` reads."""
    check_target(w)
    return [f"results/{w.dataset}/{w.model}/eval/{r}" for r in RUNS]


def job_dataset(w) -> str:
    """The dataset a job belongs to (an encoding job is named by its data)."""
    return w.dataset if "dataset" in w.keys() else dataset_of_data(w.data)


def job_name(stage, w, study="main") -> str:
    return "-".join([stage, *([study] if study != "main" else []), *map(str, w)])


def gpu_job(stage, w, single=False) -> dict:
    """A GPU stage's job for ``w``'s dataset; ``single``: one process on one GPU, with the stage's other settings."""
    job = cluster_job(config, job_dataset(w), stage)
    return {**job, "nodes": 1, "gpus_per_node": 1} if single else job


def gpu_resources(stage, single=False, study="main"):
    """What a GPU stage's job asks for, shown in the plan (`snakemake -n`), and ``launch``: the command that
    runs it as a job with these resources (before ``-- COMMAND ...``), logging to logs/jobs/<job name>.
    Resources, unlike params, do not make Snakemake rerun a finished job when they change."""

    def get(key):
        return lambda w: gpu_job(stage, w, single)[key]

    def launch(w):
        job, name = gpu_job(stage, w, single), job_name(stage, w, study)
        return (
            f"launch {LAUNCH_FLAGS} --name {name} --nodes {job['nodes']}"
            f" --gpus-per-node {job['gpus_per_node']} --cpus-per-task {job['cpus_per_task']}"
            f" --mem-mb {int(job['mem_gb'] * 1024)} --time-min {job['time_min']}"
            f" --partition {shlex.quote(job['partition'])}"
            f" --logdir logs/jobs/{name}"
        )

    return {
        "nodes": get("nodes"),
        "gpus_per_node": get("gpus_per_node"),
        "cpus_per_task": get("cpus_per_task"),
        "mem_mb": lambda w: int(get("mem_gb")(w) * 1024),
        "runtime": get("time_min"),
        "slurm_partition": get("partition"),
        "launch": launch,
    }


# This plan's id: a distillation it forces starts over once; its requeued or relaunched job continues.
PLAN_ID = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"


def forced(rule_name, outputs) -> bool:
    """Whether this invocation forces the job of rule ``rule_name`` making ``outputs`` (-F, -f on a target, --forcerun
    naming the rule or one of the outputs)."""
    d = workflow.dag_settings
    named = {os.path.normpath(str(t)) for t in d.forcerun}
    targets = {os.path.normpath(str(t)) for t in d.targets} if d.forcetargets else set()
    return d.forceall or any(
        rule_name in names or any(os.path.normpath(o) in names for o in outputs) for names in (named, targets)
    )


def rerun_flags(rule_name, study="main"):
    """The distill command's flags for what a run already in its folder becomes (``sidcore.run_record``): a
    forced job starts it over (once per plan), a run started with other settings follows
    ``on_changed_settings``. A resource, so the flags rerun nothing themselves."""

    def flags(w) -> str:
        folder = run_dir(w.dataset, w.method, w.alpha, study)
        force = forced(rule_name, [f"{folder}/generator.pt", f"{folder}/log.jsonl"])
        return (f"--start-over {PLAN_ID} " if force else "") + f"--on-changed-settings {config['on_changed_settings']}"

    return flags


def check_rerun(w, study) -> None:
    """Name a run whose training state was started with other settings than config.yaml's, one line per run
    with every change; with ``on_changed_settings: stop`` end the plan there, before any job."""
    folder = run_dir(w.dataset, w.method, w.alpha, study)
    changed = run_record.settings_changes(folder, resolve(config, w.dataset, w.method, w.alpha, study))
    if not changed:
        return
    if config["on_changed_settings"] == "stop":
        sys.exit(
            f"rerun error: {folder} was started with other settings: {', '.join(changed)}. Restore them, or train "
            "it again from image 0 with the earlier run kept aside: --config on_changed_settings=start-over"
        )
    warn_once(
        f"{folder} was started with other settings: {', '.join(changed)}; it starts over from image 0, "
        f"the earlier run kept aside as {folder}.kept-<time>-..."
    )


def logging_flags(w) -> str:
    """The distill command's `--tensorboard` where config.yaml's logging.tensorboard asks for event files. A
    resource, not a param: switching it changes what a run records, not what it computes, and reruns no
    finished distillation (a run under way records from its next start)."""
    return "--tensorboard" if tensorboard.enabled(config) else ""


def launch_flags() -> str:
    """The launcher's flags common to every GPU stage (see `sidcore launch --help`)."""
    c = config["cluster"]
    optional = "".join(f" --{key} {shlex.quote(c[key])}" for key in ("account", "qos") if c[key])
    return (
        f"--executor {config['launcher']} --signal-delay-s {c['signal_delay_s']}"
        f" --max-requeues {c['max_requeues']}{optional}"
    )


def launch_threads(stage, single=False):
    """Cores a GPU stage takes where Snakemake runs: with the local launcher, every thread of every process
    of its job (processes × cpus_per_task); with SLURM, one (it only waits)."""

    def threads(w):
        job = gpu_job(stage, w, single)
        processes = job["nodes"] * max(job["gpus_per_node"], 1)
        return processes * job["cpus_per_task"] if config["launcher"] == "local" else 1

    return threads


def cpu_job(w) -> dict:
    """A CPU rule's job: `cluster.jobs.cpu`, with the overrides of the dataset it belongs to."""
    if "dataset" in w.keys() or "data" in w.keys():
        return cluster_job(config, job_dataset(w), "cpu")
    return {**config["cluster"]["jobs"]["cpu"], "partition": config["cluster"]["cpu_partition"]}


def cpu_threads(w) -> int:
    """A CPU rule's threads: its job's cpus_per_task. Snakemake sets OMP_NUM_THREADS (and the like) to a rule's
    threads, 1 unless given; here it caps them at --cores."""
    return cpu_job(w)["cpus_per_task"]


def cpu_resources():
    """SLURM resources of the CPU rules (Snakemake's executor submits them under the slurm profile);
    a dataset's `cluster.jobs.cpu` applies to the rules of that dataset."""
    c = config["cluster"]
    out = {
        "cpus_per_task": cpu_threads,
        "mem_mb": lambda w: int(cpu_job(w)["mem_gb"] * 1024),
        "runtime": lambda w: cpu_job(w)["time_min"],
        "slurm_partition": lambda w: cpu_job(w)["partition"],
    }
    if c["account"]:
        out["slurm_account"] = c["account"]
    if c["qos"]:
        out["slurm_extra"] = f"'--qos={c['qos']}'"  # the schema's alphabet for qos holds no quote
    return out


def settings(dataset, method=None, alpha=None, stage=None, study="main") -> str:
    """The job's resolved settings as JSON (a param, so Snakemake reruns a job whose settings change);
    with ``stage``, only the part that stage reads."""
    resolved = resolve(config, dataset, method, alpha, study)
    return dumps(for_stage(resolved, stage) if stage else resolved)


def sampling_json(key) -> str:
    """How the released generator ``key`` samples (recorded in its converted snapshot)."""
    return dumps(sampling(resolve(config, dataset_using(key))))


def network_json(key, generator=False) -> str:
    """Constructor settings (config.yaml's) of the network a downloaded teacher / generator is converted to."""
    network = network_settings(resolve(config, dataset_using(key)))
    return dumps(generator_settings(network) if generator else network)


def runs(dataset, study="main"):
    """(method, alpha) of every distillation run configured for ``dataset`` (``study`` main), or of its α
    ablation (``study`` ablation)."""
    if study == "ablation":
        ablation = DATASETS[dataset].get("ablation", {"methods": []})
        return [(m, alpha_text(a)) for m in ablation["methods"] for a in ablation["alphas"]]
    return [(m, alpha_text(a)) for m, spec in DATASETS[dataset]["methods"].items() for a in spec["alphas"]]


def released_keys(dataset, method) -> dict:
    """{alpha: registry key} of the released generators of ``dataset`` by ``method``."""
    return {alpha_text(a): key for a, key in DATASETS[dataset].get("released", {}).get(method, {}).items()}


def released_runs(dataset):
    """(method, alpha) of the released generators evaluated for ``dataset`` (config evaluation.released)."""
    if not resolve(config, dataset)["evaluation"].released:
        return []
    return [(m, a) for m in DATASETS[dataset].get("released", {}) for a in released_keys(dataset, m)]


def released_file(w):
    return f"resources/generators/{released_keys(w.dataset, w.method)[w.alpha]}.pt"


def datasets_of_tables(tables):
    wanted = {report_table(t).summaries_of for t in tables}
    return [name for name, d in DATASETS.items() if d["table"] in wanted]


def run_dir(dataset, method, alpha, study="main") -> str:
    return f"results/{dataset}/{'ablation/' if study == 'ablation' else ''}{method}/alpha{alpha}"


def artifact_file(key: str) -> str:
    """Where the download rule puts a registry artifact."""
    return f"resources/downloads/{key}"


def artifact_dir_files(prefix: str) -> list[str]:
    """The files of a directory artifact (e.g. ``vae/sd-vae-ft-mse``): every registry key under it."""
    return [artifact_file(k) for k in artifacts_under(prefix)]


def artifacts_under(prefix: str) -> list[str]:
    """Registry keys of the files of directory artifact ``prefix``."""
    return [k for k in artifacts() if k.startswith(f"{prefix}/")]


def artifact_keys(dataset) -> list[str]:
    """Registry keys a dataset's configuration names (checked by check_config)."""
    d = DATASETS[dataset]
    keys = [
        d[part]["artifact"]
        for part in ("data", "teacher", "reference", "detector", "pr_reference")
        if "artifact" in d.get(part, {})
    ]
    if "latent" in d:
        vae = d["latent"]["vae"]
        keys += artifacts_under(vae) or [vae]
    if "fd_dinov2" in d["metrics"]:
        keys.append(config["evaluation"]["fd_dinov2_detector"])
    keys += [key for method in d.get("released", {}) for key in released_keys(dataset, method).values()]
    return keys


def dataset_using(key) -> str:
    """The first dataset whose configuration names registry artifact ``key`` (its network settings apply)."""
    for dataset in DATASETS:
        if key in artifact_keys(dataset):
            return dataset
    raise ValueError(f"no dataset in config.yaml uses artifact {key!r}")


def data_name(dataset) -> str:
    return DATASETS[dataset]["data"].get("name", dataset)


def dataset_of_data(name) -> str:
    """The first dataset whose prepared data file is resources/data/{name}.zip."""
    for dataset in DATASETS:
        if data_name(dataset) == name:
            return dataset
    raise ValueError(f"no dataset in config.yaml has data name {name!r}")


with config_file.exit_on_user_error("config error"):
    check_config()
LAUNCH_FLAGS = launch_flags()
LATENT_DATA = "|".join(data_name(n) for n, d in DATASETS.items() if d["data"]["source"] == "vae-latents") or "(?!)"
