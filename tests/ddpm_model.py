"""The classic DDPM U-Net (Ho, Jain, Abbeel 2020), written from its architecture description.

The CIFAR-10 configuration is the default: ``ch=128, ch_mult=(1, 2, 2, 2),
num_res_blocks=2, attn_resolutions=(16,), dropout=0.1, resamp_with_conv=True`` on
3×32×32 images. ``DDPMUNet()(x, t)`` maps a noisy image ``x`` (N, C, H, W) and integer
timesteps ``t`` (N,) to the predicted noise ε, of the shape of ``x``.

Module names follow the reference implementation, so that they agree with
``../shared/reference/ddpm_space.json`` (the LayerMerge search space of this network):
``conv_in``, ``temb.dense.{0,1}``, ``down.L.block.B.{norm1,conv1,temb_proj,norm2,conv2,
nin_shortcut}``, ``down.L.attn.B.{norm,q,k,v,proj_out}``, ``down.L.downsample.conv``,
``mid.{block_1,attn_1,block_2}``, ``up.L.block.B``, ``up.L.attn.B``,
``up.L.upsample.conv``, ``norm_out``, ``conv_out``. ``up`` is indexed by resolution
level like ``down`` (``up.3`` runs first).

Two details matter to fxmerge and are kept on purpose:

* the activation is written ``x * torch.sigmoid(x)`` (SiLU as the reference writes it);
* the top-level forward asserts on the input's spatial size, so ``symbolic_trace``
  cannot trace it; ``torch.export`` can.

Every size is configurable, so a small variant (``ch=32``, 16×16 inputs) is cheap::

    model = DDPMUNet(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,),
                     resolution=16, in_channels=1).eval()
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AttnBlock", "DDPMUNet", "Downsample", "ResnetBlock", "Upsample", "nonlinearity", "timestep_embedding"]


def nonlinearity(x: torch.Tensor) -> torch.Tensor:
    """SiLU, written out as the reference does."""
    return x * torch.sigmoid(x)


def timestep_embedding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (N,) → (N, dim): sines, then cosines."""
    half = dim // 2
    scale = math.log(10000.0) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=timesteps.device) * -scale)
    angles = timesteps.to(torch.float32)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


