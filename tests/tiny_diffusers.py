"""Components of tiny diffusers pipelines built from configs (no download), shared by the backbone tests: a byte-level
CLIP tokenizer, a letter-level T5 tokenizer, a small CLIP text config, and a four-level VAE (8× latent downsampling,
as in SD, SD3 and FLUX)."""
from __future__ import annotations

import json

from clip_bytes import bytes_to_unicode


def clip_tokenizer(folder):
    """A byte-level BPE CLIPTokenizer: every byte, every byte ending a word, two merges ("th", "the</w>")."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True)
    chars = bytes_to_unicode()
    tokens = ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars), "th", "the</w>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\nt h\nth e</w>\n")
    return CLIPTokenizer.from_pretrained(folder, model_max_length=77)


def t5_tokenizer():
    """A unigram T5 tokenizer over lower-case letters (pad 0, eos 1, unk 2), no sentinel tokens."""
    from transformers import T5TokenizerFast

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(c, -3.0) for c in letters] + [("▁" + c, -3.5) for c in letters]
    return T5TokenizerFast(vocab=vocab, extra_ids=0)


def clip_config(vocab_size: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37,
                          num_attention_heads=4, num_hidden_layers=2, vocab_size=vocab_size,
                          max_position_embeddings=77, projection_dim=32)


def tiny_vae(latent_channels: int, resolution: int, **kw):
    """Four levels, so latents are 8× smaller than images, as in SD."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=[4, 4, 4, 4], in_channels=3, out_channels=3,
                         down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                         latent_channels=latent_channels, norm_num_groups=2, layers_per_block=1, sample_size=resolution,
                         **kw)
