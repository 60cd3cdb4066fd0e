"""Tiny random-weight models for the detection, OCR, ImageReward and VLM rewards (tests and smoke runs only).

Each builder writes a folder that loads through exactly the code path real weights use
(`from_pretrained(path)`), seeded so two builds are identical; a complete folder is reused.
Production scorers never import this module: they take paths.

    build_tiny_owl(dir)          Owlv2ForObjectDetection + Owlv2Processor (CLIP byte-level BPE), 64 px, patch 16
    build_tiny_trocr(dir)        VisionEncoderDecoderModel (ViT encoder + TrOCR decoder) + char tokenizer, 32x64 px
    build_tiny_imagereward(dir)  ImageReward folder (BLIP vision + BLIP text w/ cross-attention + MLP) + BERT tokenizer
    build_tiny_vlm(dir)          LlavaForConditionalGeneration (CLIP vision + Llama) + processor with a chat template
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch

_MARKER = ".complete"


def _atomic_build(out_dir, build: Callable[[Path], None]) -> str:
    """Run `build(tmp)` in a temp folder next to `out_dir`, then rename: concurrent builders never see half a folder."""
    out = Path(out_dir)
    if (out / _MARKER).is_file():
        return str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    build(tmp)
    (tmp / _MARKER).write_text("ok\n")
    try:
        os.rename(tmp, out)
    except OSError:
        if (out / _MARKER).is_file():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            shutil.rmtree(out, ignore_errors=True)
            os.rename(tmp, out)
    return str(out)


def _clip_tokenizer(max_len: int):
    from transformers import CLIPTokenizer

    from raydiff.rewards.tiny_clip import _vocab_and_merges

    vocab, merges = _vocab_and_merges()
    tok = CLIPTokenizer(vocab=vocab, merges=merges)
    tok.model_max_length = max_len
    return tok, vocab


def build_tiny_owl(out_dir, seed: int = 0) -> str:
    """A tiny OWLv2 detector folder (random weights: detections are random but well-formed)."""
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessorPil, Owlv2Processor

    def build(tmp: Path):
        tok, vocab = _clip_tokenizer(16)
        eos = vocab["<|endoftext|>"]
        cfg = Owlv2Config(
            text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, max_position_embeddings=16, bos_token_id=vocab["<|startoftext|>"],
                             eos_token_id=eos, pad_token_id=eos),
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               image_size=64, patch_size=16),
            projection_dim=32,
        )
        torch.manual_seed(seed)
        Owlv2ForObjectDetection(cfg).eval().save_pretrained(tmp)
        Owlv2Processor(image_processor=Owlv2ImageProcessorPil(size={"height": 64, "width": 64}),
                       tokenizer=tok).save_pretrained(tmp)

    return _atomic_build(out_dir, build)