def group_norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    if channels % groups:
        raise ValueError(f"{channels} channels cannot be split into {groups} GroupNorm groups")
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """``norm1 → act → conv1 (+ temb_proj(act(temb))) → norm2 → act → dropout → conv2``, plus the shortcut."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, dropout: float, groups: int = 32):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=1, padding=1)
        self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = group_norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=1, padding=0)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(nonlinearity(self.norm1(x)))
        h = h + self.temb_proj(nonlinearity(temb))[:, :, None, None]
        h = self.conv2(self.dropout(nonlinearity(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H·W positions, q/k/v/proj_out as 1×1 convs, residual."""

    def __init__(self, channels: int, groups: int = 32):
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        n, c, height, width = q.shape
        q = q.reshape(n, c, height * width).permute(0, 2, 1)  # (n, hw, c)
        k = k.reshape(n, c, height * width)  # (n, c, hw)
        weights = torch.softmax(torch.bmm(q, k) * (c**-0.5), dim=2)  # (n, hw_query, hw_key)
        v = v.reshape(n, c, height * width)
        h = torch.bmm(v, weights.permute(0, 2, 1)).reshape(n, c, height, width)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Halve H and W: pad right and bottom by one, then a 3×3 stride-2 conv (or 2×2 average pooling)."""

    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_conv:
            return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class Upsample(nn.Module):
    """Double H and W by nearest-neighbour repetition, then (optionally) a 3×3 conv."""

    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, 3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.with_conv else x


class DDPMUNet(nn.Module):
    """The DDPM ε-prediction U-Net; defaults are the CIFAR-10 model (35.7 M parameters)."""

    def __init__(
        self,
        *,
        ch: int = 128,
        out_ch: int | None = None,
        ch_mult: tuple[int, ...] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: tuple[int, ...] = (16,),
        dropout: float = 0.1,
        resamp_with_conv: bool = True,
        in_channels: int = 3,
        resolution: int = 32,
        groups: int = 32,
    ):
        super().__init__()
        self.ch = ch
        self.temb_ch = 4 * ch
        self.num_levels = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.in_channels = in_channels

        self.temb = nn.Module()
        self.temb.dense = nn.ModuleList([nn.Linear(ch, self.temb_ch), nn.Linear(self.temb_ch, self.temb_ch)])
        self.conv_in = nn.Conv2d(in_channels, ch, 3, stride=1, padding=1)

        block_in = self._build_down(ch_mult, attn_resolutions, dropout, resamp_with_conv, groups)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, self.temb_ch, dropout, groups)
        self.mid.attn_1 = AttnBlock(block_in, groups)
        self.mid.block_2 = ResnetBlock(block_in, block_in, self.temb_ch, dropout, groups)
        block_in = self._build_up(block_in, ch_mult, attn_resolutions, dropout, resamp_with_conv, groups)
        self.norm_out = group_norm(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, out_ch or in_channels, 3, stride=1, padding=1)

    def _build_down(self, ch_mult, attn_resolutions, dropout, resamp_with_conv, groups) -> int:
        """``self.down``: per level, ResNet blocks (+ attention), then a downsample except at the last level."""
        in_mult, res, block_in = (1, *ch_mult), self.resolution, self.ch
        self.down = nn.ModuleList()
        for level, mult in enumerate(ch_mult):
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = self.ch * in_mult[level], self.ch * mult
            for _ in range(self.num_res_blocks):
                stage.block.append(ResnetBlock(block_in, block_out, self.temb_ch, dropout, groups))
                block_in = block_out
                if res in attn_resolutions:
                    stage.attn.append(AttnBlock(block_in, groups))
            if level != self.num_levels - 1:
                stage.downsample = Downsample(block_in, resamp_with_conv)
                res //= 2
            self.down.append(stage)
        return block_in

    def _build_up(self, block_in, ch_mult, attn_resolutions, dropout, resamp_with_conv, groups) -> int:
        """``self.up``, indexed by level like ``self.down``: one more block per level, each reading a skip."""
        in_mult = (1, *ch_mult)
        res = self.resolution // 2 ** (self.num_levels - 1)
        ups: list[nn.Module] = []
        for level in reversed(range(self.num_levels)):
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            block_out = self.ch * ch_mult[level]
            for index in range(self.num_res_blocks + 1):
                # the last block of a level reads the skip saved before this level's blocks ran
                skip = self.ch * (in_mult[level] if index == self.num_res_blocks else ch_mult[level])
                stage.block.append(ResnetBlock(block_in + skip, block_out, self.temb_ch, dropout, groups))
                block_in = block_out
                if res in attn_resolutions:
                    stage.attn.append(AttnBlock(block_in, groups))
            if level != 0:
                stage.upsample = Upsample(block_in, resamp_with_conv)
                res *= 2
            ups.insert(0, stage)
        self.up = nn.ModuleList(ups)
        return block_in

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert x.shape[2] == x.shape[3] == self.resolution
        temb = self.temb.dense[0](timestep_embedding(t, self.ch))
        temb = self.temb.dense[1](nonlinearity(temb))

        hs = [self.conv_in(x)]
        for level in range(self.num_levels):
            stage = self.down[level]
            for index in range(self.num_res_blocks):
                h = stage.block[index](hs[-1], temb)
                if len(stage.attn) > 0:
                    h = stage.attn[index](h)
                hs.append(h)
            if level != self.num_levels - 1:
                hs.append(stage.downsample(hs[-1]))

        h = self.mid.block_1(hs[-1], temb)
        h = self.mid.attn_1(h)
        h = self.mid.block_2(h, temb)

        for level in reversed(range(self.num_levels)):
            stage = self.up[level]
            for index in range(self.num_res_blocks + 1):
                h = stage.block[index](torch.cat([h, hs.pop()], dim=1), temb)
                if len(stage.attn) > 0:
                    h = stage.attn[index](h)
            if level != 0:
                h = stage.upsample(h)

        return self.conv_out(nonlinearity(self.norm_out(h)))


def small() -> DDPMUNet:
    """A small DDPM U-Net (ch 32, two levels, attention at 8×8) for 1×3×16×16 images: a command-line factory."""
    torch.manual_seed(0)
    return DDPMUNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), resolution=16).eval()
