# Summary table (solver x NFE x metrics) and plots: quality vs NFE, loss and reward curves, image grids.
# The inputs tell Snakemake what must exist; `epd report` reads them from the results folder.
rule report:
    input:
        evals=expand(f"{RESULTS}/eval/{{name}}/summary.json", name=SAMPLED),
        samples=expand(f"{RESULTS}/samples/{{name}}", name=SAMPLED),
        loss=expand(f"{RESULTS}/tables/epd-nfe{{nfe}}.loss.csv", nfe=CFG.pipeline.nfe),
        reward=expand(f"{RESULTS}/tables/rdpo-nfe{{nfe}}.metrics.csv", nfe=CFG.pipeline.nfe),
    output:
        multiext(f"{REPORT}/", "summary.md", "summary.csv", "quality_vs_nfe.png", "curves.png", "grids.png"),
    log:
        f"{RESULTS}/logs/report.log",
    localrule: True
    shell:
        "epd report --config {CONFIGFILE} --results {RESULTS} --out {REPORT} {TRACK} > {log} 2>&1"
