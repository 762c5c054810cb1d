# Evaluation of one sample folder: OUT/per_image.csv and OUT/summary.json.
rule evaluate:
    input:
        stamps("evaluate"),
        samples=f"{RESULTS}/samples/{{name}}",
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
        "epd evaluate --config {CONFIGFILE} --samples {input.samples} --out {params.out} {TRACK} > {log} 2>&1"
