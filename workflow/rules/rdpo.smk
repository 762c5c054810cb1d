# Stage 2: RDPO fine-tunes the distilled table as a Dirichlet policy on the reward (contract 4).
rule rdpo:
    input:
        table=f"{RESULTS}/tables/epd-nfe{{nfe}}.json",
        prompts=config["rdpo"]["prompts"],
    output:
        multiext(f"{RESULTS}/tables/rdpo-nfe{{nfe}}", ".json", ".safetensors", ".metrics.csv", ".metrics.png"),
    params:
        stem=f"{RESULTS}/tables/rdpo-nfe{{nfe}}",
        backbone=BACKBONE,
        reward=shlex.quote(json.dumps(config["rdpo"]["reward"])),
        scorers=" ".join(f"--scorer-weights {k}={shlex.quote(p)}" for k, p in config["evaluate"].get("weights", {}).items()),
        r=config["rdpo"],
        p=config["rdpo"]["ppo"],
        tracking=tracking("rdpo-nfe{nfe}"),
    resources:
        gpu=GPU,
    shell:
        "epd rdpo --table {input.table} --out {params.stem} {params.backbone} --reward {params.reward} {params.scorers} "
        "--prompt-file {input.prompts} --steps {params.p[steps]} --rollout-batch-size {params.p[rollout_batch_size]} "
        "--rloo-k {params.p[rloo_k]} --ppo-epochs {params.p[ppo_epochs]} --minibatch-size {params.p[minibatch_size]} "
        "--learning-rate {params.p[learning_rate]} --clip-range {params.p[clip_range]} --kl-coef {params.p[kl_coef]} "
        "--entropy-coef {params.p[entropy_coef]} --max-grad-norm {params.p[max_grad_norm]} "
        "--dirichlet-concentration {params.p[dirichlet_concentration]} --save-interval {params.p[save_interval]} "
        "--seed {params.r[seed]} --no-progress {params.tracking}"
