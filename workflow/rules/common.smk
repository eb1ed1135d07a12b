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

from sidcore.registry import artifacts
from sidcore.report.tabulate import SUMMARY_TABLE as TABLE_SOURCES  # tables made from another table's runs
from sidcore import preflight
from sidcore.settings import (METHODS, STUDIES, alpha_key, cluster_job, dumps, for_stage, generator_settings, network_settings,
                              resolve)

DATASETS = config["datasets"]
ARTIFACT_GROUPS = sorted({key.split("/", 1)[0] for key in artifacts()})


wildcard_constraints:
    dataset="[a-z0-9][a-z0-9_.-]*",
    data="[a-z0-9][a-z0-9_.-]*",
    method="|".join(METHODS),
    alpha=r"[0-9]+\.[0-9]+",
    run=r"[0-9]+",
    name="[^/]+",


def check_config() -> None:
    """Checks the schema cannot express, and every check a distillation or evaluation job would make of its
    settings (sidcore.preflight, the code the jobs run). Each error names the config key."""
    preflight.check_config(config)
    for t in config["tables"]:
        if t not in known_tables():
            raise ValueError(f"tables: {t!r} is the table of no dataset (known: {sorted(known_tables())})")
    for name, d in DATASETS.items():
        first = dataset_of_data(data_name(name))
        if DATASETS[first]["data"] != d["data"]:
            raise ValueError(f"datasets.{name}.data: name {data_name(name)!r} is also used by datasets.{first} "
                             "with different settings; give one of them another data.name")
        if {"precision", "recall"} & set(d["metrics"]) and "pr_reference" not in d:
            raise ValueError(f"datasets.{name}.pr_reference: precision/recall need a reference batch of real images")
        if d["data"]["source"] == "vae-latents" and "latent" not in d:
            raise ValueError(f"datasets.{name}.latent: data.source vae-latents needs the VAE (latent.vae)")
        for key in artifact_keys(name):
            if key not in artifacts():
                raise ValueError(f"datasets.{name}: unknown artifact key {key!r} (see sidcore/data/artifacts.yaml)")
        preflight.check_evaluation(resolve(config, name))
        job = cluster_job(config, name, "distill")
        for study in STUDIES:
            for method, alpha in runs(name, study):
                preflight.check_distill(resolve(config, name, method, alpha, study),
                                        job["nodes"] * job["gpus_per_node"])
        job = cluster_job(config, name, "encode")
        if job["nodes"] * job["gpus_per_node"] != 1:
            raise ValueError(f"datasets.{name}.cluster.jobs.encode: this stage runs as one process; "
                             "set nodes and gpus_per_node to 1")


def known_tables() -> set[str]:
    tables = {d["table"] for d in DATASETS.values()}
    return tables | {alias for alias, source in TABLE_SOURCES.items() if source in tables}


def check_target(w, study="main") -> None:
    """A target's table, dataset, method and alpha must be config.yaml's (in ``study``: the configured runs or
    the α ablation): Snakemake would otherwise make an empty table or a run nobody configured. Called by the
    input functions of the rules with these wildcards."""
    def refuse(what, value, known):
        raise ValueError(f"{what} {value!r} is not in config.yaml (known: {', '.join(sorted(known)) or 'none'})")

    if "table" in w.keys() and w.table not in known_tables():
        refuse("table", w.table, known_tables())
    if "dataset" in w.keys() and w.dataset not in DATASETS:
        refuse("dataset", w.dataset, DATASETS)
    model = w.get("model") or (f"{w.method}/alpha{w.alpha}" if "method" in w.keys() else None)
    if model is not None:
        known = [f"{m}/alpha{a}" for m, a in runs(w.dataset, study)]
        if study == "main":
            known += [f"released/{m}/alpha{a}" for m in DATASETS[w.dataset].get("released", {})
                      for a in released_keys(w.dataset, m)]
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


def launch_params(stage, study="main"):
    """A GPU stage's job name and the folder of its job ids and per-task logs."""
    return {"jobname": lambda w: job_name(stage, w, study),
            "jobdir": lambda w: f"logs/jobs/{job_name(stage, w, study)}"}


