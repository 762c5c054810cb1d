# Teacher trajectories on the student grid of each learned NFE (the grid length depends on the NFE). Sharded
# (teacher.shard_size): one job per shard of the seeds, then a gather job that checks every shard and makes the same
# folder as one job would.
if TEACHER_SHARDS == 1:

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

else:

    rule teacher_shard:
        input:
            stamps("teacher"),
            files(CFG.teacher.prompts),
        output:
            directory(f"{RESULTS}/teacher/nfe{{nfe}}.shards/{{shard}}"),
        log:
            f"{RESULTS}/logs/teacher-nfe{{nfe}}-shard{{shard}}.log",
        resources:
            gpu=GPU,
        shell:
            "epd teacher --config {CONFIGFILE} --nfe {wildcards.nfe} --out {output} --shard {wildcards.shard} "
            "{TRACK} > {log} 2>&1"

    rule teacher:
        input:
            stamps("teacher"),
            shards=expand(f"{RESULTS}/teacher/nfe{{{{nfe}}}}.shards/{{shard}}", shard=range(TEACHER_SHARDS)),
        output:
            directory(f"{RESULTS}/teacher/nfe{{nfe}}"),
        params:
            shards=f"{RESULTS}/teacher/nfe{{nfe}}.shards",
        log:
            f"{RESULTS}/logs/teacher-nfe{{nfe}}.log",
        localrule: True  # checks and links files: no model
        shell:
            "epd teacher --config {CONFIGFILE} --nfe {wildcards.nfe} --out {output} --gather {params.shards} "
            "{TRACK} > {log} 2>&1"
