"""Patch discriminator D_patch for Stage 2's adversarial loss (paper Eq. 14).

pix2pix's "NLayer" design: each output logit judges one overlapping patch of the frame
(70x70 pixels at the default n_layers=3), so it pushes local texture (lips, teeth, the
mask boundary the paper mentions) rather than global layout, which L1/perceptual and the
motion loss already pin down.

Normalisation: InstanceNorm, not BatchNorm. The discriminator is fed all-real and
all-fake batches separately, and Stage 2 batches are small (MuseTalk trains with 2 clips
per GPU); BatchNorm statistics would then differ between the two kinds of batch and between
train and eval, which lets D tell real from fake by batch statistics alone. InstanceNorm
normalises each image on its own, behaves the same in train and eval, and keeps no running
buffers, so save/load carries only learned weights. Its affine scale/shift stay learnable;
the conv before it has no bias, since the normalisation would remove it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn
from torch import Tensor

from stages.common.checkpoint import load_pretrained, save_pretrained


@dataclass
class PatchDiscriminatorConfig:
    in_channels: int = 3
    base_channels: int = 64
    n_layers: int = 3  # 3 → 70x70 receptive field, a (B,1,30,30) map at 256²

    @classmethod
    def tiny(cls) -> "PatchDiscriminatorConfig":
        return cls(base_channels=8, n_layers=2)


class PatchDiscriminator(nn.Module):
    def __init__(self, config: PatchDiscriminatorConfig | None = None):
        super().__init__()
        self.config = config = config or PatchDiscriminatorConfig()
        if config.n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {config.n_layers}")
        ch = config.base_channels
        # No norm on the first layer: normalising raw pixels would throw away colour and
        # brightness, which is part of what looks real.
        layers: list[nn.Module] = [
            nn.Conv2d(config.in_channels, ch, kernel_size=4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
        ]
        # n_layers normalised blocks, width doubling up to 8x; all halve the resolution
        # except the last, which (stride 1) widens the receptive field without shrinking the map.
        for n in range(1, config.n_layers + 1):
            out_ch = config.base_channels * min(2**n, 8)
            stride = 2 if n < config.n_layers else 1
            layers += [
                nn.Conv2d(ch, out_ch, kernel_size=4, stride=stride, padding=1, bias=False),
                nn.InstanceNorm2d(out_ch, affine=True),
                nn.LeakyReLU(0.2),
            ]
            ch = out_ch
        layers.append(nn.Conv2d(ch, 1, kernel_size=4, stride=1, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, image: Tensor) -> Tensor:
        # image: (B,3,H,W) RGB in [0,1], the range of the decoded frames and ground truth.
        x = image * 2.0 - 1.0  # centred input for the first (un-normalised) conv
        return self.net(x)  # (B,1,h',w') raw logits; h' = H/2^n_layers - 2

    def save_pretrained(self, folder: str) -> None:
        save_pretrained(self, self.config, folder)

    @classmethod
    def from_pretrained(cls, folder: str) -> "PatchDiscriminator":
        return load_pretrained(cls, PatchDiscriminatorConfig, folder)
