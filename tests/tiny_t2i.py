"""Tiny random models of the released text-to-image scorer architectures, built here from configs and written in
the layout each release ships (state dicts, ``save_pretrained`` folders, MPS's whole pickled model), for the tests
that load them through the loaders users call. Nothing is downloaded: the CLIP tokenizers are the real CLIP BPE,
built from the vocabulary open_clip bundles."""
from __future__ import annotations

import gzip
import json

import torch

from clip_bytes import bytes_to_unicode

PROMPTS = ["a red fox in the snow", "a bowl of soup", "an astronaut riding a horse", "a city at night"]
IMG = 32   # tiny image side of every tiny model
TOL = 1e-4


def images(n: int = 4, seed: int = 0, size: int = 48) -> torch.Tensor:
    """Random pixels in [0, 1], [n, 3, size, size] (not the model's size: the preprocessing resizes)."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g)


# --- tiny models in their release layouts ------------------------------------------------------------------------

def clip_tokenizer_files(folder) -> None:
    """CLIP's tokenizer (vocabulary 49408) as vocab.json + merges.txt, from open_clip's bundled BPE merges."""
    from open_clip.tokenizer import default_bpe

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    chars = bytes_to_unicode()
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def tiny_clip_config():
    from transformers import CLIPConfig

    text = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2,
                max_position_embeddings=77)
    vision = dict(image_size=IMG, patch_size=8, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                  num_hidden_layers=2)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=64)  # 64: one MPS head of 64


def save_clip_processor(folder) -> None:
    from transformers import CLIPImageProcessor, CLIPProcessor, CLIPTokenizer

    clip_tokenizer_files(folder / "_tok")
    tok = CLIPTokenizer(str(folder / "_tok" / "vocab.json"), str(folder / "_tok" / "merges.txt"))
    proc = CLIPImageProcessor(size={"shortest_edge": IMG}, crop_size={"height": IMG, "width": IMG})
    CLIPProcessor(image_processor=proc, tokenizer=tok).save_pretrained(folder)


def save_clip(folder, seed: int) -> None:
    from transformers import CLIPModel

    torch.manual_seed(seed)
    CLIPModel(tiny_clip_config()).save_pretrained(folder)
    save_clip_processor(folder)


def save_hpsv2(tmp) -> tuple:
    import open_clip

    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": IMG, "layers": 2, "width": 64, "head_width": 32,
                                           "patch_size": 8},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
    (tmp / "epd-tiny-ViT.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp / "epd-tiny-ViT.json")
    torch.manual_seed(1)
    model = open_clip.create_model("epd-tiny-ViT", pretrained=None)
    # HPSv2's checkpoints nest the state dict as {"state_dict": ...}
    torch.save({"state_dict": model.state_dict()}, tmp / "HPS_v2.1_compressed.pt")
    return tmp / "HPS_v2.1_compressed.pt", "epd-tiny-ViT"


BLIP_VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=IMG,
                   patch_size=16)
MED = dict(vocab_size=0, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
           hidden_act="gelu", max_position_embeddings=64, layer_norm_eps=1e-12, pad_token_id=0,
           add_cross_attention=True, encoder_width=32)
WORDS = ["a", "an", "the", "red", "fox", "in", "snow", "bowl", "of", "soup", "astronaut", "riding", "horse", "city",
         "at", "night"]


def to_release_keys(state: dict) -> dict:
    """Our ImageReward keys → the release's (BLIP's timm ViT names), written independently of the loader's map."""
    out = {}
    for k, v in state.items():
        if k.startswith("vision."):
            k = k[len("vision."):]
            k = (k.replace("embeddings.class_embedding", "cls_token")
                  .replace("embeddings.position_embedding", "pos_embed")
                  .replace("embeddings.patch_embedding.", "patch_embed.proj.")
                  .replace("encoder.layers.", "blocks.").replace("layer_norm1", "norm1")
                  .replace("layer_norm2", "norm2").replace("self_attn.qkv", "attn.qkv")
                  .replace("self_attn.projection", "attn.proj").replace("post_layernorm.", "norm."))
            out["blip.visual_encoder." + k] = v
        elif k.startswith("text."):
            out["blip.text_encoder." + k[len("text."):]] = v
        else:
            out[k] = v
    # present in the release, unused by the score
    out["blip.text_encoder.embeddings.position_ids"] = torch.arange(64)[None]
    out["blip.vision_proj.weight"] = torch.zeros(256, 32)
    out["blip.text_proj.weight"] = torch.zeros(256, 32)
    return out


def save_imagereward(folder):
    from epd.rewards.t2i.imagereward import ImageRewardModel

    folder.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    med = {**MED, "vocab_size": len(vocab) + 2}   # + BLIP's [DEC] and [ENC]
    (folder / "med_config.json").write_text(json.dumps(med))
    (folder / "vision_config.json").write_text(json.dumps(BLIP_VISION))
    torch.manual_seed(2)
    model = ImageRewardModel(med, BLIP_VISION)
    torch.save(to_release_keys(model.state_dict()), folder / "ImageReward.pt")
    return folder


def save_mps(tmp):
    """The release ships MPS as a whole pickled model (torch.save(model)); so does this fixture."""
    from epd.rewards.t2i.mps import MPSModel

    torch.manual_seed(3)
    model = MPSModel(tiny_clip_config())
    torch.save(model, tmp / "MPS_overall_checkpoint.pth")
    return tmp / "MPS_overall_checkpoint.pth", model.state_dict()


def save_aesthetic(path):
    from epd.rewards.t2i.common import LinearHead

    torch.manual_seed(4)
    head = LinearHead(64)
    torch.save(head.state_dict(), path)
    return path


def _random_inception():
    """FeatureExtractorInceptionV3's architecture with its random initialisation: its constructor loads weights
    (from a download when given no path), so the load is stubbed out for this one construction."""
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    class Random(fe.FeatureExtractorInceptionV3):
        def load_state_dict(self, state, strict=True):   # keep the random initialisation
            return None

    real = fe.torch.load
    fe.torch.load = lambda *a, **k: {}
    try:
        return Random("inception-v3-compat", ["2048"], feature_extractor_weights_path="unused")
    finally:
        fe.torch.load = real
