# Comparison tables (ours next to the paper's numbers) and FID-versus-images plots, marked for
# `snakemake --report report.html` (captions in workflow/report/).

report: "../report/workflow.rst"


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


def table_report(path, kind):
    """A table output for the report: category Tables, one subcategory per table."""
    return report(path, caption="../report/table.rst", category="Tables", subcategory="{table}",
                  labels={"table": "{table}", "file": kind})


def plot_report(path, kind):
    """A plot output for the report: one subcategory per dataset."""
    return report(path, caption="../report/plot.rst", category="FID against images seen", subcategory="{dataset}",
                  labels={"dataset": "{dataset}", "file": kind})


rule tabulate:
    input:
        summaries_of_table,
    output:
        csv=table_report("results/tables/{table}.csv", "CSV"),
        md=table_report("results/tables/{table}.md", "Markdown"),
    log:
        "logs/tabulate/{table}.log",
    localrule: True
    shell:
        "sidcore tabulate --table {wildcards.table} --summaries {input} --out {output.csv} > {log} 2>&1"


rule plot:
    input:
        unpack(plot_inputs),
    output:
        png=plot_report("results/plots/{dataset}.png", "PNG"),
        pdf=plot_report("results/plots/{dataset}.pdf", "PDF"),
    params:
        args=plot_args,
    log:
        "logs/plot/{dataset}.log",
    localrule: True
    shell:
        "sidcore plot --title {wildcards.dataset} {params.args} --out {output.png} > {log} 2>&1"
