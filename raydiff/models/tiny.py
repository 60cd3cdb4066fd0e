"""Tiny random-weight SD / SDXL (here) and SD3 / FLUX (`tiny_flow.py`) models in diffusers format, built offline.

Tests and the embedded default load these through the same `from_pretrained`
code path as real checkpoints. `tiny://sd` and `tiny://sdxl` resolve to a
cached folder (`$RAYDIFF_CACHE` or ~/.cache/raydiff) built on first use.
Weights are seeded, so every build of the same kind is identical.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

TINY_KINDS = ("sd", "sdxl", "sd3", "flux")
_BUILD_VERSION = "2"  # bump when the tiny architecture changes, so caches rebuild


def cache_dir() -> Path:
    return Path(os.environ.get("RAYDIFF_CACHE") or Path.home() / ".cache" / "raydiff")


def tiny_folder(kind: str) -> str:
    """The cached build behind `tiny://sd|sdxl|sd3|flux` (built on first use)."""
    out = cache_dir() / f"tiny-{kind}-v{_BUILD_VERSION}"
    if not (out / "model_index.json").is_file():
        build_tiny(kind, out)
    return str(out)


def resolve_tiny(path: str) -> str:
    """Map `tiny://sd|sdxl|sd3|flux` to a built folder; other paths pass through unchanged."""
    if not path.startswith("tiny://"):
        return path
    kind = path[len("tiny://"):]
    if kind not in TINY_KINDS:
        raise ValueError(f"model.path {path!r}: unknown tiny model; use one of " + ", ".join(f"tiny://{k}" for k in TINY_KINDS))
    return tiny_folder(kind)


def save_on_any_rank(model, folder) -> None:
    """`model.save_pretrained(folder)` in any process. transformers writes weights only on torch.distributed
    rank 0 (`should_save_on_this_rank`), so a tiny model built by a learner rank != 0 (a cold cache) was
    published with empty text-encoder folders; a tiny build is this process's own, whatever its rank."""
    model.should_save_on_this_rank = lambda is_main_process: True
    model.save_pretrained(folder)


def _byte_vocab() -> tuple[dict[str, int], list[str]]:
    """A CLIP BPE vocabulary covering all 256 byte symbols (alone and word-final), no merges.

    Covering every byte keeps unknown characters from mapping onto eos/pad, which
    would move SDXL's pooled-output position (see NOTES-diffusers.md).
    """
    # GPT-2 / CLIP byte-to-unicode table: printable bytes map to themselves, the rest to 256+n.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    extra = [b for b in range(256) if b not in printable]
    symbols = [chr(b) for b in printable] + [chr(256 + n) for n in range(len(extra))]
    vocab: dict[str, int] = {}
    for s in symbols:
        vocab[s] = len(vocab)
    for s in symbols:
        vocab[s + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, ["#version: 0.2"]


def _save_tokenizer(folder: Path, max_length: int = 16) -> None:
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = _byte_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("\n".join(merges) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": max_length, "tokenizer_class": "CLIPTokenizer"}))
    tok = CLIPTokenizer.from_pretrained(str(folder), model_max_length=max_length)
    tok.save_pretrained(str(folder))


def _text_encoder(hidden: int, projection: int | None, vocab_size: int, max_length: int, eos_id: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=max_length, vocab_size=vocab_size, projection_dim=projection or hidden,
        bos_token_id=vocab_size - 2, eos_token_id=eos_id, pad_token_id=eos_id,
    )
    return CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)


def build_tiny(kind: str, out_dir: str | Path, seed: int = 0) -> str:
    """Build a tiny random `kind` (one of TINY_KINDS) pipeline folder at out_dir (atomically) and return its path."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    if kind not in TINY_KINDS:
        raise ValueError(f"make-tiny --kind must be one of {TINY_KINDS}, got {kind!r}")
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=out.parent))
    torch.manual_seed(seed)
    max_length = 16
    vocab_size = len(_byte_vocab()[0])
    eos = vocab_size - 1
    if kind in ("sd3", "flux"):
        from raydiff.models import tiny_flow

        build = tiny_flow.build_sd3 if kind == "sd3" else tiny_flow.build_flux
        tiny_flow.write_index(tmp, build(tmp, _save_tokenizer, _text_encoder, vocab_size, eos, max_length))
        return _publish(tmp, out)
    _save_tokenizer(tmp / "tokenizer", max_length)
    te1 = _text_encoder(32, None, vocab_size, max_length, eos)
    save_on_any_rank(te1, tmp / "text_encoder")
    cross_dim = 32
    unet_kwargs = {}
    if kind == "sdxl":
        _save_tokenizer(tmp / "tokenizer_2", max_length)
        te2 = _text_encoder(32, 32, vocab_size, max_length, eos)
        save_on_any_rank(te2, tmp / "text_encoder_2")
        cross_dim = 64
        unet_kwargs = dict(
            addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32,
        )
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_dim,
        attention_head_dim=8, norm_num_groups=8, **unet_kwargs,
    )
    unet.save_pretrained(tmp / "unet")
    # 4 blocks keep vae_scale_factor = 8 as in the real models: 8x8 latents -> 64x64 images.
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=4, sample_size=64,
    )
    # A random decoder maps all latents to near-identical mid-grey images; a stronger output
    # layer makes image statistics (brightness, colour) depend visibly on the latents, so
    # tiny runs can show a reward being learned.
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(6.0)
    vae.save_pretrained(tmp / "vae")
    sched = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000,
    )
    sched.save_pretrained(tmp / "scheduler")
    index = {
        "_class_name": "StableDiffusionXLPipeline" if kind == "sdxl" else "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    if kind == "sdxl":
        index.update(text_encoder_2=["transformers", "CLIPTextModelWithProjection"], tokenizer_2=["transformers", "CLIPTokenizer"], force_zeros_for_empty_prompt=True)
    else:
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
    return _publish(tmp, out)


def _publish(tmp: Path, out: Path) -> str:
    """Move the finished build into place with one rename. A concurrent builder that won keeps its folder:
    others may be loading from it already (checking "exists" and then deleting raced with its rename)."""
    try:
        os.replace(tmp, out)  # fails if `out` is a non-empty folder: somebody published first
    except OSError:
        if not (out / "model_index.json").is_file():  # a partial folder left by an interrupted old build
            shutil.rmtree(out, ignore_errors=True)
            try:
                os.replace(tmp, out)
                return str(out)
            except OSError:
                pass
        shutil.rmtree(tmp, ignore_errors=True)
    return str(out)
