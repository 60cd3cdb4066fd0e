r"""F_φ(x_t, t, c): DAG's learned log-flow, a scalar per state, for any latent size.

The reference (apple/ml-diffusion-alignment-gflownet `alignment/flow.py`) uses the
down half of an SD UNet and a fixed 4×4 average pool, so it only fits 64×64 latents.
This net ends in a *global* average pool instead, so SD (64×64), SDXL (128×128) and
tiny (8×8) latents all work with the same weights layout:

    x_t (N, C, h, w) ─ conv3×3 ─ [ResDown(c_i → c_{i+1}, stride 2) + emb]×k ─ GroupNorm·SiLU ─ GAP ─┐
    t ─ sinusoidal ─ MLP ─┐                                                                          ├─ MLP ─ (N,)
    c: mean_L(prompt embeds) [+ SDXL pooled embeds] ─ LayerNorm·Linear ─┴─ emb (N, E) ───────────────┘

The head's last layer starts at zero, so log F starts at 0 (only β·r at first).
Initialisation is drawn from a private generator seeded by the caller: every
learner rank builds bit-identical weights whatever the global RNG did before.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn


def _groups(channels: int, wanted: int = 8) -> int:
    g = min(wanted, channels)
    while channels % g:
        g -= 1
    return g


class ResDown(nn.Module):
    """Residual block that halves the spatial size and adds the (time, text) embedding."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(_groups(c_in), c_in), nn.Conv2d(c_in, c_out, 3, stride=2, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2, self.conv2 = nn.GroupNorm(_groups(c_out), c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1, stride=2)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(self.act(self.norm2(h)))
        return h + self.skip(x)


class FlowNet(nn.Module):
    """log F_φ(x_t, t, c) -> (N,) float32."""

    def __init__(self, in_channels: int, text_dim: int, pooled_dim: Optional[int] = None,
                 channels: Sequence[int] = (64, 128, 256), emb_dim: int = 256, seed: int = 0):
        super().__init__()
        channels = list(channels)
        self.time_proj = Timesteps(channels[0], flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_mlp = TimestepEmbedding(channels[0], emb_dim)
        self.text_proj = nn.Sequential(nn.LayerNorm(text_dim), nn.Linear(text_dim, emb_dim))
        self.pooled_proj = nn.Sequential(nn.LayerNorm(pooled_dim), nn.Linear(pooled_dim, emb_dim)) if pooled_dim else None
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.blocks = nn.ModuleList(ResDown(a, b, emb_dim) for a, b in zip(channels, channels[1:] + channels[-1:]))
        self.out_norm = nn.GroupNorm(_groups(channels[-1]), channels[-1])
        self.head = nn.Sequential(nn.Linear(channels[-1] + emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, 1))
        self.act = nn.SiLU()
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        """Seeded init (PyTorch's default schemes, drawn from a private generator), zero last layer."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for m in self.modules():
                if m is not self and hasattr(m, "reset_parameters"):
                    m.reset_parameters()
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def embed(self, t: torch.Tensor, embeds: torch.Tensor, pooled: Optional[torch.Tensor]) -> torch.Tensor:
        dtype = self.conv_in.weight.dtype
        emb = self.time_mlp(self.time_proj(t).to(dtype)) + self.text_proj(embeds.to(dtype).mean(dim=1))
        if self.pooled_proj is not None and pooled is not None:
            emb = emb + self.pooled_proj(pooled.to(dtype))
        return emb

    def forward(self, x: torch.Tensor, t, embeds: torch.Tensor, pooled: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (N, C, h, w) any h, w; t scalar or (N,); embeds (N, L, D); pooled (N, P) or None."""
        dtype = self.conv_in.weight.dtype
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        emb = self.embed(t, embeds, pooled)
        h = self.conv_in(x.to(dtype))
        for block in self.blocks:
            h = block(h, emb)
        h = self.act(self.out_norm(h)).mean(dim=(2, 3))  # global average pool: any latent size
        return self.head(torch.cat([h, emb], dim=1)).squeeze(-1).float()
