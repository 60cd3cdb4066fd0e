"""Tiny random-weight models for the detection, OCR, ImageReward and VLM rewards (tests and smoke runs only).

Each builder writes a folder that loads through exactly the code path real weights use
(`from_pretrained(path)`), seeded so two builds are identical; a complete folder is reused.
Production scorers never import this module: they take paths, and `tiny://owl`, `tiny://trocr`,
`tiny://imagereward`, `tiny://vlm` reach `tiny_folder` through raydiff.models.weights.

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

    from raydiff.models.tiny_clip import _vocab_and_merges

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


def byte_level_roberta_tokenizer():
    """A RoBERTa-style byte-level BPE with no merges: one token per byte, offline, covers any text."""
    from transformers import RobertaTokenizer

    from raydiff.models.tiny_clip import bytes_to_unicode

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for sym in bytes_to_unicode().values():
        vocab.setdefault(sym, len(vocab))
    return RobertaTokenizer(vocab=vocab, merges=[])


def build_tiny_trocr(out_dir, seed: int = 0) -> str:
    """A tiny TrOCR folder: ViT encoder (32 px, patch 8) + TrOCR decoder, TrOCRProcessor with a byte tokenizer."""
    from transformers import (TrOCRConfig, TrOCRProcessor, ViTConfig, ViTImageProcessorPil, VisionEncoderDecoderConfig,
                              VisionEncoderDecoderModel)

    def build(tmp: Path):
        tok = byte_level_roberta_tokenizer()
        enc = ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        image_size=32, patch_size=8)
        dec = TrOCRConfig(vocab_size=len(tok), d_model=32, decoder_layers=2, decoder_attention_heads=4,
                          decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=tok.pad_token_id,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          decoder_start_token_id=tok.eos_token_id)
        cfg = VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
        # As microsoft/trocr-*: generation starts from </s> (id 2), pads with <pad>.
        cfg.decoder_start_token_id, cfg.pad_token_id, cfg.eos_token_id = tok.eos_token_id, tok.pad_token_id, tok.eos_token_id
        torch.manual_seed(seed)
        VisionEncoderDecoderModel(cfg).eval().save_pretrained(tmp)
        ip = ViTImageProcessorPil(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
        TrOCRProcessor(image_processor=ip, tokenizer=tok).save_pretrained(tmp)

    return _atomic_build(out_dir, build)


def tiny_bert_tokenizer(folder: Path | None = None):
    """A small BERT WordPiece vocab (specials, letters, digits, punctuation, ##-pieces, a few words) + [DEC], [ENC]."""
    import string

    from transformers import BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.ascii_lowercase, *string.digits,
             *string.punctuation, *("##" + c for c in string.ascii_lowercase + string.digits),
             "a", "photo", "of", "the", "cat", "dog", "red", "blue", "car", "apple"]
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(dict.fromkeys(words))})
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    if folder is not None:
        tok.save_pretrained(folder)
    return tok


def tiny_imagereward_configs(vocab_size: int) -> tuple[dict, dict]:
    """(vision, text) configs of the tiny ImageReward: ViT 32 px patch 8 hidden 32; BERT hidden 32, 2 layers."""
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8, layer_norm_eps=1e-6, hidden_act="gelu")
    text = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=64, encoder_hidden_size=32, pad_token_id=0,
                bos_token_id=None, sep_token_id=3)
    return vision, text


def build_tiny_imagereward(out_dir, seed: int = 0) -> str:
    """A tiny ImageReward folder in the layout `convert_imagereward` writes."""
    from raydiff.rewards.imagereward import ImageRewardModel

    def build(tmp: Path):
        tok = tiny_bert_tokenizer(tmp)
        vision, text = tiny_imagereward_configs(len(tok))
        torch.manual_seed(seed)
        model = ImageRewardModel(vision, text)
        with torch.no_grad():  # random MLP with a visible spread of scores
            for p in model.mlp.parameters():
                p.normal_(0, 0.05)
        model.save(tmp, {"max_length": 35, "source": "tiny random"})

    return _atomic_build(out_dir, build)


# A plain chat template: "user: <image>text\nassistant: " (images as <image>, OpenAI image_url parts too).
VLM_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] in ('image', 'image_url') %}<image>{% else %}{{ c['text'] }}"
    "{% endif %}{% endfor %}{% endif %}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)


def build_tiny_vlm(out_dir, seed: int = 0) -> str:
    """A tiny LLaVA (CLIP vision 32 px patch 8 + Llama 2 layers) with LlavaProcessor and a chat template."""
    from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    def build(tmp: Path):
        tok = byte_level_roberta_tokenizer()
        tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=32, patch_size=8)
        text = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                          vision_feature_layer=-2, vision_feature_select_strategy="default")
        torch.manual_seed(seed)
        LlavaForConditionalGeneration(cfg).eval().save_pretrained(tmp)
        ip = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                       chat_template=VLM_CHAT_TEMPLATE, image_token="<image>",
                       num_additional_image_tokens=1).save_pretrained(tmp)

    return _atomic_build(out_dir, build)


def tiny_folder(kind: str) -> str:
    """The cached build behind `tiny://<kind>` (owl, trocr, imagereward, vlm)."""
    from raydiff.models.tiny import cache_dir

    return globals()[f"build_tiny_{kind}"](cache_dir() / f"tiny_{kind}")
