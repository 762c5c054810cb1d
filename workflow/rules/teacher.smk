# Teacher trajectories on the student grid of each distilled NFE (the grid length depends on the NFE), conditioned
# like the samples the tables will make (teacher.labels, or teacher.prompts for
# text-to-image).
rule teacher:
    input:
        PARENT_RUN,
    output:
        directory(f"{RESULTS}/teacher/nfe{{nfe}}"),
    params:
        backbone=BACKBONE,
        schedule=SCHEDULE,
        t=config["teacher"],
        cond=flags({"labels": config["teacher"].get("labels"), "prompt_file": config["teacher"].get("prompts")}),
        tracking=tracking("teacher-nfe{nfe}"),
    resources:
        gpu=GPU,
    shell:
        "epd teacher {params.backbone} {params.schedule} --nfe {wildcards.nfe} --solver {params.t[solver]} "
        "--inserted-steps {params.t[inserted_steps]} --seeds {params.t[seeds]} {params.cond} --batch {params.t[batch]} "
        "--shard-size {params.t[shard_size]} --out {output} --no-progress {params.tracking}"
