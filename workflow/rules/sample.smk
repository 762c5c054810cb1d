# Sampling on the held-out seeds: the learned tables (epd, rdpo) and every baseline x NFE, one parallel job each.
# Each writes DIR/samples.csv + PNGs (contract 2).
rule sample_table:
    input:
        table=f"{RESULTS}/tables/{{kind}}-nfe{{nfe}}.json",
        prompts=config["sample"]["prompts"],
    output:
        directory(f"{RESULTS}/samples/{{kind}}-nfe{{nfe}}"),
    params:
        backbone=BACKBONE,
        s=config["sample"],
        tracking=tracking("sample-{kind}-nfe{nfe}"),
    resources:
        gpu=GPU,
    shell:
        "epd sample {params.backbone} --table {input.table} --seeds {params.s[seeds]} --prompt-file {input.prompts} "
        "--batch {params.s[batch]} --outdir {output} --no-progress {params.tracking}"


rule sample_baseline:
    input:
        PARENT_RUN,
        prompts=config["sample"]["prompts"],
    output:
        directory(f"{RESULTS}/samples/{{solver}}-nfe{{nfe}}"),
    params:
        backbone=BACKBONE,
        schedule=SCHEDULE,
        s=config["sample"],
        tracking=tracking("sample-{solver}-nfe{nfe}"),
    resources:
        gpu=GPU,
    shell:
        "epd sample {params.backbone} --solver {wildcards.solver} --nfe {wildcards.nfe} {params.schedule} "
        "--seeds {params.s[seeds]} --prompt-file {input.prompts} --batch {params.s[batch]} --outdir {output} "
        "--no-progress {params.tracking}"