def gpu_job(stage, w, single=False) -> dict:
    """A GPU stage's job for ``w``'s dataset; ``single``: one process on one GPU, with the stage's other settings."""
    job = cluster_job(config, job_dataset(w), stage)
    return {**job, "nodes": 1, "gpus_per_node": 1} if single else job


def gpu_resources(stage, single=False):
    """What a GPU stage's job asks for: shown in the plan (`snakemake -n`) and passed to the launcher.
    Resources, unlike params, do not make Snakemake rerun a finished job when they change."""
    def get(key):
        return lambda w: gpu_job(stage, w, single)[key]

    return {"nodes": get("nodes"), "gpus_per_node": get("gpus_per_node"), "cpus_per_task": get("cpus_per_task"),
            "mem_mb": lambda w: int(get("mem_gb")(w) * 1024), "runtime": get("time_min"),
            "slurm_partition": get("partition")}


def launch_flags() -> str:
    """The launcher's flags common to every GPU stage (see `sidcore launch --help`)."""
    c = config["cluster"]
    flags = f"--executor {config['launcher']} --signal-delay-s {c['signal_delay_s']} --max-requeues {c['max_requeues']}"
    return flags + "".join(f" --{key} {c[key]}" for key in ("account", "qos") if c[key])


# The launch command of a GPU stage's rule, before `-- COMMAND ...`.
LAUNCH = ("sidcore launch {LAUNCH_FLAGS} --name {params.jobname} --nodes {resources.nodes}"
          " --gpus-per-node {resources.gpus_per_node} --cpus-per-task {resources.cpus_per_task}"
          " --mem-mb {resources.mem_mb} --time-min {resources.runtime} --partition {resources.slurm_partition}"
          " --logdir {params.jobdir}")


def launch_threads(stage, single=False):
    """Cores a GPU stage takes where Snakemake runs: with the local launcher, every thread of every process
    of its job (processes × cpus_per_task); with SLURM, one (it only waits)."""
    def threads(w):
        job = gpu_job(stage, w, single)
        processes = job["nodes"] * max(job["gpus_per_node"], 1)
        return processes * job["cpus_per_task"] if config["launcher"] == "local" else 1

    return threads


def cpu_resources():
    """SLURM resources of the CPU rules (Snakemake's executor submits them under the slurm profile);
    a dataset's `cluster.jobs.cpu` applies to the rules of that dataset."""
    def job(w):
        if "dataset" in w.keys() or "data" in w.keys():
            return cluster_job(config, job_dataset(w), "cpu")
        return {**config["cluster"]["jobs"]["cpu"], "partition": config["cluster"]["cpu_partition"]}

    c = config["cluster"]
    out = {"cpus_per_task": lambda w: job(w)["cpus_per_task"], "mem_mb": lambda w: int(job(w)["mem_gb"] * 1024),
           "runtime": lambda w: job(w)["time_min"], "slurm_partition": lambda w: job(w)["partition"]}
    if c["account"]:
        out["slurm_account"] = c["account"]
    if c["qos"]:
        out["slurm_extra"] = f"'--qos={c['qos']}'"
    return out


def settings(dataset, method=None, alpha=None, stage=None, study="main") -> str:
    """The job's resolved settings as JSON (a param, so Snakemake reruns a job whose settings change);
    with ``stage``, only the part that stage reads."""
    resolved = resolve(config, dataset, method, alpha, study)
    return dumps(for_stage(resolved, stage) if stage else resolved)


def network_json(key, generator=False) -> str:
    """Constructor settings (config.yaml's) of the network a downloaded teacher / generator is converted to."""
    network = network_settings(resolve(config, dataset_using(key)))
    return dumps(generator_settings(network) if generator else network)


def runs(dataset, study="main"):
    """(method, alpha) of every distillation run configured for ``dataset`` (``study`` main), or of its α
    ablation (``study`` ablation)."""
    if study == "ablation":
        ablation = DATASETS[dataset].get("ablation", {"methods": []})
        return [(m, alpha_key(a)) for m in ablation["methods"] for a in ablation["alphas"]]
    return [(m, alpha_key(a)) for m, spec in DATASETS[dataset]["methods"].items() for a in spec["alphas"]]


