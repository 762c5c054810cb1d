# The learned-grid peer (pipeline.peers: ld3): the ld3.solver's grid fitted to the teacher of the same NFE (EPD's,
# shared: only its first and last states are read). Writes STEM.json (the grid, sampled like a table),
# STEM.loss.csv and STEM.loss.png.
rule ld3:
    input:
        stamps("ld3"),
        teacher=f"{RESULTS}/teacher/nfe{{nfe}}",
    output:
        multiext(f"{RESULTS}/tables/ld3-nfe{{nfe}}", ".json", ".loss.csv", ".loss.png"),
    params:
        stem=f"{RESULTS}/tables/ld3-nfe{{nfe}}",
    log:
        f"{RESULTS}/logs/ld3-nfe{{nfe}}.log",
    resources:
        gpu=GPU,
    shell:
        "epd ld3 --config {CONFIGFILE} --nfe {wildcards.nfe} --teacher {input.teacher} --out {params.stem} "
        "{TRACK} > {log} 2>&1"
