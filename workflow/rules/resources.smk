# Inputs of the distillation: data, teachers, reference statistics, detectors, VAE, released generators.
# Downloads run where Snakemake runs (the login node on a cluster): compute jobs never use the network
# and find every artifact under resources/downloads/<registry key>.


rule download:
    output:
        "resources/downloads/{key}",
    log:
        "logs/download/{key}.log",
    benchmark:
        "benchmarks/download/{key}.tsv"
    wildcard_constraints:
        key="(?:" + "|".join(ARTIFACT_GROUPS) + ")/.+",
    localrule: True
    conda:
        SOFTWARE_ENV
    params:
        key="{key}",
        lock="resources/artifacts.lock.json",  # sha256 pinned on first download (sidcore.download)
    shell:
        "sidcore --log {log:q} download {params.key:q} --out {output:q} --lock {params.lock}"


rule prepare_data:
    input:
        unpack(prepare_inputs),
    output:
        "resources/data/{data}.zip",
    log:
        "logs/prepare_data/{data}.log",
    benchmark:
        "benchmarks/prepare_data/{data}.tsv"
    conda:
        SOFTWARE_ENV
    threads: cpu_threads
    resources:
        **cpu_resources(),
    params:
        settings=lambda w: settings(dataset_of_data(w.data), stage="prepare"),
        args=lambda w: prepare_args(w.data),
    shell:
        "sidcore --log {log:q} prepare-data --settings {params.settings:q} {params.args} --out {output}"


# Latent datasets are encoded by the VAE on a GPU: the same command, as a GPU stage.
rule encode_latents:
    input:
        unpack(prepare_inputs),
    output:
        "resources/data/{data}.zip",
    log:
        "logs/encode_latents/{data}.log",
    benchmark:
        "benchmarks/encode_latents/{data}.tsv"
    wildcard_constraints:
        data=LATENT_DATA,
    localrule: True
    conda:
        SOFTWARE_ENV
    threads: launch_threads("encode")
    resources:
        **gpu_resources("encode"),
    params:
        settings=lambda w: settings(dataset_of_data(w.data), stage="prepare"),
        args=lambda w: prepare_args(w.data),
    shell:
        "sidcore --log {log:q} {resources.launch} -- prepare-data --settings {params.settings:q} {params.args} --out {output}"


ruleorder: encode_latents > prepare_data


rule convert_teacher:
    input:
        "resources/downloads/teacher/{name}",
    output:
        "resources/teachers/{name}.pt",
    log:
        "logs/convert/teacher-{name}.log",
    benchmark:
        "benchmarks/convert/teacher-{name}.tsv"
    conda:
        SOFTWARE_ENV
    threads: cpu_threads
    resources:
        **cpu_resources(),
    params:
        network=lambda w: network_json(f"teacher/{w.name}"),
        sampling="",
    shell:
        "sidcore --log {log:q} convert-network --src {input} --out {output} --network {params.network:q} {params.sampling}"


use rule convert_teacher as convert_generator with:
    input:
        "resources/downloads/{family}/{name}",
    output:
        "resources/generators/{family}/{name}.pt",
    log:
        "logs/convert/generator-{family}-{name}.log",
    benchmark:
        "benchmarks/convert/generator-{family}-{name}.tsv"
    wildcard_constraints:
        family=METHOD_PATTERN,
    params:
        network=lambda w: network_json(f"{w.family}/{w.name}", generator=True),
        sampling=lambda w: f"--sampling {sampling_json(f'{w.family}/{w.name}')!r}",


rule train_teacher:
    input:
        data=data_file,
    output:
        "resources/teachers/trained/{dataset}.pt",
    log:
        "logs/train_teacher/{dataset}.log",
    benchmark:
        "benchmarks/train_teacher/{dataset}.tsv"
    conda:
        SOFTWARE_ENV
    threads: cpu_threads
    resources:
        **cpu_resources(),
    params:
        settings=lambda w: settings(w.dataset, stage="train_teacher"),
    shell:
        "sidcore --log {log:q} train-teacher --settings {params.settings:q} --data {input.data} --out {output}"


rule compute_reference:
    input:
        data=data_file,
        detector=detector_file,
    output:
        "resources/refs/computed/{dataset}.npz",
    log:
        "logs/compute_reference/{dataset}.log",
    benchmark:
        "benchmarks/compute_reference/{dataset}.tsv"
    conda:
        SOFTWARE_ENV
    threads: cpu_threads
    resources:
        **cpu_resources(),
    params:
        detector=lambda w: DATASETS[w.dataset]["detector"]["name"],
    shell:
        "sidcore --log {log:q} ref-stats --data {input.data} --detector {params.detector} --detector-weights {input.detector}"
        " --out {output}"


rule train_detector:
    input:
        data=data_file,
    output:
        "resources/detectors/trained/{dataset}.pt",
    log:
        "logs/train_detector/{dataset}.log",
    benchmark:
        "benchmarks/train_detector/{dataset}.tsv"
    conda:
        SOFTWARE_ENV
    threads: cpu_threads
    resources:
        **cpu_resources(),
    params:
        epochs=lambda w: DATASETS[w.dataset]["detector"].get("epochs", 20),
    shell:
        "sidcore --log {log:q} train-detector --data {input.data} --out {output} --seed 0 --epochs {params.epochs}"
