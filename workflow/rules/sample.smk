# Sampling on the held-out seeds: the learned tables (epd, rdpo) and every baseline x NFE, one job each.
rule sample_table:
    input:
        stamps("sample"),
        files(CFG.sample.prompts),
        table=f"{RESULTS}/tables/{{kind}}-nfe{{nfe}}.json",
    output:
        directory(f"{RESULTS}/samples/{{kind}}-nfe{{nfe}}"),
    log:
        f"{RESULTS}/logs/sample-{{kind}}-nfe{{nfe}}.log",
    resources:
        gpu=GPU,
    shell:
        "epd sample --config {CONFIGFILE} --table {input.table} --outdir {output} {TRACK} > {log} 2>&1"


rule sample_baseline:
    input:
        stamps("sample"),
        files(CFG.sample.prompts),
    output:
        directory(f"{RESULTS}/samples/{{solver}}-nfe{{nfe}}"),
    log:
        f"{RESULTS}/logs/sample-{{solver}}-nfe{{nfe}}.log",
    resources:
        gpu=GPU,
    shell:
        "epd sample --config {CONFIGFILE} --solver {wildcards.solver} --nfe {wildcards.nfe} --outdir {output} "
        "{TRACK} > {log} 2>&1"