def released_keys(dataset, method) -> dict:
    """{alpha: registry key} of the released generators of ``dataset`` by ``method``."""
    return {alpha_key(a): key for a, key in DATASETS[dataset].get("released", {}).get(method, {}).items()}


def released_runs(dataset):
    """(method, alpha) of the released generators evaluated for ``dataset`` (config evaluation.released)."""
    if not {**config["evaluation"], **DATASETS[dataset].get("evaluation", {})}["released"]:
        return []
    return [(m, a) for m in DATASETS[dataset].get("released", {}) for a in released_keys(dataset, m)]


def released_file(w):
    return f"resources/generators/{released_keys(w.dataset, w.method)[w.alpha]}.pt"


def datasets_of_tables(tables):
    wanted = {TABLE_SOURCES.get(t, t) for t in tables}
    return [name for name, d in DATASETS.items() if d["table"] in wanted]


def run_dir(dataset, method, alpha, study="main") -> str:
    return f"results/{dataset}/{'ablation/' if study == 'ablation' else ''}{method}/alpha{alpha}"


def artifact_file(key: str) -> str:
    """Where the download rule puts a registry artifact."""
    return f"resources/downloads/{key}"


def artifact_dir_files(prefix: str) -> list[str]:
    """The files of a directory artifact (e.g. ``vae/sd-vae-ft-mse``): every registry key under it."""
    return [artifact_file(k) for k in artifacts() if k.startswith(prefix + "/")]


def artifact_keys(dataset) -> list[str]:
    """Registry keys a dataset's configuration names (checked by check_config)."""
    d = DATASETS[dataset]
    keys = [d[part]["artifact"] for part in ("data", "teacher", "reference", "detector", "pr_reference")
            if "artifact" in d.get(part, {})]
    if "latent" in d:
        keys += [k for k in artifacts() if k.startswith(d["latent"]["vae"] + "/")] or [d["latent"]["vae"]]
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


def data_file(w):
    return f"resources/data/{data_name(w.dataset)}.zip"


@functools.cache
def data_zip(path: str, mtime: float, use_labels: bool):
    """A data zip opened (its listing and first item only), once per version of the file."""
    from sidcore.dataset import read_image_zip

    return read_image_zip(path, use_labels=use_labels)


def prepare_inputs(w):
    """Files a data preparation job reads: the downloaded archive or the VAE that encodes latents. A local
    source must exist while the data is still to be made, and a ready-made EDM zip must have the shape
    config.yaml gives the networks (data made here from config.yaml has it)."""
    d = DATASETS[dataset_of_data(w.data)]
    s = resolve(config, dataset_of_data(w.data))
    if not os.path.exists(f"resources/data/{w.data}.zip"):
        preflight.check_data_source(s)
    if d["data"]["source"] == "edm-zip" and os.path.isfile(d["data"]["path"]):
        path = d["data"]["path"]
        preflight.check_data_shape(s, data_zip(path, os.path.getmtime(path), s["label_dim"] > 0))
    if d["data"]["source"] == "cifar10-archive":
        return {"archive": artifact_file(d["data"]["artifact"])}
    if d["data"]["source"] == "vae-latents":
        return {"vae": vae_files(d)}
    return {}


def prepare_args(name) -> str:
    d = DATASETS[dataset_of_data(name)]
    if d["data"]["source"] == "cifar10-archive":
        return f"--archive {artifact_file(d['data']['artifact'])}"
    if d["data"]["source"] == "vae-latents":
        return f"--vae {artifact_file(d['latent']['vae'])}"
    return ""


def vae_files(d) -> list[str]:
    return artifact_dir_files(d["latent"]["vae"]) if "latent" in d else []


def teacher_file(w):
    t = DATASETS[w.dataset]["teacher"]
    if t["source"] == "train":
        return f"resources/teachers/trained/{w.dataset}.pt"
    return f"resources/teachers/{t['artifact'].split('/', 1)[1]}.pt"


