# Stage 2: RDPO fine-tunes the distilled table as a Dirichlet policy on the reward. Its resume checkpoint
# (STEM.ckpt.safetensors) is left undeclared, so that Snakemake does not delete it before a rerun.
rule rdpo:
    input:
        stamps("rdpo"),
        files(CFG.rdpo.prompts),
        table=f"{RESULTS}/tables/epd-nfe{{nfe}}.json",
    output:
        multiext(f"{RESULTS}/tables/rdpo-nfe{{nfe}}", ".json", ".safetensors", ".metrics.csv", ".metrics.png"),
    params:
        stem=f"{RESULTS}/tables/rdpo-nfe{{nfe}}",
    log:
        f"{RESULTS}/logs/rdpo-nfe{{nfe}}.log",
    resources:
        gpu=GPU * CFG.rdpo.processes,  # rdpo.processes > 1: epd runs itself under torchrun, one GPU each
    shell:
        "epd rdpo --config {CONFIGFILE} --table {input.table} --out {params.stem} {TRACK} > {log} 2>&1"
