"""Convert THUDM/ImageReward's `ImageReward.pt` (+ `med_config.json`) into a folder `imagereward` loads.

    python -m raydiff.rewards.convert_imagereward ImageReward.pt med_config.json /weights/imagereward \
        --tokenizer bert-base-uncased

Both files are on the Hugging Face Hub in THUDM/ImageReward. Key mapping (published -> transformers):
    blip.visual_encoder.cls_token / pos_embed / patch_embed.proj.*  -> vision.embeddings.class_embedding /
                                                                        position_embedding / patch_embedding.*
    blip.visual_encoder.blocks.{i}.norm1|attn.qkv|attn.proj|norm2|mlp.fc1|mlp.fc2
                                                                    -> vision.encoder.layers.{i}.layer_norm1|
                                                                        self_attn.qkv|self_attn.projection|
                                                                        layer_norm2|mlp.fc1|mlp.fc2
    blip.visual_encoder.norm.*                                      -> vision.post_layernorm.*
    blip.text_encoder.*  (BLIP's BERT "med", same names)            -> text.*
    mlp.layers.*                                                    -> mlp.layers.*
Dropped: blip.vision_proj, blip.text_proj (unused by the score) and position_ids buffers. The
vision config is read from tensor shapes (ViT-L/16 at 224: hidden 1024, 24 layers), heads =
hidden/64 unless --vision-heads; the text config from med_config.json. The tokenizer is BERT's with
ImageReward's added tokens ([DEC] as bos, [ENC]); its size must equal the embedding rows.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

VISION_BLOCK = {"norm1": "layer_norm1", "attn.qkv": "self_attn.qkv", "attn.proj": "self_attn.projection",
                "norm2": "layer_norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
DROPPED = ("blip.vision_proj.", "blip.text_proj.")


def map_key(key: str) -> str | None:
    """Published key -> raydiff key, or None when the score does not use it."""
    if key.startswith(DROPPED) or key.endswith("position_ids"):
        return None
    v = "blip.visual_encoder."
    if key.startswith(v):
        rest = key[len(v):]
        fixed = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
                 "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
                 "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
                 "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias"}
        if rest in fixed:
            return "vision." + fixed[rest]
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", rest)
        if m and m.group(2) in VISION_BLOCK:
            return f"vision.encoder.layers.{m.group(1)}.{VISION_BLOCK[m.group(2)]}.{m.group(3)}"
        raise ValueError(f"unexpected vision key {key!r} in the ImageReward checkpoint")
    if key.startswith("blip.text_encoder."):
        return "text." + key[len("blip.text_encoder."):]
    if key.startswith("mlp.layers."):
        return key
    return None


def vision_config(sd: dict, heads: int | None = None) -> dict:
    hidden = sd["blip.visual_encoder.cls_token"].shape[-1]
    patch = sd["blip.visual_encoder.patch_embed.proj.weight"].shape[-1]
    tokens = sd["blip.visual_encoder.pos_embed"].shape[1]
    grid = int(round((tokens - 1) ** 0.5))
    layers = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("blip.visual_encoder.blocks."))
    return dict(hidden_size=hidden, intermediate_size=sd["blip.visual_encoder.blocks.0.mlp.fc1.weight"].shape[0],
                num_hidden_layers=layers, num_attention_heads=heads or hidden // 64, image_size=grid * patch,
                patch_size=patch, layer_norm_eps=1e-6, hidden_act="gelu")


def text_config(med: dict, encoder_width: int, tokenizer) -> dict:
    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "max_position_embeddings", "layer_norm_eps", "hidden_act", "hidden_dropout_prob",
            "attention_probs_dropout_prob", "initializer_range")
    cfg = {k: med[k] for k in keys if k in med}
    cfg.update(encoder_hidden_size=encoder_width, pad_token_id=tokenizer.pad_token_id,
               bos_token_id=tokenizer.bos_token_id, sep_token_id=tokenizer.sep_token_id)
    return cfg


def imagereward_tokenizer(source: str):
    """BERT tokenizer with ImageReward's additions: [DEC] as bos, [ENC] as an extra special token."""
    from transformers import BertTokenizer

    tok = BertTokenizer.from_pretrained(source)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


def convert(checkpoint: str, med_config: str, out_dir: str, tokenizer: str = "bert-base-uncased",
            vision_heads: int | None = None) -> str:
    from raydiff.rewards.clip_rewards import load_state_dict
    from raydiff.rewards.imagereward import ImageRewardModel

    sd = load_state_dict(checkpoint)
    med = json.loads(Path(med_config).read_text())
    tok = imagereward_tokenizer(tokenizer)
    vc = vision_config(sd, vision_heads)
    tc = text_config(med, vc["hidden_size"], tok)
    rows = sd["blip.text_encoder.embeddings.word_embeddings.weight"].shape[0]
    if len(tok) != rows or tc.get("vocab_size", rows) != rows:
        raise ValueError(f"tokenizer {tokenizer!r} has {len(tok)} tokens (with [DEC], [ENC]) and med_config says "
                         f"vocab_size {tc.get('vocab_size')}, but the checkpoint has {rows} embedding rows; "
                         "ImageReward-v1.0 uses bert-base-uncased (30522 + 2)")
    tc["vocab_size"] = rows
    model = ImageRewardModel(vc, tc)
    mapped = {}
    for k, v in sd.items():
        nk = map_key(k)
        if nk is not None:
            mapped[nk] = v.float()
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"checkpoint {checkpoint!r} does not fit ImageReward: missing {missing[:6]}, "
                         f"unexpected {unexpected[:6]}")
    model.save(out_dir, {"max_length": 35, "source": str(Path(checkpoint).name)})
    tok.save_pretrained(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m raydiff.rewards.convert_imagereward", description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="ImageReward.pt (torch state dict) or .safetensors")
    ap.add_argument("med_config", help="med_config.json from THUDM/ImageReward")
    ap.add_argument("out_dir")
    ap.add_argument("--tokenizer", default="bert-base-uncased", help="BERT tokenizer (hub id or folder)")
    ap.add_argument("--vision-heads", type=int, default=None, help="ViT heads (default hidden/64: 16 for ViT-L)")
    a = ap.parse_args(argv)
    print(convert(a.checkpoint, a.med_config, a.out_dir, a.tokenizer, a.vision_heads))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
