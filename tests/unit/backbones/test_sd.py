"""The SD1.5 and SD3 backbones on tiny pipelines of the real architectures, built here from configs (no download).

A session fixture builds a StableDiffusionPipeline (UNet2DConditionModel, AutoencoderKL with SD's 8× latent
downsampling, CLIPTextModel) and a StableDiffusion3Pipeline (SD3Transformer2DModel with 16 latent channels, two
CLIPTextModelWithProjection, a T5 encoder), with tokenizers made from a small vocabulary written to tmp files,
saves them with ``save_pretrained`` and loads them back through the backbones' ``model_path``.

Oracles: the pipelines themselves. Our Euler on the scheduler's grid reproduces ``pipeline(..., latents=…)`` (CFG,
negative prompt, scheduler steps, VAE decoding) to 1e-5, for SD1.5 with EulerDiscreteScheduler (ε-prediction mapped
to σ-space) and SD3 with FlowMatchEulerDiscreteScheduler (D = x − t·v). Float32 throughout; the 1e-5 tolerance on
the max-abs error relative to the state's max-abs covers float32 rounding in a different order (observed 1e-6 and 5e-7),
while a timestep one training step off gives 1e-2 (SD1.5) and t·999 instead of t·1000 gives 3e-3 (SD3).
"""
from __future__ import annotations

import pytest
import torch

from tiny_diffusers import clip_config, clip_tokenizer, t5_tokenizer, tiny_vae

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from epd import schedules  # noqa: E402
from epd.backbones import load_backbone  # noqa: E402
from epd.backbones.sd import StableDiffusion3, sigma_to_t  # noqa: E402
from epd.solvers import BASELINES, handset_table, sample_epd, sample_euler  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning",
                                        "ignore:__array__ implementation doesn't accept a copy keyword")

RES = 64           # image side: 8×8 latents
SEQ = 16           # T5 tokens for SD3
PROMPTS = ["a red cat", "the sea at night"]
TOL = 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# --- tiny pipelines ------------------------------------------------------------------------------------------------

def build_sd15(folder, tok_folder):
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    tok = clip_tokenizer(tok_folder)
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=RES // 8, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                norm_num_groups=4, attention_head_dim=4)
    # SD1.5's scheduler_config.json (PNDM, scaled-linear betas, leading spacing with offset 1).
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(vae=tiny_vae(4, RES), text_encoder=CLIPTextModel(clip_config(len(tok))), tokenizer=tok,
                                   unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder)


def build_sd3(folder, tok_folder):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(0)
    tok = clip_tokenizer(tok_folder)
    t5 = T5EncoderModel(T5Config(vocab_size=64, d_model=64, d_kv=8, d_ff=37, num_layers=1, num_heads=4,
                                 relative_attention_num_buckets=8))
    transformer = SD3Transformer2DModel(sample_size=RES // 8, patch_size=2, in_channels=16, out_channels=16,
                                        num_layers=2, attention_head_dim=8, num_attention_heads=4,
                                        caption_projection_dim=32, joint_attention_dim=64, pooled_projection_dim=64)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),  # SD3-Medium's shift
        vae=tiny_vae(16, RES, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=CLIPTextModelWithProjection(clip_config(len(tok))), tokenizer=tok,
        text_encoder_2=CLIPTextModelWithProjection(clip_config(len(tok))), tokenizer_2=tok,
        text_encoder_3=t5, tokenizer_3=t5_tokenizer())
    pipe.save_pretrained(folder)


@pytest.fixture(scope="session")
def sd_folders(tmp_path_factory):
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    root = tmp_path_factory.mktemp("sd")
    build_sd15(root / "sd15", root / "tok15")
    build_sd3(root / "sd3", root / "tok3")
    return {"sd15": root / "sd15", "sd3": root / "sd3"}


@pytest.fixture(scope="session")
def backbones(sd_folders):
    """Each backbone loaded once through model_path; tests derive variants with ``pipeline=bb.pipe``."""
    return {"sd15": load_backbone("sd15", model_path=sd_folders["sd15"], local_files_only=True),
            "sd3": load_backbone("sd3", model_path=sd_folders["sd3"], local_files_only=True, max_sequence_length=SEQ)}