def refs_file(w):
    r = DATASETS[w.dataset]["reference"]
    if r["source"] == "compute":
        return f"resources/refs/computed/{w.dataset}.npz"
    return artifact_file(r["artifact"])


def detector_file(w):
    d = DATASETS[w.dataset]["detector"]
    if d["source"] == "train":
        return f"resources/detectors/trained/{w.dataset}.pt"
    return artifact_file(d["artifact"])


def init_file(w):
    """SiD²A's starting generator (methods.sid2a.init), the same for every alpha: our SiD run of
    init.alpha, or the released SiD generator of that alpha."""
    init = DATASETS[w.dataset]["methods"]["sid2a"]["init"]
    alpha = alpha_key(init["alpha"])
    if init["from"] == "sid":
        return f"{run_dir(w.dataset, 'sid', alpha)}/generator.pt"
    return f"resources/generators/{released_keys(w.dataset, 'sid')[alpha]}.pt"


def model_inputs(w, study="main"):
    """Inputs of distillation and evaluation jobs: data, reference statistics, detector, the VAE where used."""
    check_target(w, study)
    d = DATASETS[w.dataset]
    return {"data": data_file(w), "refs": refs_file(w), "detector": detector_file(w), "vae": vae_files(d)}


def distill_inputs(w, study="main"):
    """Inputs of a distillation: those of ``model_inputs``, the teacher and, for SiD²A, its starting generator."""
    inputs = {**model_inputs(w, study), "teacher": teacher_file(w)}
    if w.method == "sid2a":
        inputs["init"] = init_file(w)
    return inputs


def init_arg(w, input) -> str:
    return f"--init {input.init}" if "init" in input.keys() else ""


def eval_inputs(w):
    """Inputs of evaluation jobs: those of ``model_inputs``, DINOv2 and the precision/recall batch where needed."""
    d = DATASETS[w.dataset]
    inputs = model_inputs(w)
    if "fd_dinov2" in d["metrics"]:
        inputs["dinov2"] = artifact_file(config["evaluation"]["fd_dinov2_detector"])
    if {"precision", "recall"} & set(d["metrics"]):
        inputs["pr_reference"] = artifact_file(d["pr_reference"]["artifact"])
    return inputs


def eval_args(w, input) -> str:
    """Command-line flags for the optional inputs of ``model_inputs`` and ``eval_inputs``."""
    d = DATASETS[w.dataset]
    args = f"--vae {artifact_file(d['latent']['vae'])}" if "latent" in d else ""
    if "dinov2" in input.keys():
        args += f" --dinov2-weights {input.dinov2}"
    if "pr_reference" in input.keys():
        args += f" --pr-reference {input.pr_reference}"
    return args



# Report rules: inputs, arguments and report entries.


def summaries_of_table(w):
    check_target(w)
    out = []
    for dataset in datasets_of_tables([w.table]):
        if "teacher_eval" in DATASETS[dataset]:
            out.append(f"results/{dataset}/teacher/eval/summary.json")
        out += [f"{run_dir(dataset, m, a)}/eval/summary.json" for m, a in runs(dataset)]
        out += [f"results/{dataset}/released/{m}/alpha{a}/eval/summary.json" for m, a in released_runs(dataset)]
    return out


def plot_inputs(w):
    check_target(w)
    inputs = {"logs": [f"{run_dir(w.dataset, m, a)}/log.jsonl" for m, a in runs(w.dataset)]}
    if "teacher_eval" in DATASETS[w.dataset]:
        inputs["teacher"] = f"results/{w.dataset}/teacher/eval/summary.json"
    return inputs


def plot_args(w, input) -> str:
    """The runs' curves, and what identifies the dataset's paper numbers (its table and EDM2 size)."""
    d = DATASETS[w.dataset]
    args = [f"--run {m} {a} {log}" for (m, a), log in zip(runs(w.dataset), input.logs)]
    args.append(f"--table {d['table']}")
    if "size" in d:
        args.append(f"--size {d['size']}")
    if "teacher" in input.keys():
        args.append(f"--teacher-summary {input.teacher}")
    return " ".join(args)


