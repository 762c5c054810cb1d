# Stage 1: fit an EPD table to the teacher trajectories (writes STEM.json/.safetensors/.loss.csv/.loss.png), or take
# the finished table distill.start_tables names for this NFE (then no teacher runs for it).
def teacher_of(wildcards):
    return [] if int(wildcards.nfe) in CFG.distill.start_tables else [f"{RESULTS}/teacher/nfe{wildcards.nfe}"]


def start_table_of(wildcards):
    return [CFG.distill.start_tables[int(wildcards.nfe)]] if int(wildcards.nfe) in CFG.distill.start_tables else []


rule distill:
    input:
        stamps("distill"),
        teacher_of,
        start_table_of,
    output:
        multiext(f"{RESULTS}/tables/epd-nfe{{nfe}}", ".json", ".safetensors", ".loss.csv", ".loss.png"),
    params:
        stem=f"{RESULTS}/tables/epd-nfe{{nfe}}",
        teacher=f"{RESULTS}/teacher/nfe{{nfe}}",
    log:
        f"{RESULTS}/logs/distill-nfe{{nfe}}.log",
    resources:
        gpu=GPU,
    shell:
        "epd distill --config {CONFIGFILE} --nfe {wildcards.nfe} --teacher {params.teacher} --out {params.stem} "
        "{TRACK} > {log} 2>&1"
