# Comparison tables (ours next to the paper's numbers), FID-versus-images plots, the α ablation, the cost
# table, sample figures and the claims, marked for `snakemake --report report.html` (captions in
# workflow/report/). Their input functions live in common.smk.


report: "../report/workflow.rst"


rule tabulate:
    input:
        summaries_of_table,
    output:
        csv=table_report("results/tables/{table}.csv", "CSV"),
        md=table_report("results/tables/{table}.md", "Markdown"),
    log:
        "logs/tabulate/{table}.log",
    benchmark:
        "benchmarks/tabulate/{table}.tsv"
    wildcard_constraints:
        table=r"(?!alpha-ablation-|cost\.)[A-Za-z0-9_.-]+",  # not the tables of alpha_ablation and cost
    localrule: True
    conda:
        SOFTWARE_ENV
    shell:
        "sidcore --log {log:q} tabulate --table {wildcards.table} --summaries {input} --out {output.csv} --markdown {output.md}"


rule plot:
    input:
        unpack(plot_inputs),
    output:
        png=plot_report("results/plots/{dataset}.png", "PNG"),
        pdf=plot_report("results/plots/{dataset}.pdf", "PDF"),
    log:
        "logs/plot/{dataset}.log",
    benchmark:
        "benchmarks/plot/{dataset}.tsv"
    wildcard_constraints:
        dataset="(?!alpha-ablation-|dynamics-)[a-z0-9][a-z0-9_.-]*",
    localrule: True
    conda:
        SOFTWARE_ENV
    params:
        args=plot_args,
    shell:
        "sidcore --log {log:q} plot {params.args} --out {output.png} --pdf {output.pdf}"


# The training dynamics the distillations' instruments logged (sidcore/instruments.py): the discriminator, the
# generator's gradients, the FID of G_ema and of the raw G.
rule dynamics:
    input:
        run_logs,
    output:
        png=plot_report("results/plots/dynamics-{dataset}.png", "PNG", "dynamics.rst"),
        pdf=plot_report("results/plots/dynamics-{dataset}.pdf", "PDF", "dynamics.rst"),
    log:
        "logs/dynamics/{dataset}.log",
    benchmark:
        "benchmarks/dynamics/{dataset}.tsv"
    localrule: True
    conda:
        SOFTWARE_ENV
    params:
        args=lambda w, input: run_args(w, input),
    shell:
        "sidcore --log {log:q} dynamics --title {wildcards.dataset} {params.args} --out {output.png} --pdf {output.pdf}"


# The α ablation (config `ablation`): FID and IS against images seen, one curve per α, per method.
rule alpha_ablation:
    input:
        ablation_logs,
    output:
        csv=table_report("results/tables/alpha-ablation-{dataset}.csv", "CSV", "ablation.rst", "dataset"),
        md=table_report("results/tables/alpha-ablation-{dataset}.md", "Markdown", "ablation.rst", "dataset"),
        png=plot_report("results/plots/alpha-ablation-{dataset}.png", "PNG", "ablation.rst"),
        pdf=plot_report("results/plots/alpha-ablation-{dataset}.pdf", "PDF", "ablation.rst"),
    log:
        "logs/alpha_ablation/{dataset}.log",
    benchmark:
        "benchmarks/alpha_ablation/{dataset}.tsv"
    localrule: True
    conda:
        SOFTWARE_ENV
    params:
        args=lambda w, input: " ".join(
            f"--run {m} {a} {log}" for (m, a), log in zip(runs(w.dataset, "ablation"), input)
        ),
    shell:
        "sidcore --log {log:q} ablation --title {wildcards.dataset} {params.args} --out {output.csv} --markdown {output.md}"
        " --plot {output.png} --pdf {output.pdf}"


