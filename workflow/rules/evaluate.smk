# The papers' protocol: `evaluation.runs` independent runs per model (one file each), then mean ± std.
# One job evaluates all runs of a model, so the detector and reference statistics are loaded once.


rule evaluate_generator:
    input:
        unpack(eval_inputs),
        model="results/{dataset}/{method}/alpha{alpha}/generator.pt",
    output:
        [f"results/{{dataset}}/{{method}}/alpha{{alpha}}/eval/{r}" for r in RUNS],
    log:
        "logs/evaluate/{dataset}-{method}-alpha{alpha}.log",
    benchmark:
        "benchmarks/evaluate/{dataset}-{method}-alpha{alpha}.tsv"
    localrule: True
    conda:
        SOFTWARE_ENV
    threads: launch_threads("evaluate")
    resources:
        **gpu_resources("evaluate"),
    params:
        settings=lambda w: settings(w.dataset, w.method, w.alpha, stage="evaluate_generator"),
        outdir=lambda w: f"{run_dir(w.dataset, w.method, w.alpha)}/eval",
        extra=eval_args,
    shell:
        "sidcore --log {log:q} {resources.launch} -- evaluate --settings {params.settings:q} --kind generator --model {input.model} --data {input.data}"
        " --refs {input.refs} --detector-weights {input.detector} --outdir {params.outdir} {params.extra}"


# A generator published with the papers (config evaluation.released): the same evaluation, rows marked released.
use rule evaluate_generator as evaluate_released with:
    input:
        unpack(eval_inputs),
        model=released_file,
    output:
        [f"results/{{dataset}}/released/{{method}}/alpha{{alpha}}/eval/{r}" for r in RUNS],
    log:
        "logs/evaluate/{dataset}-released-{method}-alpha{alpha}.log",
    benchmark:
        "benchmarks/evaluate/{dataset}-released-{method}-alpha{alpha}.tsv"
    localrule: True
    params:
        settings=lambda w: settings(w.dataset, w.method, w.alpha, stage="evaluate_generator"),
        outdir="results/{dataset}/released/{method}/alpha{alpha}/eval",
        extra=lambda w, input: f"{eval_args(w, input)} --released {released_keys(w.dataset, w.method)[w.alpha]}",


rule evaluate_teacher:
    input:
        unpack(eval_inputs),
        model=teacher_file,
    output:
        [f"results/{{dataset}}/teacher/eval/{r}" for r in RUNS],
    log:
        "logs/evaluate/{dataset}-teacher.log",
    benchmark:
        "benchmarks/evaluate/{dataset}-teacher.tsv"
    localrule: True
    conda:
        SOFTWARE_ENV
    threads: launch_threads("evaluate")
    resources:
        **gpu_resources("evaluate"),
    params:
        settings=lambda w: settings(w.dataset, stage="evaluate_teacher"),
        outdir="results/{dataset}/teacher/eval",
        extra=eval_args,
    shell:
        "sidcore --log {log:q} {resources.launch} -- evaluate --settings {params.settings:q} --kind teacher --model {input.model} --data {input.data}"
        " --refs {input.refs} --detector-weights {input.detector} --outdir {params.outdir} {params.extra}"


rule summarize:
    input:
        run_records,
    output:
        "results/{dataset}/{model}/eval/summary.json",
    log:
        "logs/summarize/{dataset}/{model}.log",
    benchmark:
        "benchmarks/summarize/{dataset}/{model}.tsv"
    wildcard_constraints:
        model=r"teacher|(released/)?[a-z0-9]+/alpha[^/]+",
    localrule: True
    conda:
        SOFTWARE_ENV
    params:
        table=lambda w: DATASETS[w.dataset]["table"],
        std_ddof=lambda w: resolve(config, w.dataset)["evaluation"].std_ddof,
    shell:
        "sidcore --log {log:q} summarize --table {params.table} --std-ddof {params.std_ddof} --runs {input} --out {output}"
