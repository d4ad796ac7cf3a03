"""The FID Inception-v3: the 2015 TensorFlow graph (`inception-2015-12-05`) as pytorch-fid runs it.

FID is only comparable between papers when the feature network, its weights and the resize
are the same. The reference is pytorch-fid 0.3.0 (mseitzer/pytorch-fid,
`src/pytorch_fid/inception.py`): torchvision's `Inception3(num_classes=1008,
aux_logits=False)` with four block kinds patched to behave like the TF graph:

    FID-A (Mixed_5b/c/d), FID-C (Mixed_6b..e), FID-E_1 (Mixed_7b): the 3x3 average pool of
        the pool branch leaves the zero padding out of the mean (count_include_pad=False)
    FID-E_2 (Mixed_7c): the pool branch uses a 3x3 *max* pool (a quirk of the TF graph)

Mixed_6a (InceptionB) and Mixed_7a (InceptionD) are torchvision's unchanged. torchvision
itself cannot be installed next to our CPU torch (shared/ENVIRONMENT.md), so the network is
written out here, with torchvision's module names so the published weight files load:

- pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`: a flat name -> tensor dict that
  pytorch-fid loads strictly into that torchvision model, so its keys are exactly the
  model's state dict: `Conv2d_*` / `Mixed_*` BasicConv2d blocks, each `<name>.conv.weight`
  plus `<name>.bn.{weight,bias,running_mean,running_var,num_batches_tracked}`, then
  `fc.weight` (1008, 2048) and `fc.bias` (1008,); no `AuxLogits.*` (aux_logits=False
  leaves that module None). The `num_batches_tracked` entries are in the file: a user on
  torch 0.4.0, which predates them, got them as unexpected keys (pytorch-fid issue #34).
- torch-fidelity's `weights-inception-2015-12-05-6726825d.pth` (also what torchmetrics'
  FID loads): the same names (its module tree mirrors torchvision's; its extra
  `MaxPool_1` / `MaxPool_2` / `AvgPool` hold no tensors), but written by its converter
  (`utils/util_convert_inception_weights.py`) with only weight / bias / running_mean /
  running_var per BatchNorm: no `num_batches_tracked`. We fill those with 0 (what torch
  itself does for an old-style state dict); they play no part in eval-mode BatchNorm.

`from_file` tells the two apart by whether any `num_batches_tracked` key is present, then
checks every key and shape strictly; `save_file` writes pytorch-fid's layout.

Input handling is pytorch-fid's: RGB in [0, 1] (its ToTensor of a PIL image), bilinear
`F.interpolate` to 299x299 with align_corners=False and no antialiasing, then 2x - 1.
(torch-fidelity / torchmetrics resize differently, so their numbers differ slightly.)

Shapes through the trunk for a 299x299 input:

    Conv2d_1a_3x3 (s2) 32x149  Conv2d_2a_3x3 32x147  Conv2d_2b_3x3 64x147  maxpool 64x73
    Conv2d_3b_1x1 80x73        Conv2d_4a_3x3 192x71  maxpool 192x35
    Mixed_5b 256x35  Mixed_5c 288x35  Mixed_5d 288x35  Mixed_6a 768x17
    Mixed_6b..6e 768x17        Mixed_7a 1280x8       Mixed_7b 2048x8  Mixed_7c 2048x8
    global average pool -> (B, 2048): the "pool3" features FID is computed on
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from stages.common.checkpoint import load_state_dict_strict, load_torch_state, save_torch_state, with_batch_counts

# What to write next to any FID number this network produced.
FID_SETTINGS = {
    "implementation": "imgtalk FIDInceptionV3 (pytorch-fid 0.3.0 network and input handling)",
    "weights": "pt_inception-2015-12-05-6726825d.pth (TF inception-2015-12-05)",
    "resize": "bilinear to 299x299, align_corners=False, no antialias",
    "input": "RGB [0,1] -> [-1,1] (2x-1)",
    "features": "pool3, 2048-d (final average pool)",
    "frechet": "float64, scipy.linalg.sqrtm, eps=1e-6 diagonal offset if non-finite",
}

PYTORCH_FID_FILE = "pt_inception-2015-12-05-6726825d.pth"
TORCH_FIDELITY_FILE = "weights-inception-2015-12-05-6726825d.pth"
_NBT = "num_batches_tracked"


@dataclass
class InceptionConfig:
    num_classes: int = 1008  # the TF graph's softmax: 1000 ImageNet classes + 8 unused
    image_size: int = 299  # inputs are resized to this square first
    bn_eps: float = 0.001  # torchvision's BasicConv2d (TF's batchnorm epsilon)


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm -> ReLU; the keys are `conv.weight` and `bn.*`."""

    def __init__(self, in_ch: int, out_ch: int, eps: float = 0.001, **conv_kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, bias=False, **conv_kwargs)
        self.bn = nn.BatchNorm2d(out_ch, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


def _avg_pool_3x3(x: Tensor) -> Tensor:
    # TF's SAME average pool divides by the number of real (unpadded) pixels.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    """35x35 block: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1  -> 224 + pool_features ch."""

    def __init__(self, in_ch: int, pool_features: int, eps: float):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_ch, 64, eps, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_ch, 48, eps, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, eps, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, eps, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, eps, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, eps, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_ch, pool_features, eps, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        a = self.branch1x1(x)
        b = self.branch5x5_2(self.branch5x5_1(x))
        c = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        d = self.branch_pool(_avg_pool_3x3(x))
        return torch.cat([a, b, c, d], 1)


class InceptionB(nn.Module):
    """35 -> 17 reduction: 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2  -> 384 + 96 + in_ch ch."""

    def __init__(self, in_ch: int, eps: float):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_ch, 384, eps, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, eps, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, eps, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, eps, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        a = self.branch3x3(x)
        b = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        c = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([a, b, c], 1)


class FIDInceptionC(nn.Module):
    """17x17 block with factorised 7x7s (c7 = channels_7x7) -> 4 x 192 = 768 ch."""

    def __init__(self, in_ch: int, channels_7x7: int, eps: float):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_ch, 192, eps, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_ch, c7, eps, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, eps, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, eps, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_ch, c7, eps, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, eps, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, eps, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, eps, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, eps, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_ch, 192, eps, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        a = self.branch1x1(x)
        b = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        c = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            c = conv(c)
        d = self.branch_pool(_avg_pool_3x3(x))
        return torch.cat([a, b, c, d], 1)


class InceptionD(nn.Module):
    """17 -> 8 reduction: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2  -> 320 + 192 + in_ch ch."""

    def __init__(self, in_ch: int, eps: float):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_ch, 192, eps, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, eps, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_ch, 192, eps, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, eps, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, eps, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, eps, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        a = self.branch3x3_2(self.branch3x3_1(x))
        b = self.branch7x7x3_1(x)
        for conv in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b = conv(b)
        c = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([a, b, c], 1)


class FIDInceptionE(nn.Module):
    """8x8 block with split 1x3/3x1 heads -> 320 + 768 + 768 + 192 = 2048 ch.

    pool="avg" is pytorch-fid's FIDInceptionE_1 (Mixed_7b), pool="max" its FIDInceptionE_2
    (Mixed_7c). Same tensors either way.
    """

    def __init__(self, in_ch: int, eps: float, pool: str):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_ch, 320, eps, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_ch, 384, eps, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, eps, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, eps, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 448, eps, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, eps, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, eps, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, eps, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_ch, 192, eps, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        a = self.branch1x1(x)
        b = self.branch3x3_1(x)
        b = torch.cat([self.branch3x3_2a(b), self.branch3x3_2b(b)], 1)
        c = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        c = torch.cat([self.branch3x3dbl_3a(c), self.branch3x3dbl_3b(c)], 1)
        if self.pool == "avg":
            p = _avg_pool_3x3(x)
        else:
            p = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        d = self.branch_pool(p)
        return torch.cat([a, b, c, d], 1)


class FIDInceptionV3(nn.Module):
    """images (B,3,H,W) RGB float in [0,1], any H,W -> (B,2048) float32 pool3 features.

    Attribute order follows torchvision's Inception3, so `state_dict()` lists its keys in
    the same order as pytorch-fid's file. A fresh instance is randomly initialised (conv
    weights He-normal so activations keep their scale through the 94 convolutions, BN at
    identity): a stand-in for tests; real FIDs need `from_file`.
    """

    def __init__(self, config: InceptionConfig | None = None):
        super().__init__()
        self.config = config = config or InceptionConfig()
        e = config.bn_eps
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, e, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, e, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, e, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, e, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, e, kernel_size=3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32, eps=e)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64, eps=e)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64, eps=e)
        self.Mixed_6a = InceptionB(288, eps=e)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128, eps=e)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160, eps=e)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160, eps=e)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192, eps=e)
        self.Mixed_7a = InceptionD(768, eps=e)
        self.Mixed_7b = FIDInceptionE(1280, eps=e, pool="avg")
        self.Mixed_7c = FIDInceptionE(2048, eps=e, pool="max")
        # Kept because it is in the weight file; FID never uses the logits.
        self.fc = nn.Linear(2048, config.num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)
        self.eval()

    def forward(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B,3,H,W), got {tuple(images.shape)}")
        size = self.config.image_size
        x = images.to(torch.float32)
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)  # (B,3,299,299)
        x = 2 * x - 1  # [0,1] -> [-1,1]
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B,64,147,147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B,64,73,73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (B,192,71,71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B,192,35,35)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                      self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)  # ... (B,2048,8,8)
        return torch.flatten(F.adaptive_avg_pool2d(x, (1, 1)), 1)  # (B,2048)

    def logits(self, features: Tensor) -> Tensor:
        """(B,2048) pool3 features -> (B,1008) class logits (not used by FID)."""
        return self.fc(features)

    @classmethod
    def from_file(cls, path: str) -> "FIDInceptionV3":
        """Load pytorch-fid's or torch-fidelity's weight file strictly (see the module doc).

        Any missing, unexpected or misshapen tensor raises CheckpointError naming the file
        and the key(s). Returns the model in eval mode on the CPU.
        """
        state = load_torch_state(path, "pytorch-fid / torch-fidelity Inception")
        model = cls()
        layout = weight_file_layout(state)
        if layout == "torch-fidelity":
            state = with_batch_counts(model, state)  # its file has none
        source = f"{path} ({layout} layout)"
        load_state_dict_strict(model, state, source=source)
        return model.eval()

    def save_file(self, path: str) -> None:
        """Write pytorch-fid's layout: a flat name -> tensor dict, as torch.save'd."""
        save_torch_state(self, path)


def weight_file_layout(state: dict) -> str:
    """Which file a state dict came from: "pytorch-fid" if it carries BatchNorm
    `num_batches_tracked` entries, else "torch-fidelity" (the names are otherwise the same)."""
    return "pytorch-fid" if any(k.endswith(_NBT) for k in state) else "torch-fidelity"

