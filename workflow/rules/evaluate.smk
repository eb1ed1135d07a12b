# The papers' protocol: `evaluation.runs` independent runs per model, then mean ± std.


def n_runs(dataset):
    return {**config["evaluation"], **DATASETS[dataset].get("evaluation", {})}["runs"]


rule evaluate_generator:
    input:
        unpack(eval_inputs),
        model="results/{dataset}/{method}/alpha{alpha}/generator.pt",
    output:
        "results/{dataset}/{method}/alpha{alpha}/eval/run{run}.json",
    params:
        settings=lambda w: settings(w.dataset, w.method, w.alpha),
    log:
        "logs/evaluate/{dataset}-{method}-alpha{alpha}-run{run}.log",
    shell:
        "sidcore evaluate --settings {params.settings:q} --kind generator --model {input.model} --data {input.data}"
        " --refs {input.refs} --detector-weights {input.detector} --run {wildcards.run} --out {output} > {log} 2>&1"


rule evaluate_teacher:
    input:
        unpack(eval_inputs),
        model=teacher_file,
    output:
        "results/{dataset}/teacher/eval/run{run}.json",
    params:
        settings=lambda w: settings(w.dataset),
    log:
        "logs/evaluate/{dataset}-teacher-run{run}.log",
    shell:
        "sidcore evaluate --settings {params.settings:q} --kind teacher --model {input.model} --data {input.data}"
        " --refs {input.refs} --detector-weights {input.detector} --run {wildcards.run} --out {output} > {log} 2>&1"


rule summarize:
    input:
        lambda w: expand("results/{{dataset}}/{{model}}/eval/run{run}.json", run=range(n_runs(w.dataset))),
    output:
        "results/{dataset}/{model}/eval/summary.json",
    wildcard_constraints:
        model=r"teacher|(sid|sida|sid2a)/alpha[0-9]+\.[0-9]+",
    params:
        settings=lambda w: settings(w.dataset),
    log:
        "logs/summarize/{dataset}/{model}.log",
    localrule: True
    shell:
        "sidcore summarize --settings {params.settings:q} --runs {input} --out {output} > {log} 2>&1"
