"""Feature torsos, the one copy every network builder uses (``networks``, ``distributional``, ``asyncrl``):
convolutions over uint8 images, an MLP over vectors. A leaf module: it imports no other network module."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .envs import EnvSpec

# (out channels, kernel, stride) of each convolution.
NATURE_CONVS = ((32, 8, 4), (64, 4, 2), (64, 3, 1))  # Mnih et al. 2015: images of 36x36 and up
SMALL_CONVS = ((32, 3, 1), (64, 3, 2))  # images of 16x16 to 35x35
NATURE_MIN_SIDE = 36  # the smallest side the Nature kernels fit (conv3 sees 1x1)
# Young & Tian 2019's MinAtar network: one 3x3 convolution of 16 channels, stride 1, keeping the grid (a
# stride-2 layer on 10x10 leaves 3x3). For images under 16 a side (at least envs.MIN_IMAGE_SIDE): on
# MinAtar it learns as their DQN does and its training step costs ~1/3 of SMALL_CONVS' (BENCHMARKS.md).
TINY_CONVS = ((16, 3, 1),)
SMALL_MIN_SIDE = 16


class NatureTorso(nn.Module):
    """Convolutions over uint8 [B, C, H, W] images (scaled to [0, 1] here by 1 / ``pixel_max``: 255 for
    Atari's frames, 1 for MinAtar's 0/1 object channels): by default Mnih et al. 2015's over Atari's
    [B, 4, 84, 84] frame stacks, ``SMALL_CONVS`` for images under 36x36."""

    def __init__(self, channels: int, convs: tuple[tuple[int, int, int], ...] = NATURE_CONVS,
                 pixel_max: int = 255) -> None:
        super().__init__()
        self.scale = 1.0 / pixel_max
        layers: list[nn.Module] = []
        for out, kernel, stride in convs:
            layers += [nn.Conv2d(channels, out, kernel, stride=stride), nn.ReLU()]
            channels = out
        self.net = nn.Sequential(*layers, nn.Flatten())

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs.float() * self.scale)


def conv_layers_for(obs_shape: tuple[int, ...]) -> tuple[tuple[int, int, int], ...]:
    """The convolutions for [C, H, W] images: Nature's where they fit, the small ones from 16x16, else
    Young & Tian's one layer (MinAtar)."""
    side = min(obs_shape[1:])
    return NATURE_CONVS if side >= NATURE_MIN_SIDE else SMALL_CONVS if side >= SMALL_MIN_SIDE else TINY_CONVS


def nature_cnn(spec: EnvSpec) -> bool:
    """Whether ``spec``'s network is the Nature CNN over 0..255 frames (what the int8 acting copy takes;
    smaller images such as MinAtar's get small convolutions, cheap enough in float32)."""
    return len(spec.obs_shape) == 3 and conv_layers_for(spec.obs_shape) == NATURE_CONVS and spec.pixel_max == 255


# Mnih et al. 2016's Atari network (the asynchronous family): 16 8x8/4 and 32 4x4/2 convolutions.
PAPER_CONVS = ((16, 8, 4), (32, 4, 2))
PAPER_MIN_SIDE = 20  # the smallest side both kernels fit; smaller images get 3x3 convolutions
SMALL_PAPER_CONVS = ((16, 3, 1), (32, 3, 2))


def paper_conv_layers_for(obs_shape: tuple[int, ...]) -> tuple[tuple[int, int, int], ...]:
    """The asynchronous family's convolutions for [C, H, W] images: the paper's where they fit, Young &
    Tian's one layer under 16 a side (their actor-critic's, on MinAtar)."""
    side = min(obs_shape[1:])
    return PAPER_CONVS if side >= PAPER_MIN_SIDE else SMALL_PAPER_CONVS if side >= SMALL_MIN_SIDE else TINY_CONVS


def build_torso(spec: EnvSpec, hidden: int, convs: tuple[tuple[int, int, int], ...] | None = None,
                mlp_layers: int = 1) -> tuple[nn.Module, int]:
    """(feature torso, feature count) shared by every algorithm's network: a CNN for [C, H, W] uint8
    images at their own size (``convs``, by default ``conv_layers_for``'), else ``mlp_layers`` hidden
    layers of ``hidden`` units."""
    if len(spec.obs_shape) == 3:
        torso = NatureTorso(spec.obs_shape[0], convs or conv_layers_for(spec.obs_shape), spec.pixel_max)
        with torch.no_grad():
            features = torso(torch.zeros(1, *spec.obs_shape, dtype=torch.uint8)).shape[1]
        return torso, int(features)
    layers: list[nn.Module] = [nn.Flatten()]
    width = int(np.prod(spec.obs_shape))
    for _ in range(mlp_layers):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    return nn.Sequential(*layers), hidden
