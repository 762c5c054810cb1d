# Stage 1: fit an EPD table to the teacher trajectories (writes STEM.json/.safetensors/.loss.csv/.loss.png).
rule distill:
    input:
        stamps("distill"),
        teacher=f"{RESULTS}/teacher/nfe{{nfe}}",
    output:
        multiext(f"{RESULTS}/tables/epd-nfe{{nfe}}", ".json", ".safetensors", ".loss.csv", ".loss.png"),
    params:
        stem=f"{RESULTS}/tables/epd-nfe{{nfe}}",
    log:
        f"{RESULTS}/logs/distill-nfe{{nfe}}.log",
    resources:
        gpu=GPU,
    shell:
        "epd distill --config {CONFIGFILE} --nfe {wildcards.nfe} --teacher {input.teacher} --out {params.stem} "
        "{TRACK} > {log} 2>&1"
