# Teacher trajectories on the student grid of each distilled NFE (the grid length depends on the NFE).
rule teacher:
    input:
        PARENT_RUN,
    output:
        directory(f"{RESULTS}/teacher/nfe{{nfe}}"),
    params:
        backbone=BACKBONE,
        schedule=SCHEDULE,
        t=config["teacher"],
        tracking=tracking("teacher-nfe{nfe}"),
    resources:
        gpu=GPU,
    shell:
        "epd teacher {params.backbone} {params.schedule} --nfe {wildcards.nfe} --solver {params.t[solver]} "
        "--inserted-steps {params.t[inserted_steps]} --seeds {params.t[seeds]} --batch {params.t[batch]} "
        "--shard-size {params.t[shard_size]} --out {output} --no-progress {params.tracking}"
