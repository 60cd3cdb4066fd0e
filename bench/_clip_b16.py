"""A CLIP ViT-B/16 folder with random weights: the real architecture (224², 86 M-param vision tower), built offline.

The model hubs are unreachable here, so the reward benches score with the shapes of
openai/clip-vit-base-patch16 (vision 768 wide, 12 layers, 16 px patches; text 512 wide, 12 layers)
built from a transformers config. The cost per image is that of the real scorer; the scores are not.
The tokenizer is the tiny CLIP's (its vocabulary sizes the text embedding).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def build_clip_b16(out_dir: str | None = None, seed: int = 0) -> str:
    """Write (or reuse) the folder; returns its path (usable as a clip_score `clip_path`)."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    from raydiff.models.tiny import cache_dir
    from raydiff.models.weights import resolve_weights

    out = Path(out_dir) if out_dir else cache_dir() / "bench-clip-vit-b16-random"
    if (out / ".complete").is_file():
        return str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    tok = CLIPTokenizer.from_pretrained(resolve_weights("tiny://clip"))
    tok.save_pretrained(tmp)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=8, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=224, patch_size=16),
        projection_dim=512,
    )
    torch.manual_seed(seed)
    CLIPModel(config).eval().save_pretrained(tmp)
    CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(tmp)
    (tmp / ".complete").write_text("ok\n")
    try:
        os.rename(tmp, out)
    except OSError:  # built concurrently by another process
        shutil.rmtree(tmp, ignore_errors=True)
    return str(out)
