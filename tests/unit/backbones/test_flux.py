"""The FLUX.1 backbone on a tiny FluxPipeline of the real architecture, built here from configs (no download).

The pipeline: FluxTransformer2DModel (packed 2×2 patches, guidance embedding, RoPE over text and patch ids), a
four-level AutoencoderKL (8× downsampling, FLUX's scaling and shift factors), CLIPTextModel and T5EncoderModel with
tokenizers from small vocabularies, and FLUX.1-dev's scheduler config (dynamic shifting). Saved with
``save_pretrained`` and loaded through the backbone's ``model_path``.

Oracle: the pipeline itself. Its first step from the same latents (captured by ``callback_on_step_end``) is our Euler
step with D = x − t·v, and a whole run of our Euler on the pipeline's grid is the pipeline's output, latents and
decoded images. Float32 tolerances as in tests/unit/backbones/test_sd.py (float32 rounding in another order is ~1e-6).
"""
from __future__ import annotations

import pytest
import torch

from tiny_diffusers import clip_config, clip_tokenizer, t5_tokenizer, tiny_vae

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from epd import schedules  # noqa: E402
from epd.backbones import Flux, load_backbone  # noqa: E402
from epd.solvers import handset_table, sample_epd, sample_euler  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")

RES = 64            # image side: 8×8 latents, 16 packed tokens
SEQ = 16            # T5 tokens
PROMPTS = ["a red cat", "the sea at night"]
TOL = 1e-5
# FLUX.1-dev's scheduler_config.json.
FLUX_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                      base_image_seq_len=256, max_image_seq_len=4096)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def build_flux(folder, tok_folder):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(0)
    tok = clip_tokenizer(tok_folder)
    t5 = T5EncoderModel(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4,
                                 relative_attention_num_buckets=8))
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    pipe = FluxPipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
        vae=tiny_vae(4, RES, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159,
                     scaling_factor=0.3611),
        text_encoder=CLIPTextModel(clip_config(len(tok))), tokenizer=tok,
        text_encoder_2=t5, tokenizer_2=t5_tokenizer())
    pipe.save_pretrained(folder)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    root = tmp_path_factory.mktemp("flux")
    build_flux(root / "flux", root / "tok")
    return root / "flux"


@pytest.fixture(scope="module")
def flux(folder):
    return load_backbone("flux", model_path=folder, local_files_only=True, max_sequence_length=SEQ, resolution=RES)


def variant(bb, **options):
    """The same pipeline behind another backbone object (other guidance, max_batch …)."""
    options.setdefault("resolution", bb.resolution)
    return Flux(pipeline=bb.pipe, max_sequence_length=bb.max_sequence_length, **options)


def test_defaults_shapes_and_grid(flux):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    assert flux.name == "flux" and flux.guidance == 3.5 and flux.sigma_max == 1.0
    assert flux.shape == (4, RES // 8, RES // 8) and flux.resolution == (RES, RES)
    mu = calculate_shift(16, 256, 4096, 0.5, 1.15)   # 8×8 latents → 4×4 = 16 packed tokens
    assert flux.flow_args == {"mu": pytest.approx(mu), "num_train_timesteps": 1000}
    assert flux.sigma_min == pytest.approx(float(schedules.flow_match(2, mu=mu)[-1]))
    flux.pipe.scheduler.set_timesteps(6, mu=flux.flow_args["mu"])
    torch.testing.assert_close(schedules.flow_match(6, **flux.flow_args), flux.pipe.scheduler.sigmas[:-1].double(),
                               rtol=1e-6, atol=0)
    big = Flux(pipeline=flux.pipe)                    # FluxPipeline's default size, 1024², and its shift μ = 1.15
    assert big.shape == (4, 128, 128) and big.flow_args["mu"] == pytest.approx(1.15)
    assert variant(flux, mu=0.7).flow_args["mu"] == 0.7
    with pytest.raises(ValueError, match="multiple of 16"):
        variant(flux, resolution=72)
    with pytest.raises(TypeError, match="FluxPipeline-like"):
        Flux(pipeline=object())


def test_guidance_is_embedded_one_call_per_row(flux):
    """No unconditional rows: one transformer call over the B rows, with the scale as its guidance input."""
    seen = []
    hook = flux.network.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((kwargs["hidden_states"].shape[0], kwargs["guidance"].tolist())),
        with_kwargs=True)
    x, sigma, cond = flux.noise([0, 1]) * 0.5, torch.tensor([0.7, 0.3]), flux.encode(prompts=PROMPTS)
    try:
        with torch.no_grad():
            d = flux(x, sigma, cond)
            d_1 = variant(flux, guidance=1.0)(x, sigma, cond)
            d_u = flux(x, sigma, None)
    finally:
        hook.remove()
    assert seen == [(2, [3.5, 3.5]), (2, [1.0, 1.0]), (2, [3.5, 3.5])]
    assert _rel(d, d_1) > 1e-3                       # the scale changes the output
    assert _rel(d, d_u) > 1e-3                       # so does the prompt
    with torch.no_grad():
        torch.testing.assert_close(d_u, flux(x, sigma, flux.encode(prompts=["", ""])), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="embedded guidance"):
        flux.encode(prompts=PROMPTS, negative_prompts=["blurry", "dark"])
    with pytest.raises(ValueError, match="one value per row"):
        flux(x, sigma[:1], cond)


