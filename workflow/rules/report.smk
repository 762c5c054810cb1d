# Summary table (solver x NFE x metrics) and plots: quality vs NFE, loss and reward curves, image grids; the outputs
# flagged report(...) are what `snakemake --report report.html` shows of a finished run.
# The inputs tell Snakemake what must exist; `epd report` reads them from the results folder.
rule report:
    input:
        evals=expand(f"{RESULTS}/eval/{{name}}/summary.json", name=SAMPLED),
        samples=expand(f"{RESULTS}/samples/{{name}}", name=SAMPLED),
        loss=expand(f"{RESULTS}/tables/epd-nfe{{nfe}}.loss.csv", nfe=CFG.pipeline.nfe),
        reward=expand(f"{RESULTS}/tables/rdpo-nfe{{nfe}}.metrics.csv", nfe=CFG.pipeline.nfe),
    output:
        f"{REPORT}/summary.md",
        report(f"{REPORT}/summary.csv", caption="../report/summary.rst", category="Summary"),
        report(f"{REPORT}/quality_vs_nfe.png", caption="../report/quality.rst", category="Summary"),
        report(f"{REPORT}/curves.png", caption="../report/curves.rst", category="Training"),
        report(f"{REPORT}/grids.png", caption="../report/grids.rst", category="Samples"),
    log:
        f"{RESULTS}/logs/report.log",
    localrule: True
    shell:
        "epd report --config {CONFIGFILE} --results {RESULTS} --out {REPORT} {TRACK} > {log} 2>&1"
