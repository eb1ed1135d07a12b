# Inputs of the distillation: data, teachers, reference statistics, detectors, released generators.
# Downloads run where Snakemake runs (the login node on a cluster); compute jobs never use the network.

LOCK = "resources/artifacts.lock.json"


rule prepare_data:
    output:
        "resources/data/{dataset}.zip",
    params:
        settings=lambda w: settings(w.dataset),
    log:
        "logs/prepare_data/{dataset}.log",
    shell:
        "sidcore prepare-data --settings {params.settings:q} --out {output} > {log} 2>&1"


rule download_teacher:
    output:
        "resources/downloads/teacher/{name}.pkl",
    params:
        key="teacher/{name}",
    log:
        "logs/download/teacher-{name}.log",
    localrule: True
    shell:
        "sidcore download {params.key} --out {output} --lock {LOCK} > {log} 2>&1"


use rule download_teacher as download_generator with:
    output:
        "resources/downloads/{family}/{name}.pkl",
    params:
        key="{family}/{name}",
    wildcard_constraints:
        family="sid|sida|sid2a",
    log:
        "logs/download/{family}-{name}.log",


use rule download_teacher as fetch_reference with:
    output:
        "resources/refs/{name}",
    params:
        key="refs/{name}",
    log:
        "logs/download/refs-{name}.log",


use rule download_teacher as download_detector with:
    output:
        "resources/detectors/{name}",
    params:
        key="detector/{name}",
    log:
        "logs/download/detector-{name}.log",


rule convert_teacher:
    input:
        "resources/downloads/teacher/{name}.pkl",
    output:
        "resources/teachers/{name}.pt",
    log:
        "logs/convert/teacher-{name}.log",
    shell:
        "sidcore convert-network --src {input} --out {output} > {log} 2>&1"


use rule convert_teacher as convert_generator with:
    input:
        "resources/downloads/{family}/{name}.pkl",
    output:
        "resources/generators/{family}/{name}.pt",
    wildcard_constraints:
        family="sid|sida|sid2a",
    log:
        "logs/convert/generator-{family}-{name}.log",


rule train_teacher:
    input:
        data=data_file,
    output:
        "resources/teachers/trained/{dataset}.pt",
    params:
        settings=lambda w: settings(w.dataset),
    log:
        "logs/train_teacher/{dataset}.log",
    shell:
        "sidcore train-teacher --settings {params.settings:q} --data {input.data} --out {output} > {log} 2>&1"


rule compute_reference:
    input:
        data=data_file,
        detector=detector_file,
    output:
        "resources/refs/computed/{dataset}.npz",
    params:
        detector=lambda w: DATASETS[w.dataset]["detector"]["name"],
    log:
        "logs/compute_reference/{dataset}.log",
    shell:
        "sidcore ref-stats --data {input.data} --detector {params.detector} --detector-weights {input.detector}"
        " --out {output} > {log} 2>&1"


rule train_detector:
    input:
        data=data_file,
    output:
        "resources/detectors/trained/{dataset}.pt",
    params:
        epochs=lambda w: DATASETS[w.dataset]["detector"].get("epochs", 20),
    log:
        "logs/train_detector/{dataset}.log",
    shell:
        "sidcore train-detector --data {input.data} --out {output} --seed 0 --epochs {params.epochs} > {log} 2>&1"
