# Input functions of the rules (the files each job reads) and the arguments built from them; the report
# rules' inputs, arguments and report entries.


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
    config.yaml gives the networks (data made here from config.yaml has it). A dry run plans without the local
    data, with a warning: plans are looked at before terabytes are staged."""
    d = DATASETS[dataset_of_data(w.data)]
    s = resolve(config, dataset_of_data(w.data))
    with config_file.exit_on_user_error("config error"):
        if not os.path.exists(f"resources/data/{w.data}.zip"):
            try:
                preflight.check_data_source(s)
            except UserError as e:
                if not workflow.dryrun:
                    raise
                warn_once(f"warning: {e} (a dry run plans without it; job prepare_data for {w.data} will need it)")
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
    alpha = alpha_text(init["alpha"])
    if init["from"] == "sid":
        return f"{run_dir(w.dataset, 'sid', alpha)}/generator.pt"
    return f"resources/generators/{released_keys(w.dataset, 'sid')[alpha]}.pt"


def model_inputs(w, study="main"):
    """Inputs of distillation and evaluation jobs: data, reference statistics, detector, the VAE where used."""
    check_target(w, study)
    d = DATASETS[w.dataset]
    return {"data": data_file(w), "refs": refs_file(w), "detector": detector_file(w), "vae": vae_files(d)}


def distill_inputs(w, study="main"):
    """Inputs of a distillation: those of ``model_inputs``, the teacher and, for SiD²A, its starting generator.
    Names, before any job, a run whose training state was started with other settings (``check_rerun``)."""
    inputs = {**model_inputs(w, study), "teacher": teacher_file(w)}
    check_rerun(w, study)
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


def run_logs(w):
    """The logs of the dataset's configured runs, in the order of ``runs``."""
    check_target(w)
    return [f"{run_dir(w.dataset, m, a)}/log.jsonl" for m, a in runs(w.dataset)]


def run_args(w, logs) -> str:
    """``--run METHOD ALPHA LOG`` of each configured run of the dataset."""
    return " ".join(f"--run {m} {a} {log}" for (m, a), log in zip(runs(w.dataset), logs))


def plot_inputs(w):
    inputs = {"logs": run_logs(w)}
    if "teacher_eval" in DATASETS[w.dataset]:
        inputs["teacher"] = f"results/{w.dataset}/teacher/eval/summary.json"
    return inputs


def plot_args(w, input) -> str:
    """The runs' curves, and what identifies the dataset's paper numbers (its table and EDM2 size)."""
    d = DATASETS[w.dataset]
    title = report_table(d["table"]).title + ("" if w.dataset == d["table"] else f" ({w.dataset})")
    args = [run_args(w, input.logs), f"--table {d['table']}", f"--title {shlex.quote(title)}"]
    if "size" in d:
        args.append(f"--size {shlex.quote(d['size'])}")
    if "teacher" in input.keys():
        args.append(f"--teacher-summary {input.teacher}")
    return " ".join(args)


def ablation_logs(w):
    """The logs of the dataset's α ablation (config `ablation`)."""
    check_target(w)
    if "ablation" not in DATASETS[w.dataset]:
        refuse_target(f"datasets.{w.dataset}.ablation: no α ablation configured for this dataset")
    return [f"{run_dir(w.dataset, m, a, 'ablation')}/log.jsonl" for m, a in runs(w.dataset, "ablation")]


def cost_runs():
    """(dataset, method, alpha) of every distillation of the configured tables."""
    return [(d, m, a) for d in datasets_of_tables(config["tables"]) for m, a in runs(d)]


def cost_inputs(w):
    return {
        "logs": [f"{run_dir(d, m, a)}/log.jsonl" for d, m, a in cost_runs()],
        "benchmarks": [f"benchmarks/distill/{d}-{m}-alpha{a}.tsv" for d, m, a in cost_runs()],
    }


def cost_args(w, input) -> str:
    return " ".join(
        f"--run {d} {DATASETS[d]['table']} {m} {a} {log} {bench}"
        for (d, m, a), log, bench in zip(cost_runs(), input.logs, input.benchmarks)
    )


def figure_inputs(w):
    """A run's generator, the data (label distribution), the teacher where it is evaluated, the VAE where used."""
    check_target(w)
    d = DATASETS[w.dataset]
    inputs = {
        "generator": f"{run_dir(w.dataset, w.method, w.alpha)}/generator.pt",
        "data": data_file(w),
        "vae": vae_files(d),
    }
    if "teacher_eval" in d:
        inputs["teacher"] = teacher_file(w)
    return inputs


