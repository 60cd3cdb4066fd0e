"""Convert an open_clip ViT checkpoint (plain state dict) into a transformers `CLIPModel` folder.

Used for HPSv2 (xswu/HPSv2 `HPS_v2.1_compressed.pt`, an open_clip ViT-H-14), so
the `hps` reward runs on transformers without open_clip or hpsv2:

    python -m raydiff.rewards.convert_open_clip HPS_v2.1_compressed.pt out/hps_v2.1 \
        --tokenizer laion/CLIP-ViT-H-14-laion2B-s32B-b79K

Key mapping (open_clip -> transformers), per tower prefix `visual.` / `` (text):
    transformer.resblocks.i.attn.in_proj_{weight,bias}  -> encoder.layers.i.self_attn.{q,k,v}_proj (split in 3)
    transformer.resblocks.i.attn.out_proj                -> encoder.layers.i.self_attn.out_proj
    transformer.resblocks.i.ln_{1,2}                     -> encoder.layers.i.layer_norm{1,2}
    transformer.resblocks.i.mlp.c_fc / c_proj            -> encoder.layers.i.mlp.fc1 / fc2
    visual.conv1 / class_embedding / positional_embedding -> vision_model.embeddings.patch_embedding / ...
    visual.ln_pre / ln_post                               -> vision_model.pre_layrnorm / post_layernorm
    visual.proj (W, D), text_projection (W, D)            -> visual_projection / text_projection .weight (D, W) = .T
    token_embedding, positional_embedding, ln_final       -> text_model.embeddings.*, text_model.final_layer_norm
    logit_scale                                           -> logit_scale
Heads cannot be read from a state dict: ViT-H-14 uses 16 vision heads (head width 80), other open_clip
ViTs head width 64; pass --vision-heads/--text-heads when converting anything else.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

OPENAI_ACT = "quick_gelu"  # OpenAI-trained CLIPs; LAION/open_clip-trained ones (ViT-H-14, HPSv2) use exact gelu


def _count_layers(sd: dict, prefix: str) -> int:
    ids = {int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)}
    if not ids:
        raise ValueError(f"no keys under {prefix!r}; is this an open_clip ViT state dict?")
    return max(ids) + 1


def _blocks(sd: dict, src: str, dst: str, n: int, out: dict) -> None:
    for i in range(n):
        s, d = f"{src}{i}.", f"{dst}{i}."
        w, b = sd[s + "attn.in_proj_weight"], sd[s + "attn.in_proj_bias"]
        for name, wi, bi in zip(("q", "k", "v"), w.chunk(3, 0), b.chunk(3, 0)):
            out[d + f"self_attn.{name}_proj.weight"] = wi
            out[d + f"self_attn.{name}_proj.bias"] = bi
        pairs = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
                 "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
        for a, c in pairs.items():
            out[d + c + ".weight"] = sd[s + a + ".weight"]
            out[d + c + ".bias"] = sd[s + a + ".bias"]


def convert_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip keys -> transformers CLIPModel keys (tensors shared, projections transposed)."""
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    out: dict[str, torch.Tensor] = {"logit_scale": sd["logit_scale"].reshape(())}
    v, vm = "visual.", "vision_model."
    out[vm + "embeddings.class_embedding"] = sd[v + "class_embedding"]
    out[vm + "embeddings.patch_embedding.weight"] = sd[v + "conv1.weight"]
    out[vm + "embeddings.position_embedding.weight"] = sd[v + "positional_embedding"]
    for a, c in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        out[vm + c + ".weight"], out[vm + c + ".bias"] = sd[v + a + ".weight"], sd[v + a + ".bias"]
    _blocks(sd, v + "transformer.resblocks.", vm + "encoder.layers.", _count_layers(sd, v + "transformer.resblocks."), out)
    out["visual_projection.weight"] = sd[v + "proj"].t().contiguous()
    tm = "text_model."
    out[tm + "embeddings.token_embedding.weight"] = sd["token_embedding.weight"]
    out[tm + "embeddings.position_embedding.weight"] = sd["positional_embedding"]
    out[tm + "final_layer_norm.weight"], out[tm + "final_layer_norm.bias"] = sd["ln_final.weight"], sd["ln_final.bias"]
    _blocks(sd, "transformer.resblocks.", tm + "encoder.layers.", _count_layers(sd, "transformer.resblocks."), out)
    out["text_projection.weight"] = sd["text_projection"].t().contiguous()
    return out


def config_from_state_dict(sd: dict, vision_heads: int | None = None, text_heads: int | None = None,
                           hidden_act: str = "gelu"):
    """Infer a CLIPConfig from tensor shapes (heads: see module doc)."""
    from transformers import CLIPConfig

    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    conv = sd["visual.conv1.weight"]
    v_width, patch = conv.shape[0], conv.shape[-1]
    grid = int(round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5))
    vocab, t_width = sd["token_embedding.weight"].shape
    if vision_heads is None:
        vision_heads = 16 if v_width == 1280 else max(1, v_width // 64)
    if text_heads is None:
        text_heads = max(1, t_width // 64)
    return CLIPConfig(
        text_config=dict(
            vocab_size=vocab, hidden_size=t_width, num_attention_heads=text_heads,
            intermediate_size=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            num_hidden_layers=_count_layers(sd, "transformer.resblocks."),
            max_position_embeddings=sd["positional_embedding"].shape[0],
            # open_clip pools the text at argmax(token id) = <|endoftext|>, the last vocab entry.
            bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1, hidden_act=hidden_act,
        ),
        vision_config=dict(
            hidden_size=v_width, num_attention_heads=vision_heads, patch_size=patch, image_size=grid * patch,
            intermediate_size=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            num_hidden_layers=_count_layers(sd, "visual.transformer.resblocks."), hidden_act=hidden_act,
        ),
        projection_dim=sd["visual.proj"].shape[1],
    )


def convert(src: str | dict, out_dir: str, tokenizer: str | None = None, vision_heads: int | None = None,
            text_heads: int | None = None, hidden_act: str = "gelu") -> str:
    """Write a CLIPModel folder (config, weights, and tokenizer/preprocessor when `tokenizer` is given)."""
    from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    if isinstance(src, dict):
        sd = src
    else:
        sd = torch.load(src, map_location="cpu", weights_only=True)
        sd = sd.get("state_dict", sd)
    config = config_from_state_dict(sd, vision_heads, text_heads, hidden_act)
    model = CLIPModel(config)
    missing, unexpected = model.load_state_dict(convert_state_dict(sd), strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"conversion mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    size = config.vision_config.image_size
    CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(out_dir)
    if tokenizer:
        CLIPTokenizer.from_pretrained(tokenizer).save_pretrained(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", help="open_clip state dict (.pt/.bin), e.g. HPS_v2.1_compressed.pt")
    ap.add_argument("out_dir", help="folder to write the transformers CLIPModel to")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder/hub id to copy in, e.g. laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
    ap.add_argument("--vision-heads", type=int, default=None, help="vision attention heads (ViT-H-14: 16)")
    ap.add_argument("--text-heads", type=int, default=None, help="text attention heads (default width/64)")
    ap.add_argument("--hidden-act", default="gelu", help=f"gelu (LAION/open_clip-trained) or {OPENAI_ACT} (OpenAI)")
    a = ap.parse_args(argv)
    print(convert(a.checkpoint, a.out_dir, a.tokenizer, a.vision_heads, a.text_heads, a.hidden_act))
    return 0


if __name__ == "__main__":
    sys.exit(main())
