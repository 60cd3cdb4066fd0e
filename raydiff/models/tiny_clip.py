"""A tiny random CLIP (model + tokenizer + LAION-layout aesthetic head) for tests and smoke runs.

Test fixture: only tests and `tiny://clip` paths (through raydiff.models.weights) load this module.
`build_tiny_clip(out_dir)` writes a transformers `CLIPModel` folder that loads
through exactly the code path used for real weights (`CLIPModel.from_pretrained`,
`CLIPTokenizer.from_pretrained`), plus `aesthetic_head.pth` whose keys follow
the public improved-aesthetic-predictor state dict (`layers.0.weight`, ...),
with input dim = the tiny projection dim. Everything is seeded, so two builds
give identical files; a folder that already holds a complete build is reused.

Layout of `out_dir`:
    config.json, model.safetensors          tiny CLIPModel (hidden 32, 2 layers, image 32, patch 8, proj 16)
    vocab.json, merges.txt, tokenizer*.json  byte-level BPE over the 256 byte symbols (+ "</w>" forms)
    preprocessor_config.json                 CLIP mean/std, resize/crop to 32
    aesthetic_head.pth                       LAION MLP head, input dim 16
    .complete                                marker written last (partial builds are redone)
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from raydiff.models.tiny import save_on_any_rank

PROJECTION_DIM = 16
IMAGE_SIZE = 32
_MARKER = ".complete"
# A few merges so the tokenizer is a real BPE (words of these letters become one token).
_MERGE_WORDS = ("a", "the", "cat", "dog", "red", "photo", "of", "an", "apple", "blue", "car")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode map (covers all 256 bytes, so no input collapses to unk)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    symbols = list(bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols]
    merges: list[tuple[str, str]] = []
    for word in _MERGE_WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:  # merge left to right: ((c a) t</w>)
            a, b = parts[0], parts[1]
            if (a, b) not in merges:
                merges.append((a, b))
                if a + b not in vocab_list:
                    vocab_list.append(a + b)
            parts = [a + b] + parts[2:]
    # Specials last: like the real CLIP vocab, <|endoftext|> has the highest id (open_clip pools at argmax).
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab_list)}, merges


def aesthetic_head_state_dict(in_dim: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random head with the public LAION key names (layers.{0,2,4,6,7}.{weight,bias})."""
    from raydiff.rewards.clip_rewards import AestheticHead

    torch.manual_seed(seed)
    return {k: v.clone() for k, v in AestheticHead(in_dim).state_dict().items()}


def build_tiny_clip(out_dir: str | os.PathLike, seed: int = 0) -> str:
    """Write (or reuse) a tiny random CLIP folder at `out_dir`; returns its path as a string."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    out = Path(out_dir)
    if (out / _MARKER).is_file():
        return str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build in a temp dir and rename: concurrent builders (Serve replicas, test workers) never see half a folder.
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    vocab, merges = _vocab_and_merges()
    tok = CLIPTokenizer(vocab=vocab, merges=merges)
    tok.model_max_length = 77
    tok.save_pretrained(tmp)
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            image_size=IMAGE_SIZE, patch_size=8,
        ),
        projection_dim=PROJECTION_DIM,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    save_on_any_rank(model, tmp)
    CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    ).save_pretrained(tmp)
    torch.save(aesthetic_head_state_dict(PROJECTION_DIM, seed), tmp / "aesthetic_head.pth")
    (tmp / _MARKER).write_text("ok\n")
    try:
        os.rename(tmp, out)
    except OSError:  # another process won the race (or out exists but is incomplete)
        if not (out / _MARKER).is_file():
            import shutil

            shutil.rmtree(out, ignore_errors=True)
            os.rename(tmp, out)
        else:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


def tiny_folder(kind: str = "clip") -> str:
    """The cached build behind `tiny://clip` (raydiff.models.weights resolves paths and files in it)."""
    from raydiff.models.tiny import cache_dir

    return build_tiny_clip(cache_dir() / "tiny_clip")


def resolve_path(path: str) -> str:
    """`tiny://...` to its cached folder or file; other paths unchanged (see raydiff.models.weights)."""
    from raydiff.models.weights import resolve_weights

    return resolve_weights(path)
