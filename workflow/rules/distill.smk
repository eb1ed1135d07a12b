# SiD and SiDA from the teacher; SiD²A from a SiD generator (methods.sid2a.init). One job per (dataset, method,
# alpha). A rerun of an interrupted job resumes from results/.../training-state.pt; under SLURM a job that
# reaches its time limit or is preempted saves its state, is requeued and resumes by itself. The outputs are
# `update`: Snakemake does not delete them before the job (the job keeps a run it starts over aside, see
# sidcore.run_record) and puts the earlier ones back if the job fails.


rule distill:
    input:
        unpack(distill_inputs),
    output:
        generator=update("results/{dataset}/{method}/alpha{alpha}/generator.pt"),
        log=update("results/{dataset}/{method}/alpha{alpha}/log.jsonl"),
    log:
        "logs/distill/{dataset}-{method}-alpha{alpha}.log",
    benchmark:
        "benchmarks/distill/{dataset}-{method}-alpha{alpha}.tsv"
    priority: 10  # the critical path (teacher, SiD, SiD²A): before any evaluation, which can wait
    localrule: True
    conda:
        SOFTWARE_ENV
    threads: launch_threads("distill")
    resources:
        **gpu_resources("distill"),
        logging=logging_flags,
        rerun=rerun_flags("distill"),
    params:
        settings=lambda w: settings(w.dataset, w.method, w.alpha),
        outdir=lambda w: run_dir(w.dataset, w.method, w.alpha),
        init=init_arg,
        extra=eval_args,
    shell:
        "sidcore --log {log:q} {resources.launch} -- distill --settings {params.settings:q} --teacher {input.teacher} --data {input.data}"
        " --refs {input.refs} --detector-weights {input.detector} --outdir {params.outdir} {params.init}"
        " {params.extra} {resources.logging} {resources.rerun}"


# One run of the α ablation (config `ablation`): the same job with the ablation's budget, in its own folder.
use rule distill as distill_ablation with:
    input:
        unpack(lambda w: distill_inputs(w, study="ablation")),
    output:
        generator=update("results/{dataset}/ablation/{method}/alpha{alpha}/generator.pt"),
        log=update("results/{dataset}/ablation/{method}/alpha{alpha}/log.jsonl"),
    log:
        "logs/distill/{dataset}-ablation-{method}-alpha{alpha}.log",
    benchmark:
        "benchmarks/distill/{dataset}-ablation-{method}-alpha{alpha}.tsv"
    localrule: True
    resources:
        **gpu_resources("distill", study="ablation"),
        logging=logging_flags,
        rerun=rerun_flags("distill_ablation", study="ablation"),
    params:
        settings=lambda w: settings(w.dataset, w.method, w.alpha, study="ablation"),
        outdir=lambda w: run_dir(w.dataset, w.method, w.alpha, study="ablation"),
        init=init_arg,
        extra=eval_args,
