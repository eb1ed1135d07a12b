# Paths and settings shared by the rules. The layout:
#   resources/data/{dataset}.zip                      training images (EDM zip layout)
#   resources/downloads/...                           downloaded artifacts (registry keys)
#   resources/teachers/... , resources/refs/... , resources/detectors/...
#   results/{dataset}/{method}/alpha{alpha}/          one distillation run (generator.pt, log.jsonl)
#   results/{dataset}/{method}/alpha{alpha}/eval/     run{r}.json per evaluation run, summary.json
#   results/{dataset}/teacher/eval/                   the teacher's evaluation (where configured)
#   results/tables/{table}.csv|md, results/plots/{dataset}.png|pdf
from sidcore.settings import METHODS, dumps, resolve

DATASETS = config["datasets"]
TABLE_SOURCES = {"edm2_fd_dinov2": "edm2"}  # tables made from another table's runs


wildcard_constraints:
    dataset="[a-z0-9][a-z0-9_.-]*",
    method="|".join(METHODS),
    alpha=r"[0-9]+\.[0-9]+",
    run=r"[0-9]+",
    name="[^/]+",


def check_config() -> None:
    """Checks the schema cannot express; each error names the config key."""
    tables = {d["table"] for d in DATASETS.values()}
    tables |= {alias for alias, source in TABLE_SOURCES.items() if source in tables}
    for t in config["tables"]:
        if t not in tables:
            raise ValueError(f"tables: {t!r} is the table of no dataset (known: {sorted(tables)})")
    for name, d in DATASETS.items():
        for method, spec in d["methods"].items():
            dist = {**d["distill"], **spec.get("distill", {})}
            if dist["batch"] % min(dist["batch_gpu"], dist["batch"]):
                raise ValueError(f"datasets.{name}.methods.{method}: batch {dist['batch']} is not a multiple "
                                 f"of batch_gpu {dist['batch_gpu']}")
            if spec.get("init") == "released":
                missing = [a for a in spec["alphas"] if alpha_str(a) not in spec["released"]]
                if missing:
                    raise ValueError(f"datasets.{name}.methods.{method}.released: no generator for alphas {missing}")


def alpha_str(alpha) -> str:
    return str(float(alpha))


def settings(dataset, method=None, alpha=None) -> str:
    """The job's resolved settings as JSON (a param, so Snakemake reruns a job whose settings change)."""
    return dumps(resolve(config, dataset, method, alpha))


def runs(dataset):
    """(method, alpha) of every distillation run configured for ``dataset``."""
    return [(m, alpha_str(a)) for m, spec in DATASETS[dataset]["methods"].items() for a in spec["alphas"]]


def datasets_of_tables(tables):
    wanted = {TABLE_SOURCES.get(t, t) for t in tables}
    return [name for name, d in DATASETS.items() if d["table"] in wanted]


def run_dir(dataset, method, alpha) -> str:
    return f"results/{dataset}/{method}/alpha{alpha}"


def artifact_name(key: str) -> str:
    """File name of a registry key (``teacher/edm-cifar10-32x32-uncond-vp`` -> ``edm-cifar10-32x32-uncond-vp``)."""
    return key.split("/", 1)[1]


def data_file(w):
    return f"resources/data/{w.dataset}.zip"


def teacher_file(w):
    t = DATASETS[w.dataset]["teacher"]
    if t["source"] == "train":
        return f"resources/teachers/trained/{w.dataset}.pt"
    return f"resources/teachers/{artifact_name(t['artifact'])}.pt"


def refs_file(w):
    r = DATASETS[w.dataset]["reference"]
    if r["source"] == "compute":
        return f"resources/refs/computed/{w.dataset}.npz"
    return f"resources/refs/{artifact_name(r['artifact'])}"


def detector_file(w):
    d = DATASETS[w.dataset]["detector"]
    if d["source"] == "train":
        return f"resources/detectors/trained/{w.dataset}.pt"
    return f"resources/detectors/{artifact_name(d['artifact'])}"


def init_file(w):
    """SiD²A's starting generator: our SiD run of the same alpha, or a released SiD generator."""
    spec = DATASETS[w.dataset]["methods"]["sid2a"]
    if spec["init"] == "sid":
        return f"{run_dir(w.dataset, 'sid', w.alpha)}/generator.pt"
    return f"resources/generators/{spec['released'][w.alpha]}.pt"


def eval_inputs(w):
    return {"data": data_file(w), "refs": refs_file(w), "detector": detector_file(w)}


check_config()