# What each distillation of the configured tables cost, beside Table 8 of the SiDA paper.
rule cost:
    input:
        unpack(cost_inputs),
    output:
        csv=report(
            "results/tables/cost.csv",
            caption="../report/cost.rst",
            category="Tables",
            subcategory="cost",
            labels={"table": "cost", "file": "CSV"},
        ),
        md=report(
            "results/tables/cost.md",
            caption="../report/cost.rst",
            category="Tables",
            subcategory="cost",
            labels={"table": "cost", "file": "Markdown"},
        ),
    log:
        "logs/cost.log",
    benchmark:
        "benchmarks/cost.tsv"
    localrule: True
    conda:
        SOFTWARE_ENV
    params:
        args=cost_args,
    shell:
        "sidcore --log {log:q} cost {params.args} --out {output.csv} --markdown {output.md}"


# One-step samples of a run's generator with fixed seeds, beside the teacher's (where teacher_eval is set).
rule figure:
    input:
        unpack(figure_inputs),
    output:
        report(
            "results/figures/{dataset}-{method}-alpha{alpha}.png",
            caption="../report/figure.rst",
            category="Samples",
            subcategory="{dataset}",
            labels={"dataset": "{dataset}", "run": "{method} α {alpha}"},
        ),
    log:
        "logs/figure/{dataset}-{method}-alpha{alpha}.log",
    benchmark:
        "benchmarks/figure/{dataset}-{method}-alpha{alpha}.tsv"
    localrule: True
    conda:
        SOFTWARE_ENV
    threads: launch_threads("evaluate", single=True)
    resources:
        **gpu_resources("evaluate", single=True),
    params:
        settings=lambda w: settings(w.dataset, w.method, w.alpha, stage="figure"),
        teacher=lambda w, input: f"--teacher {input.teacher}" if "teacher" in input.keys() else "",
        extra=lambda w, input: eval_args(w, input),
        figure=lambda w: "--seed {seed} --rows {rows} --cols {cols}".format(**config["figures"]),
    shell:
        "sidcore --log {log:q} {resources.launch} -- figure --settings {params.settings:q} --generator {input.generator} {params.teacher} --data {input.data}"
        " {params.extra} {params.figure} --out {output}"


# The papers' claims (a)–(e) tested on one experiment against criteria fixed in advance (sidcore claims).
rule claims:
    input:
        unpack(claims_inputs),
    output:
        csv=report(
            "results/claims/{dataset}.csv",
            caption="../report/claims.rst",
            category="Claims",
            subcategory="{dataset}",
            labels={"dataset": "{dataset}", "file": "CSV"},
        ),
        md=report(
            "results/claims/{dataset}.md",
            caption="../report/claims.rst",
            category="Claims",
            subcategory="{dataset}",
            labels={"dataset": "{dataset}", "file": "Markdown"},
        ),
        png=report(
            "results/claims/{dataset}.png",
            caption="../report/claims.rst",
            category="Claims",
            subcategory="{dataset}",
            labels={"dataset": "{dataset}", "file": "PNG"},
        ),
    log:
        "logs/claims/{dataset}.log",
    benchmark:
        "benchmarks/claims/{dataset}.tsv"
    localrule: True
    conda:
        SOFTWARE_ENV
    params:
        args=claims_args,
    shell:
        "sidcore --log {log:q} claims --title {wildcards.dataset} {params.args} --out {output.csv} --markdown {output.md}"
        " --plot {output.png}"


# The bill before the run: every GPU job of a table not yet done, its GPUs, hours, GPU-hours (sidcore/report/bill.py).
# Written again whenever a job of the table has progressed.
rule plan:
    output:
        csv="results/plans/{table}.csv",
        md="results/plans/{table}.md",
    log:
        "logs/plan/{table}.log",
    benchmark:
        "benchmarks/plan/{table}.tsv"
    localrule: True
    conda:
        SOFTWARE_ENV
    params:
        jobs=lambda w: plan.dumps(plan_jobs(w)),
        networks=plan_networks,
        state=lambda w: plan.state(plan_jobs(w)),
    shell:
        "sidcore --log {log:q} plan --table {wildcards.table} --jobs {params.jobs:q} --networks {params.networks:q}"
        " --csv {output.csv} --markdown {output.md}"
