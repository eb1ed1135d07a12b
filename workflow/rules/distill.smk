# SiD from the teacher; SiDA from the teacher; SiD²A from a SiD generator. One job per (dataset, alpha).
# A rerun of an interrupted job resumes from results/.../training-state.pt; under SLURM a job that reaches
# its time limit or is preempted saves its state, is requeued and resumes by itself.


rule distill_sid:
    input:
        unpack(model_inputs),
        teacher=teacher_file,
    output:
        generator="results/{dataset}/{method}/alpha{alpha}/generator.pt",
        log="results/{dataset}/{method}/alpha{alpha}/log.jsonl",
    wildcard_constraints:
        method="sid",
    params:
        **launch_params("distill"),
        settings=lambda w: settings(w.dataset, w.method, w.alpha),
        outdir=lambda w: run_dir(w.dataset, w.method, w.alpha),
        init="",
        extra=eval_args,
    log:
        "logs/distill/{dataset}-{method}-alpha{alpha}.log",
    localrule: True
    threads: launch_threads("distill")
    resources:
        **gpu_resources("distill"),
    priority: 10  # start distillations before evaluations that could wait
    shell:
        LAUNCH + " --"
        " distill --settings {params.settings:q} --teacher {input.teacher} --data {input.data}"
        " --refs {input.refs} --detector-weights {input.detector} --outdir {params.outdir} {params.init}"
        " {params.extra}"
        " > {log} 2>&1"


use rule distill_sid as distill_sida with:
    wildcard_constraints:
        method="sida",
    localrule: True  # not inherited by `use rule`


use rule distill_sid as distill_sid2a with:
    input:
        unpack(model_inputs),
        teacher=teacher_file,
        init=init_file,
    wildcard_constraints:
        method="sid2a",
    localrule: True
    params:
        **launch_params("distill"),
        settings=lambda w: settings(w.dataset, w.method, w.alpha),
        outdir=lambda w: run_dir(w.dataset, w.method, w.alpha),
        init=lambda w, input: f"--init {input.init}",
        extra=eval_args,
