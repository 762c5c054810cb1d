# Evaluation of one sample folder: OUT/per_image.csv and OUT/summary.json (contract 3).
rule evaluate:
    input:
        f"{RESULTS}/samples/{{name}}",
    output:
        f"{RESULTS}/eval/{{name}}/per_image.csv",
        f"{RESULTS}/eval/{{name}}/summary.json",
    params:
        out=f"{RESULTS}/eval/{{name}}",
        metrics=" ".join(config["evaluate"]["metrics"]),
        weights=" ".join(f"--weights {m}={shlex.quote(p)}" for m, p in config["evaluate"].get("weights", {}).items()),
        reference=flags({"reference_stats": config["evaluate"].get("reference_stats")}),
        tracking=tracking("evaluate-{name}"),
    resources:
        gpu=GPU,
    shell:
        "epd evaluate --samples {input} --metrics {params.metrics} {params.weights} {params.reference} "
        "--out {params.out} {params.tracking}"