def claims_inputs(w):
    """Everything claims (a)–(e) read: the teacher's and every run's evaluation, the runs' logs, the α ablation
    (and its table and plot, the dataset's plot and its dynamics, so that the target brings the experiment's
    plots)."""
    check_target(w)
    d = DATASETS[w.dataset]
    missing = [
        key
        for key, ok in (
            ("teacher_eval", "teacher_eval" in d),
            ("methods.sid", "sid" in d["methods"]),
            ("methods.sida", "sida" in d["methods"]),
            ("methods.sid2a", "sid2a" in d["methods"]),
            ("ablation (of sida)", "sida" in d.get("ablation", {}).get("methods", [])),
        )
        if not ok
    ]
    if missing:
        refuse_target(f"datasets.{w.dataset}: the claims need {', '.join(missing)}")
    main = runs(w.dataset)
    return {
        "teacher": f"results/{w.dataset}/teacher/eval/summary.json",
        "logs": [f"{run_dir(w.dataset, m, a)}/log.jsonl" for m, a in main],
        "summaries": [f"{run_dir(w.dataset, m, a)}/eval/summary.json" for m, a in main],
        "ablation": ablation_logs(w),
        "ablation_plot": f"results/plots/alpha-ablation-{w.dataset}.png",
        "plot": f"results/plots/{w.dataset}.png",
        "dynamics": f"results/plots/dynamics-{w.dataset}.png",
    }


def claims_args(w, input) -> str:
    main = runs(w.dataset)
    args = [
        f"--teacher-summary {input.teacher}",
        f"--sid2a-init-alpha {DATASETS[w.dataset]['methods']['sid2a']['init']['alpha']}",
    ]
    args += [f"--run {m} {a} {log} {summary}" for (m, a), log, summary in zip(main, input.logs, input.summaries)]
    args += [f"--ablation {a} {log}" for (m, a), log in zip(runs(w.dataset, "ablation"), input.ablation) if m == "sida"]
    return " ".join(args)


def table_report(path, kind, caption="table.rst", name="table"):
    """A table output for the report: category Tables, one subcategory per value of wildcard ``name``."""
    return report(
        path,
        caption=f"../report/{caption}",
        category="Tables",
        subcategory=f"{{{name}}}",
        labels={name: f"{{{name}}}", "file": kind},
    )


def plot_report(path, kind, caption="plot.rst"):
    """A plot output for the report: one subcategory per dataset."""
    return report(
        path,
        caption=f"../report/{caption}",
        category="FID against images seen",
        subcategory="{dataset}",
        labels={"dataset": "{dataset}", "file": kind},
    )


def plan_jobs(w) -> list[dict]:
    """Every long job table ``w.table`` needs (GPU stages, teacher training), described for its bill (sidcore.plan)."""
    check_target(w)
    return table_jobs(w.table)


@functools.cache  # read by two params of the plan job
def table_jobs(table) -> list[dict]:
    jobs, encoded, local = [], set(), config["launcher"] == "local"
    for dataset in datasets_of_tables([table]):
        d, s, w = DATASETS[dataset], resolve(config, dataset), SimpleNamespace(dataset=dataset)
        gpus = {
            stage: job["nodes"] * job["gpus_per_node"]
            for stage in ("distill", "evaluate", "encode")
            for job in [cluster_job(config, dataset, stage)]
        }
        data, teacher = data_file(w), teacher_file(w)
        encoding = [data] if d["data"]["source"] == "vae-latents" else []  # a job of the bill makes the data
        if encoding and data not in encoded:
            encoded.add(data)
            jobs.append(plan.encode_job(s, gpus["encode"], local, data))
        training = [teacher] if d["teacher"]["source"] == "train" else []  # ... or the teacher
        if training:
            jobs.append(plan.teacher_training_job(s, teacher))
        made = encoding + training
        if "teacher_eval" in d:
            runs_of = [f"results/{dataset}/teacher/eval/{r}" for r in RUNS]
            jobs.append(plan.evaluation_job(s, gpus["evaluate"], local, "teacher", runs_of, made))
        for m, a in runs(dataset):
            out = run_dir(dataset, m, a)
            after = made + [init_file(w)] if m == "sid2a" else made
            jobs.append(plan.distill_job(resolve(config, dataset, m, a), gpus["distill"], local, out, after))
            model, runs_of = f"{METHOD_NAMES[m]} α={a}", [f"{out}/eval/{r}" for r in RUNS]
            jobs.append(plan.evaluation_job(s, gpus["evaluate"], local, model, runs_of, [f"{out}/generator.pt"]))
        for m, a in released_runs(dataset):
            runs_of = [f"results/{dataset}/released/{m}/alpha{a}/eval/{r}" for r in RUNS]
            model = f"released {METHOD_NAMES[m]} α={a}"
            jobs.append(plan.evaluation_job(s, gpus["evaluate"], local, model, runs_of, encoding))
    return jobs


def plan_networks(w) -> str:
    """The network of each table's first dataset (the throughputs of Table 8's columns are per network)."""
    networks = {}
    for dataset in DATASETS:
        networks.setdefault(DATASETS[dataset]["table"], network_settings(resolve(config, dataset)))
    return dumps(networks)
