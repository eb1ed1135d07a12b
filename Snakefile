# Reproduce SiD / SiDA / SiD²A: download or train teachers, distil, evaluate, tabulate, plot.
# Every rule calls one `sidcore` command; settings come from config.yaml (validated below).
from snakemake.utils import min_version

from sidcore import config as config_file

min_version("9.0")

# Snakemake keeps the last of two equal keys, reports a syntax error without its place and evaluates YTE
# templates: read strictly first (config.yaml before Snakemake reads it; overlays before any plan).
with config_file.exit_on_user_error("config error"):
    for path in ["config.yaml", *workflow.configfiles]:
        config_file.read(path)


configfile: "config.yaml"


with config_file.exit_on_user_error("config error"):
    config_file.validate(config, "workflow/schemas/config.schema.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/inputs.smk"
include: "workflow/rules/resources.smk"
include: "workflow/rules/distill.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


onerror:
    explain_failure(log)


rule all:
    default_target: True
    input:
        expand("results/tables/{table}.csv", table=config["tables"]),
        [f"results/plots/{d}.png" for d in datasets_of_tables(config["tables"])],
        [f"results/figures/{d}-{m}-alpha{a}.png" for d in datasets_of_tables(config["tables"]) for m, a in runs(d)],
