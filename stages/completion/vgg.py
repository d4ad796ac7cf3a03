"""VGG-19 for the Stage 2 perceptual loss (paper Eq. 12), laid out like torchvision's `vgg19`.

torchvision cannot be installed next to our CPU torch (see shared/ENVIRONMENT.md), so the
network lives here. Module names and Sequential indices match torchvision exactly, so the
ImageNet weights users already have (`vgg19-dcbb9e9d.pth`, a flat state dict of 38 tensors,
143,667,240 parameters) load strictly, and `save_pretrained` writes the same layout back.

Layout of `features` (conv = 3x3, padding 1, each followed by a ReLU at index + 1):

    block 1: conv 0, 2                 (64 ch)    maxpool 4
    block 2: conv 5, 7                 (128 ch)   maxpool 9
    block 3: conv 10, 12, 14, 16       (256 ch)   maxpool 18
    block 4: conv 19, 21, 23, 25       (512 ch)   maxpool 27
    block 5: conv 28, 30, 32, 34       (512 ch)   maxpool 36
"""
from __future__ import annotations


import torch
import torch.nn as nn
from torch import Tensor

from stages.common.checkpoint import load_state_dict_strict, load_torch_state, save_torch_state

# torchvision's configuration "E": channel counts, "M" = 2x2 max pool.
VGG19_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M")

# relu1_2, relu2_2, relu3_4, relu4_4, relu5_4: the last ReLU of each block. This is the set
# used by the perceptual losses of pix2pixHD/SPADE and (as a VGG-19 pyramid) by MuseTalk, the
# closest published peer; the IMGTalk paper names no layers. One layer per scale gives the
# loss both fine texture (block 1-2) and mouth-shape structure (block 4-5).
VGG19_PERCEPTUAL_LAYERS = (3, 8, 17, 26, 35)


def _make_features(width_div: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    in_ch = 3
    for v in VGG19_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            out_ch = v // width_div
            layers.append(nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1))
            # Not in-place: feature_maps hands these activations out, and an in-place ReLU
            # would let a later layer overwrite a tensor the caller is still holding.
            layers.append(nn.ReLU(inplace=False))
            in_ch = out_ch
    return nn.Sequential(*layers)


class VGG19(nn.Module):
    def __init__(self, include_classifier: bool = True, width_div: int = 1):
        super().__init__()
        # width_div > 1 is a narrow copy for tests; it keeps every index and key name.
        if width_div < 1 or 64 % width_div or 4096 % width_div:
            raise ValueError(f"width_div must divide 64 and 4096, got {width_div}")
        self.include_classifier = include_classifier
        self.width_div = width_div
        self.features = _make_features(width_div)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        if include_classifier:
            hidden = 4096 // width_div
            self.classifier = nn.Sequential(
                nn.Linear((512 // width_div) * 7 * 7, hidden),
                nn.ReLU(inplace=False),
                nn.Dropout(p=0.5),
                nn.Linear(hidden, hidden),
                nn.ReLU(inplace=False),
                nn.Dropout(p=0.5),
                nn.Linear(hidden, 1000),
            )
        else:
            self.classifier = None
        self._init_weights()

    def _init_weights(self) -> None:
        # torchvision's initialisation, so a from-scratch VGG19 trains like theirs.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        # x: (B,3,H,W), already ImageNet-normalised
        x = self.features(x)  # (B,512/div,H/32,W/32)
        if self.classifier is None:
            return x
        x = torch.flatten(self.avgpool(x), 1)  # (B,512/div*49)
        return self.classifier(x)  # (B,1000) logits

    def feature_maps(self, x: Tensor, layers: tuple[int, ...]) -> list[Tensor]:
        """Activations after the given `features` indices, in the order asked for.

        The network runs only as deep as the deepest index asked for.
        """
        if not layers:
            return []
        n = len(self.features)
        for i in layers:
            if not 0 <= i < n:
                raise ValueError(f"feature index {i} is outside features[0..{n - 1}]")
        wanted = set(layers)
        taken: dict[int, Tensor] = {}
        for i, layer in enumerate(self.features[: max(layers) + 1]):
            x = layer(x)
            if i in wanted:
                taken[i] = x
        return [taken[i] for i in layers]

    @classmethod
    def from_pretrained(cls, path: str, include_classifier: bool = False, *, width_div: int = 1) -> "VGG19":
        """Load a torchvision-layout flat state dict (e.g. `vgg19-dcbb9e9d.pth`).

        With include_classifier=False the file's `classifier.*` tensors are ignored on
        purpose: the perceptual loss needs only `features`, and skipping the 124 M
        classifier parameters saves ~500 MB. Every `features.*` tensor must still be
        present with the right shape, and any other key is an error naming the file.
        """
        state = load_torch_state(path, "torchvision VGG19")
        if not include_classifier:
            state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
        model = cls(include_classifier=include_classifier, width_div=width_div)
        load_state_dict_strict(model, state, source=path)
        return model.eval()

    def save_pretrained(self, path: str) -> None:
        """Write a flat state dict in torchvision's layout (loadable by torchvision too)."""
        save_torch_state(self, path)
