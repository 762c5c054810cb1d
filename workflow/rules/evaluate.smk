# Evaluation of one sample folder against the reference of the same seeds: OUT/per_image.csv and OUT/summary.json.
# The reference folder is evaluated too: its row is the floor of the metrics that compare with data.
rule evaluate:
    input:
        stamps("evaluate"),
        samples=f"{RESULTS}/samples/{{name}}",
        reference=f"{RESULTS}/samples/reference",
    output:
        f"{RESULTS}/eval/{{name}}/per_image.csv",
        f"{RESULTS}/eval/{{name}}/summary.json",
    params:
        out=f"{RESULTS}/eval/{{name}}",
    log:
        f"{RESULTS}/logs/evaluate-{{name}}.log",
    resources:
        gpu=GPU,
    shell:
        "epd evaluate --config {CONFIGFILE} --samples {input.samples} --reference {input.reference} "
        "--out {params.out} {TRACK} > {log} 2>&1"