def test_chunked_equals_batched(flux, folder):
    x, sigma = flux.noise(range(5)), torch.linspace(0.9, 0.1, 5)
    cond = flux.encode(prompts=[*PROMPTS, *PROMPTS, "x"])
    with torch.no_grad():
        assert _rel(variant(flux, max_batch=2)(x, sigma, cond), flux(x, sigma, cond)) < 1e-6
    bb64 = load_backbone("flux", model_path=folder, dtype="float64", local_files_only=True, max_sequence_length=SEQ,
                         resolution=RES)
    x64, cond64 = bb64.noise(range(5), dtype=torch.float64), bb64.encode(prompts=[*PROMPTS, *PROMPTS, "x"])
    with torch.no_grad():
        whole = sample_epd(bb64, x64, schedules.flow_match(3, **bb64.flow_args), handset_table(3, 3), cond=cond64)
        chunked = sample_epd(variant(bb64, max_batch=4), x64, schedules.flow_match(3, **bb64.flow_args),
                             handset_table(3, 3), cond=cond64)
    assert _rel(chunked, whole) < 1e-12


def test_sampling_is_deterministic_by_seed(flux):
    def run(seeds, prompts):
        with torch.no_grad():
            return sample_epd(flux, flux.noise(seeds), schedules.flow_match(4, **flux.flow_args),
                              handset_table(4, 2), cond=flux.encode(prompts=prompts))

    out = run([0, 1], PROMPTS)
    assert out.shape == (2, *flux.shape) and bool(torch.isfinite(out).all())
    assert torch.equal(run([0, 1], PROMPTS), out)
    assert _rel(run([1], PROMPTS[1:])[0], out[1]) < TOL
    assert _rel(out[0], out[1]) > 1e-2


@pytest.mark.parametrize("size", [(RES, RES), (RES, RES + 32)], ids=["square", "wide"])
def test_denoise_is_the_pipelines_step_and_euler_its_run(flux, size):
    """D = x − t·v: from the same latents, FluxPipeline's first step is our Euler step on its grid, and its whole run
    (latents and decoded images) is our Euler on that grid, ending in t = 0. A wide image checks the patch order."""
    bb = variant(flux, resolution=size)
    pipe, n, (h, w) = bb.pipe, 4, size
    x, cond = bb.noise([0, 1]), bb.encode(prompts=PROMPTS)
    packed = pipe._pack_latents(x, 2, *bb.shape)
    after_first = []

    def keep(p, i, t, kwargs):
        if i == 0:
            after_first.append(kwargs["latents"].clone())
        return {}

    kwargs = dict(prompt=PROMPTS, num_inference_steps=n, guidance_scale=bb.guidance, height=h, width=w,
                  latents=packed, max_sequence_length=SEQ)
    with torch.no_grad():
        theirs = pipe(**kwargs, output_type="latent", callback_on_step_end=keep).images
        sigmas = pipe.scheduler.sigmas.double()          # FluxPipeline's grid: t = linspace(1, 1/n), shifted by μ
        images = pipe(**kwargs, output_type="pt").images
        assert sigmas[-1] == 0 and len(sigmas) == n + 1
        first = sample_euler(bb, x, sigmas[:2], cond=cond)
        ours = sample_euler(bb, x, sigmas, cond=cond)
    unpack = lambda z: pipe._unpack_latents(z, h, w, pipe.vae_scale_factor)  # noqa: E731
    assert _rel(first, unpack(after_first[0])) < TOL
    assert _rel(ours, unpack(theirs)) < TOL
    torch.testing.assert_close(bb.to_pixels(ours), images, rtol=0, atol=1e-4)