def variant(bb, **options):
    """The same pipeline behind another backbone object (other guidance, max_batch …)."""
    if isinstance(bb, StableDiffusion3):
        options.setdefault("max_sequence_length", bb.max_sequence_length)
    return type(bb)(pipeline=bb.pipe, **options)


def grid(bb, n: int) -> torch.Tensor:
    if isinstance(bb, StableDiffusion3):
        return schedules.flow_match(n, **bb.schedule_args("flow_match"))
    return schedules.discrete(n)


# --- loading -------------------------------------------------------------------------------------------------------

def test_defaults_and_shapes(backbones):
    sd15, sd3 = backbones["sd15"], backbones["sd3"]
    assert sd15.guidance == 7.5 and sd3.guidance == 4.5
    assert sd15.sigma_min == pytest.approx(0.0292, abs=1e-4) and sd15.sigma_max == pytest.approx(14.6146, abs=1e-4)
    assert sd3.sigma_max == 1.0 and sd3.flow_args["shift"] == 3.0
    assert sd3.sigma_min == pytest.approx(float(schedules.flow_match(5, shift=3.0)[-1]))
    assert sd15.shape == (4, RES // 8, RES // 8) and sd3.shape == (16, RES // 8, RES // 8)
    assert sd15.resolution == (RES, RES)
    assert variant(sd3, resolution=128).shape == (16, 16, 16)
    with pytest.raises(ValueError, match="multiple of 16"):
        variant(sd3, resolution=72)


@pytest.mark.parametrize("kind", ["sd15", "sd3"])
def test_missing_model_path_is_a_clear_error(kind, tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match=r"no-such-model.*does not exist.*diffusers pipeline folder.*hub id"):
        load_backbone(kind, model_path=missing)
    with pytest.raises(FileNotFoundError, match=r"no model_index.json.*diffusers pipeline folder"):
        load_backbone(kind, model_path=tmp_path)
    with pytest.raises(ValueError, match="model_path"):
        load_backbone(kind)


def test_cpu_offload_without_accelerator_is_refused(backbones):
    if torch.cuda.is_available():
        pytest.skip("an accelerator is present")
    with pytest.raises(ValueError, match="cpu_offload"):
        variant(backbones["sd15"], cpu_offload=True)


def test_sd15_sigma_to_t_hits_training_timesteps_exactly():
    train = schedules.discrete_sigmas()
    t = sigma_to_t(train, train)
    assert torch.equal(t, torch.arange(1000, dtype=torch.float64))
    mid = (train[:-1].log() + train[1:].log()).div(2).exp()  # halfway in log σ → halfway in t
    torch.testing.assert_close(sigma_to_t(mid, train), torch.arange(1000, dtype=torch.float64)[:-1] + 0.5)
    assert sigma_to_t(torch.tensor([1e-4, 100.0]), train).tolist() == [0.0, 999.0]


# --- the denoiser --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["sd15", "sd3"])
def test_guidance_batches_uncond_and_cond(kind, backbones):
    bb = backbones[kind]
    x = bb.noise([0, 1]) * 0.5
    sigma = torch.tensor([0.7, 0.3]) * bb.sigma_max
    cond = bb.encode(prompts=PROMPTS)
    with torch.no_grad():
        d_c = variant(bb, guidance=1.0)(x, sigma, cond)
        d_u = bb(x, sigma, None)
        d_w = variant(bb, guidance=7.5)(x, sigma, cond)
        assert torch.equal(d_c, bb.denoise_rows(x, sigma, cond))        # w = 1: the conditional rows alone
        torch.testing.assert_close(variant(bb, guidance=0.0)(x, sigma, cond), d_u, rtol=0, atol=1e-5)
    assert _rel(d_c, d_u) > 1e-3                                         # the prompt matters
    assert _rel(d_w, d_c) > 1e-3                                         # so does the guidance
    torch.testing.assert_close(d_w, d_u + 7.5 * (d_c - d_u), rtol=0, atol=1e-4)
    # Per-row negative prompts replace the backbone's "" and are used as the unconditional rows.
    neg = bb.encode(prompts=PROMPTS, negative_prompts=["blurry", "dark"])
    with torch.no_grad():
        d_neg = variant(bb, guidance=1.0)(x, sigma, {k[len("negative_"):]: v for k, v in neg.items()
                                                       if k.startswith("negative_")})
        torch.testing.assert_close(variant(bb, guidance=0.0)(x, sigma, neg), d_neg, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["sd15", "sd3"])
def test_denoiser_is_differentiable_in_sigma(kind, backbones):
    """Distillation learns EPD's time scales through the σ the denoiser is told (sd15: through t(σ) and c_in)."""
    bb = backbones[kind]
    sigma = (torch.tensor([0.6, 0.2]) * bb.sigma_max).requires_grad_()
    bb(bb.noise([0, 1]) * 0.6, sigma, bb.encode(prompts=PROMPTS)).square().sum().backward()
    assert bool(torch.isfinite(sigma.grad).all()) and bool((sigma.grad != 0).all())


@pytest.mark.parametrize("kind", ["sd15", "sd3"])
def test_epd_makes_one_call_of_b_k_rows_and_chunks_agree(kind, backbones, sd_folders):
    """EPD's K points go in one call of 2·B·K rows; max_batch splits it without changing the result: exactly up to
    rounding in float64 (loaded with dtype="float64"), and to float32 rounding in float32."""
    bb = backbones[kind]
    rows: list[int] = []
    hook = bb.network.register_forward_pre_hook(lambda m, args, kwargs: rows.append(
        (args[0] if args else kwargs["hidden_states"]).shape[0]), with_kwargs=True)
    x, cond, sigmas = bb.noise([3, 4]), bb.encode(prompts=PROMPTS), grid(bb, 3)
    table = handset_table(num_steps=3, num_points=3)  # K = 3, AFS: calls at steps 0 (K points), 1, 1 (K points)
    try:
        with torch.no_grad():
            whole = sample_epd(bb, x, sigmas, table, cond=cond)
            assert rows == [2 * 2 * 3, 2 * 2, 2 * 2 * 3]
            rows.clear()
            chunked = sample_epd(variant(bb, max_batch=5), x, sigmas, table, cond=cond)
            assert rows == [5, 5, 2, 4, 5, 5, 2]
            xs, sig = bb.noise(range(6)), torch.linspace(0.9, 0.1, 6) * bb.sigma_max
            c6 = bb.encode(prompts=PROMPTS * 3)
            assert _rel(variant(bb, max_batch=5)(xs, sig, c6), bb(xs, sig, c6)) < 1e-6   # one guided call
    finally:
        hook.remove()
    assert _rel(chunked, whole) < 1e-5  # three guided calls of float32 rounding (observed ~4e-6 for sd3)

    opts = {"max_sequence_length": SEQ} if kind == "sd3" else {}
    bb64 = load_backbone(kind, model_path=sd_folders[kind], dtype="float64", local_files_only=True, **opts)
    assert bb64.dtype == torch.float64
    x64, cond64 = bb64.noise([3, 4], dtype=torch.float64), bb64.encode(prompts=PROMPTS)
    with torch.no_grad():
        whole = sample_epd(bb64, x64, sigmas, table, cond=cond64)
        chunked = sample_epd(variant(bb64, max_batch=5), x64, sigmas, table, cond=cond64)
    assert _rel(chunked, whole) < 1e-12


# --- sampling ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["sd15", "sd3"])
@pytest.mark.parametrize("solver", ["epd", "euler", "heun", "dpmpp_2m"])
def test_solvers_sample_deterministically_by_seed(kind, solver, backbones):
    bb = backbones[kind]

    def run(seeds, prompts):
        x, cond = bb.noise(seeds), bb.encode(prompts=prompts)
        with torch.no_grad():
            if solver == "epd":
                return sample_epd(bb, x, grid(bb, 3), handset_table(num_steps=3, num_points=2), cond=cond)
            return BASELINES[solver](bb, x, schedules.append_zero(grid(bb, 3)), cond=cond)

    out = run([0, 1], PROMPTS)
    assert out.shape == (2, *bb.shape) and bool(torch.isfinite(out).all())
    assert torch.equal(run([0, 1], PROMPTS), out)                   # same seeds, same samples
    assert _rel(run([1], PROMPTS[1:])[0], out[1]) < TOL             # its seed, not the batch (float32 rounding)
    assert _rel(out[0], out[1]) > 1e-2


@pytest.mark.parametrize("kind", ["sd15", "sd3"])
def test_decode(kind, backbones):
    bb = backbones[kind]
    x = bb.noise([0, 1, 2]) / bb.sigma_max
    px = bb.to_pixels(x)
    assert px.shape == (3, 3, RES, RES) and px.dtype == torch.float32
    assert 0 <= float(px.min()) and float(px.max()) <= 1
    img = bb.decode(x)
    assert img.dtype == torch.uint8 and img.shape == (3, 3, RES, RES)
    torch.testing.assert_close(variant(bb, max_batch=2).to_pixels(x), px, rtol=0, atol=1e-5)  # float32 rounding


# --- against the diffusers pipelines -------------------------------------------------------------------------------

def test_sd15_euler_equals_pipeline_with_euler_discrete_scheduler(backbones):
    """Our Euler in σ-space on ``discrete(n)`` = StableDiffusionPipeline + EulerDiscreteScheduler (VP, ε, CFG)."""
    from diffusers import EulerDiscreteScheduler

    bb = backbones["sd15"]
    pipe = bb.pipe
    scheduler = pipe.scheduler
    pipe.scheduler = EulerDiscreteScheduler.from_config(scheduler.config)
    try:
        n = 5
        pipe.scheduler.set_timesteps(n)
        sigmas = schedules.append_zero(schedules.discrete(n))
        torch.testing.assert_close(pipe.scheduler.sigmas.double(), sigmas, rtol=1e-5, atol=0)
        x = bb.noise([0, 1]) / bb.sigma_max * sigmas[0].float()
        with torch.no_grad():
            ours = sample_euler(bb, x, sigmas, cond=bb.encode(prompts=PROMPTS))
            # The pipeline multiplies its latents by init_noise_sigma = sqrt(σ_0² + 1): hand it x / that.
            kwargs = dict(prompt=PROMPTS, num_inference_steps=n, guidance_scale=bb.guidance, height=RES, width=RES,
                          latents=x / pipe.scheduler.init_noise_sigma)
            theirs = pipe(**kwargs, output_type="latent").images
            images = pipe(**kwargs, output_type="pt").images
    finally:
        pipe.scheduler = scheduler
    assert _rel(ours, theirs) < TOL
    torch.testing.assert_close(bb.to_pixels(ours), images, rtol=0, atol=1e-4)


def test_sd3_euler_equals_pipeline_and_flow_match_step(backbones):
    """D = x − t·v: our Euler on ``flow_match(n, shift=3)`` = StableDiffusion3Pipeline (FlowMatchEulerDiscrete)."""
    bb = backbones["sd3"]
    pipe, n = bb.pipe, 4
    pipe.scheduler.set_timesteps(n)
    sigmas = schedules.append_zero(schedules.flow_match(n, **bb.schedule_args("flow_match")))
    torch.testing.assert_close(pipe.scheduler.sigmas.double(), sigmas, rtol=1e-6, atol=0)
    x, cond = bb.noise([0, 1]), bb.encode(prompts=PROMPTS)
    with torch.no_grad():
        # One step against FlowMatchEulerDiscreteScheduler.step with the same (guided) model output v = (x − D)/t.
        t0 = pipe.scheduler.timesteps[0]
        d = bb(x, sigmas[0].float().expand(2), cond)
        v = (x - d) / sigmas[0].float()
        theirs_step = pipe.scheduler.step(v, t0, x).prev_sample
        assert _rel(sample_euler(bb, x, sigmas[:2], cond=cond), theirs_step) < TOL

        ours = sample_euler(bb, x, sigmas, cond=cond)
        kwargs = dict(prompt=PROMPTS, num_inference_steps=n, guidance_scale=bb.guidance, height=RES, width=RES,
                      latents=x, max_sequence_length=SEQ)
        theirs = pipe(**kwargs, output_type="latent").images
        images = pipe(**kwargs, output_type="pt").images
    assert _rel(ours, theirs) < TOL
    torch.testing.assert_close(bb.to_pixels(ours), images, rtol=0, atol=1e-4)


# --- command line --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, schedule", [("sd15", "discrete"), ("sd3", "flow_match")])
def test_epd_sample_cli(kind, schedule, sd_folders, tmp_path):
    from PIL import Image

    from epd.cli import main

    out = tmp_path / "out"
    argv = ["sample", "--backbone", kind, "--model-path", str(sd_folders[kind]), "--prompt", "a red cat",
            "--seeds", "0-2", "--solver", "epd", "--nfe", "3", "--schedule", schedule, "--max-batch", "4",
            "--outdir", str(out), "--no-progress"]
    assert main(argv) == 0
    pngs = sorted(out.rglob("*.png"))
    assert [p.name for p in pngs] == ["000000.png", "000001.png", "000002.png"]
    with Image.open(pngs[0]) as img:
        assert img.size == (RES, RES) and img.mode == "RGB"
    assert main([*argv, "--grid"]) == 0
    with Image.open(out / "grid.png") as img:
        assert img.size == (2 * RES + 1, 2 * RES + 1)  # 2×2 tiles and a 1-pixel separator
    assert main(["sample", "--backbone", kind, "--model-path", str(tmp_path / "nowhere"), "--outdir", str(out)]) == 2


@pytest.mark.parametrize("kind, schedule", [("sd15", "discrete"), ("sd3", "flow_match")])
def test_teacher_and_distill_cli_on_prompts(kind, schedule, sd_folders, backbones, tmp_path):
    """Stage 1 on a text-to-image backbone: the teacher's grid is the backbone's (σ range, SD3's shift), its
    trajectories follow the prompts, and distillation replays them with the same prompts."""
    from epd.cli import main
    from epd.teacher import load_manifest, load_teacher

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\na blue house\n")
    model = ["--backbone", kind, "--model-path", str(sd_folders[kind]), "--schedule", schedule]
    teacher = tmp_path / "teacher"
    assert main(["teacher", *model, "--nfe", "3", "--seeds", "0-3", "--prompt-file", str(prompts),
                 "--inserted-steps", "1", "--batch", "2", "--out", str(teacher), "--no-progress"]) == 0
    manifest = load_manifest(teacher)
    bb = backbones[kind]
    torch.testing.assert_close(torch.tensor(manifest["sigmas"], dtype=torch.float64), grid(bb, 3))
    data = load_teacher(teacher)
    assert data["cond_ids"].tolist() == [0, 1, 0, 1]
    # a different prompt gives a different trajectory from the same seed
    other = tmp_path / "other.txt"
    other.write_text("a green tree\n")
    assert main(["teacher", *model, "--nfe", "3", "--seeds", "0-3", "--prompt-file", str(other),
                 "--inserted-steps", "1", "--batch", "2", "--out", str(tmp_path / "t2"), "--no-progress"]) == 0
    assert not torch.allclose(load_teacher(tmp_path / "t2")["states"][0, -1], data["states"][0, -1])
    out = tmp_path / "table"
    assert main(["distill", "--teacher", str(teacher), "--nfe", "3", "--iterations", "3", "--batch", "2",
                 "--checkpoint-every", "3", "--out", str(out), "--no-progress"]) == 0
    from epd.solvers import load_table

    table = load_table(f"{out}.json")
    assert table.meta.backbone == bb.name and table.meta.schedule_args == manifest["config"]["schedule_args"]
    torch.testing.assert_close(table.meta.sigmas(), grid(bb, 3))
