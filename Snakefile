# epd pipeline: teacher trajectories -> distillation -> RDPO (and learned peers: LD3) -> samples -> evaluation -> report.
# From the repository root:  snakemake --profile default   (or --profile slurm; an experiment: --configfile
# config/sd15.yaml). dvc.yaml declares the same jobs (tests/system/test_dvc.py checks that the two agree).
from snakemake.utils import min_version

min_version("9.0")


# An experiment's --configfile replaces the embedded default instead of being merged into it (merged, the default's
# backbone options would reach another backbone).
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/teacher.smk"
include: "workflow/rules/distill.smk"
include: "workflow/rules/ld3.smk"
include: "workflow/rules/rdpo.smk"
include: "workflow/rules/sample.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        f"{REPORT}/summary.md",


# Every invocation that runs jobs gets its own MLflow pipeline run; its stage runs nest under it.
onstart:
    shell(f"epd pipeline-run start --config {CONFIGFILE} --out {PARENT_RUN}")


onsuccess:
    shell(f"epd pipeline-run end {PARENT_RUN} --status FINISHED --commit-dvc")
    if os.path.exists(f"{REPORT}/summary.md"):  # not after --until an earlier stage
        print(open(f"{REPORT}/summary.md").read())
    print(f"MLflow UI: mlflow ui --backend-store-uri {CFG.tracking.uri}  (then open http://127.0.0.1:5000)")


onerror:
    shell(f"epd pipeline-run end {PARENT_RUN} --status FAILED")
