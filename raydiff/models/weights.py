"""Where weights come from: `resolve_weights(path)` maps `tiny://<kind>[/file]` to a built folder.

Any other path (hub id, local folder, file) passes through unchanged. `tiny://` names random
tiny models built offline and cached under $RAYDIFF_CACHE (default ~/.cache/raydiff): tests,
smoke runs and the CPU configs use them through the same `from_pretrained` code as real weights.

The builders are test fixtures, so production code (model loader, reward scorers) never imports
them: this module names each by import path and imports one only when a `tiny://` path asks
for it. (Before, clip_rewards imported the tiny CLIP builder, which imported clip_rewards back.)
"""

from __future__ import annotations

import importlib

TINY_PREFIX = "tiny://"
# kind -> "module:function"; the function takes the kind and returns the built folder.
_TINY_BUILDERS = {
    "sd": "raydiff.models.tiny:tiny_folder",
    "sdxl": "raydiff.models.tiny:tiny_folder",
    "sd3": "raydiff.models.tiny:tiny_folder",
    "flux": "raydiff.models.tiny:tiny_folder",
    "clip": "raydiff.models.tiny_clip:tiny_folder",
    "owl": "raydiff.rewards.tiny_builders:tiny_folder",
    "trocr": "raydiff.rewards.tiny_builders:tiny_folder",
    "imagereward": "raydiff.rewards.tiny_builders:tiny_folder",
    "vlm": "raydiff.rewards.tiny_builders:tiny_folder",
}


def resolve_weights(path: str, field: str = "path") -> str:
    """`tiny://clip/aesthetic_head.pth` -> <cache>/tiny_clip/aesthetic_head.pth; other paths as given.

    `field` names the config field in the error for an unknown tiny kind."""
    if not isinstance(path, str) or not path.startswith(TINY_PREFIX):
        return path
    kind, _, sub = path[len(TINY_PREFIX):].partition("/")
    if kind not in _TINY_BUILDERS:
        known = ", ".join(TINY_PREFIX + k for k in sorted(_TINY_BUILDERS))
        raise ValueError(f"{field} {path!r}: unknown tiny model {kind!r}; known: {known} "
                         f"(tiny://clip also serves its files, e.g. tiny://clip/aesthetic_head.pth)")
    module, fn = _TINY_BUILDERS[kind].split(":")
    root = getattr(importlib.import_module(module), fn)(kind)
    return f"{root}/{sub}" if sub else root
