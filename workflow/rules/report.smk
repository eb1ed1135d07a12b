# Comparison tables (ours next to the paper's numbers) and FID-versus-images plots.


def summaries_of_table(w):
    out = []
    for dataset in datasets_of_tables([w.table]):
        if "teacher_eval" in DATASETS[dataset]:
            out.append(f"results/{dataset}/teacher/eval/summary.json")
        out += [f"{run_dir(dataset, m, a)}/eval/summary.json" for m, a in runs(dataset)]
    return out


def plot_inputs(w):
    logs = {f"{m}-{a}": f"{run_dir(w.dataset, m, a)}/log.jsonl" for m, a in runs(w.dataset)}
    if "teacher_eval" in DATASETS[w.dataset]:
        logs["teacher"] = f"results/{w.dataset}/teacher/eval/summary.json"
    return logs


LABELS = {"sid": "SiD", "sida": "SiDA", "sid2a": "SiD²A"}


def plot_args(w, input):
    args = [f"--log '{LABELS[m]} α={a}={run_dir(w.dataset, m, a)}/log.jsonl'" for m, a in runs(w.dataset)]
    if "teacher" in input.keys():
        args.append(f"--teacher-summary {input.teacher}")
    return " ".join(args)


rule tabulate:
    input:
        summaries_of_table,
    output:
        csv="results/tables/{table}.csv",
        md="results/tables/{table}.md",
    log:
        "logs/tabulate/{table}.log",
    localrule: True
    shell:
        "sidcore tabulate --table {wildcards.table} --summaries {input} --out {output.csv} > {log} 2>&1"


rule plot:
    input:
        unpack(plot_inputs),
    output:
        png="results/plots/{dataset}.png",
        pdf="results/plots/{dataset}.pdf",
    params:
        args=plot_args,
    log:
        "logs/plot/{dataset}.log",
    localrule: True
    shell:
        "sidcore plot --title {wildcards.dataset} {params.args} --out {output.png} > {log} 2>&1"
