# Stage 1: fit an EPD table to the teacher trajectories (writes STEM.json/.safetensors/.loss.csv/.loss.png).
rule distill:
    input:
        teacher=f"{RESULTS}/teacher/nfe{{nfe}}",
    output:
        multiext(f"{RESULTS}/tables/epd-nfe{{nfe}}", ".json", ".safetensors", ".loss.csv", ".loss.png"),
    params:
        stem=f"{RESULTS}/tables/epd-nfe{{nfe}}",
        d=config["distill"],
        plugin="--plugin" if config["distill"]["plugin"] else "",
        tracking=tracking("distill-nfe{nfe}"),
    resources:
        gpu=GPU,
    shell:
        "epd distill --teacher {input.teacher} --nfe {wildcards.nfe} --num-points {params.d[num_points]} "
        "{params.plugin} --iterations {params.d[iterations]} --batch {params.d[batch]} --lr {params.d[lr]} "
        "--scale-bound {params.d[scale_bound]} --seed {params.d[seed]} --backbone {config[backbone][name]} "
        "--schedule {config[schedule][name]} --out {params.stem} --no-progress {params.tracking}"
