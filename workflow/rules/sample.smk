# Sampling on the held-out seeds: the learned tables (epd, rdpo) and every baseline x NFE, one job each. Sharded
# (sample.shard_size): one job per shard of the seeds, then a gather job that checks every shard and makes the same
# folder as one job would (its PNGs hard-linked from the shards).
SHARD = "" if SAMPLE_SHARDS == 1 else ".shards/{shard}"
SPLIT = "" if SAMPLE_SHARDS == 1 else "--shard {wildcards.shard} "


rule sample_table:
    input:
        stamps("sample"),
        files(CFG.sample.prompts),
        table=f"{RESULTS}/tables/{{kind}}-nfe{{nfe}}.json",
    output:
        directory(f"{RESULTS}/samples/{{kind}}-nfe{{nfe}}{SHARD}"),
    log:
        f"{RESULTS}/logs/sample-{{kind}}-nfe{{nfe}}{SHARD.replace('.shards/', '-shard')}.log",
    resources:
        gpu=GPU,
    shell:
        "epd sample --config {CONFIGFILE} --table {input.table} --outdir {output} " + SPLIT + "{TRACK} > {log} 2>&1"


rule sample_baseline:
    input:
        stamps("sample"),
        files(CFG.sample.prompts),
    output:
        directory(f"{RESULTS}/samples/{{solver}}-nfe{{nfe}}{SHARD}"),
    log:
        f"{RESULTS}/logs/sample-{{solver}}-nfe{{nfe}}{SHARD.replace('.shards/', '-shard')}.log",
    resources:
        gpu=GPU,
    shell:
        "epd sample --config {CONFIGFILE} --solver {wildcards.solver} --nfe {wildcards.nfe} --outdir {output} "
        + SPLIT + "{TRACK} > {log} 2>&1"


if SAMPLE_SHARDS > 1:  # the gather jobs: the unsharded command, taking the shards' images instead of sampling

    rule sample_table_gather:
        input:
            stamps("sample"),
            shards=expand(f"{RESULTS}/samples/{{{{kind}}}}-nfe{{{{nfe}}}}.shards/{{shard}}", shard=range(SAMPLE_SHARDS)),
        output:
            directory(f"{RESULTS}/samples/{{kind}}-nfe{{nfe}}"),
        params:
            table=f"{RESULTS}/tables/{{kind}}-nfe{{nfe}}.json",
            shards=f"{RESULTS}/samples/{{kind}}-nfe{{nfe}}.shards",
        log:
            f"{RESULTS}/logs/sample-{{kind}}-nfe{{nfe}}.log",
        localrule: True  # checks and links files: no model
        shell:
            "epd sample --config {CONFIGFILE} --table {params.table} --outdir {output} --gather {params.shards} "
            "{TRACK} > {log} 2>&1"

    rule sample_baseline_gather:
        input:
            stamps("sample"),
            shards=expand(f"{RESULTS}/samples/{{{{solver}}}}-nfe{{{{nfe}}}}.shards/{{shard}}",
                          shard=range(SAMPLE_SHARDS)),
        output:
            directory(f"{RESULTS}/samples/{{solver}}-nfe{{nfe}}"),
        params:
            shards=f"{RESULTS}/samples/{{solver}}-nfe{{nfe}}.shards",
        log:
            f"{RESULTS}/logs/sample-{{solver}}-nfe{{nfe}}.log",
        localrule: True
        shell:
            "epd sample --config {CONFIGFILE} --solver {wildcards.solver} --nfe {wildcards.nfe} --outdir {output} "
            "--gather {params.shards} {TRACK} > {log} 2>&1"


# The reference: the converged solution of the same seeds and conditions, what every sample set's accuracy is
# measured against (sharded like the others); its own error against twice its steps in reference.json.
rule reference:
    input:
        stamps("sample"),
        files(CFG.sample.prompts),
    output:
        directory(f"{RESULTS}/samples/reference{SHARD}"),
    log:
        f"{RESULTS}/logs/sample-reference{SHARD.replace('.shards/', '-shard')}.log",
    resources:
        gpu=GPU,
    shell:
        "epd sample --config {CONFIGFILE} --solver reference --outdir {output} " + SPLIT + "{TRACK} > {log} 2>&1"


if SAMPLE_SHARDS > 1:

    rule reference_gather:
        input:
            stamps("sample"),
            shards=expand(f"{RESULTS}/samples/reference.shards/{{shard}}", shard=range(SAMPLE_SHARDS)),
        output:
            directory(f"{RESULTS}/samples/reference"),
        params:
            shards=f"{RESULTS}/samples/reference.shards",
        log:
            f"{RESULTS}/logs/sample-reference.log",
        localrule: True
        shell:
            "epd sample --config {CONFIGFILE} --solver reference --outdir {output} --gather {params.shards} "
            "{TRACK} > {log} 2>&1"
