# Teacher trajectories on the student grid of each learned NFE (the grid length depends on the NFE).
rule teacher:
    input:
        stamps("teacher"),
        files(CFG.teacher.prompts),
    output:
        directory(f"{RESULTS}/teacher/nfe{{nfe}}"),
    log:
        f"{RESULTS}/logs/teacher-nfe{{nfe}}.log",
    resources:
        gpu=GPU,
    shell:
        "epd teacher --config {CONFIGFILE} --nfe {wildcards.nfe} --out {output} {TRACK} > {log} 2>&1"