def ablation_logs(w):
    """The logs of the dataset's α ablation (config `ablation`)."""
    check_target(w)
    if "ablation" not in DATASETS[w.dataset]:
        raise ValueError(f"datasets.{w.dataset}.ablation: no α ablation configured for this dataset")
    return [f"{run_dir(w.dataset, m, a, 'ablation')}/log.jsonl" for m, a in runs(w.dataset, "ablation")]


def cost_runs():
    """(dataset, method, alpha) of every distillation of the configured tables."""
    return [(d, m, a) for d in datasets_of_tables(config["tables"]) for m, a in runs(d)]


def cost_inputs(w):
    return {"logs": [f"{run_dir(d, m, a)}/log.jsonl" for d, m, a in cost_runs()],
            "benchmarks": [f"benchmarks/distill/{d}-{m}-alpha{a}.tsv" for d, m, a in cost_runs()]}


def cost_args(w, input) -> str:
    return " ".join(f"--run {d} {DATASETS[d]['table']} {m} {a} {log} {bench}"
                    for (d, m, a), log, bench in zip(cost_runs(), input.logs, input.benchmarks))


def figure_inputs(w):
    """A run's generator, the data (label distribution), the teacher where it is evaluated, the VAE where used."""
    check_target(w)
    d = DATASETS[w.dataset]
    inputs = {"generator": f"{run_dir(w.dataset, w.method, w.alpha)}/generator.pt", "data": data_file(w),
              "vae": vae_files(d)}
    if "teacher_eval" in d:
        inputs["teacher"] = teacher_file(w)
    return inputs


def claims_inputs(w):
    """Everything claims (a)–(e) read: the teacher's and every run's evaluation, the runs' logs, the α ablation
    (and its table and plot, and the dataset's plot, so that the target brings the experiment's plots)."""
    check_target(w)
    d = DATASETS[w.dataset]
    missing = [key for key, ok in (("teacher_eval", "teacher_eval" in d), ("methods.sid", "sid" in d["methods"]),
                                   ("methods.sida", "sida" in d["methods"]), ("methods.sid2a", "sid2a" in d["methods"]),
                                   ("ablation (of sida)", "sida" in d.get("ablation", {}).get("methods", [])))
               if not ok]
    if missing:
        raise ValueError(f"datasets.{w.dataset}: the claims need {', '.join(missing)}")
    main = runs(w.dataset)
    return {"teacher": f"results/{w.dataset}/teacher/eval/summary.json",
            "logs": [f"{run_dir(w.dataset, m, a)}/log.jsonl" for m, a in main],
            "summaries": [f"{run_dir(w.dataset, m, a)}/eval/summary.json" for m, a in main],
            "ablation": ablation_logs(w), "ablation_plot": f"results/plots/alpha-ablation-{w.dataset}.png",
            "plot": f"results/plots/{w.dataset}.png"}


def claims_args(w, input) -> str:
    main = runs(w.dataset)
    args = [f"--teacher-summary {input.teacher}",
            f"--sid2a-init-alpha {DATASETS[w.dataset]['methods']['sid2a']['init']['alpha']}"]
    args += [f"--run {m} {a} {log} {summary}" for (m, a), log, summary in zip(main, input.logs, input.summaries)]
    args += [f"--ablation {a} {log}" for (m, a), log in zip(runs(w.dataset, "ablation"), input.ablation) if m == "sida"]
    return " ".join(args)


def table_report(path, kind, caption="table.rst", name="table"):
    """A table output for the report: category Tables, one subcategory per value of wildcard ``name``."""
    return report(path, caption=f"../report/{caption}", category="Tables", subcategory=f"{{{name}}}",
                  labels={name: f"{{{name}}}", "file": kind})


def plot_report(path, kind, caption="plot.rst"):
    """A plot output for the report: one subcategory per dataset."""
    return report(path, caption=f"../report/{caption}", category="FID against images seen", subcategory="{dataset}",
                  labels={"dataset": "{dataset}", "file": kind})


check_config()
LAUNCH_FLAGS = launch_flags()
LATENT_DATA = "|".join(data_name(n) for n, d in DATASETS.items() if d["data"]["source"] == "vae-latents") or "(?!)"
