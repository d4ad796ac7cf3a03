"""Stage 2 training objective (paper "Training objectives", Eq. 11-15).

    L_total = λ_rec L_rec + λ_perc L_perc + λ_motion L_motion + λ_adv L_adv        (15)

All image inputs are RGB in [0, 1], (B, 3, H, W): the VAE-decoded frame Î and the ground
truth I_gt. Every term is a mean over its elements (the paper writes plain norms); a mean
keeps each term's size independent of batch and resolution, and any constant factor is
absorbed into its λ.

This module is the generator side only. The discriminator's own step uses
`discriminator_loss` on D(I_gt) and D(Î.detach()). `Stage2Loss` runs D on Î, so D's
parameters receive gradients from L_adv: freeze D (requires_grad_(False)) during the
generator step, or zero its gradients before its own step, as pix2pix does.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from stages.completion.vgg import VGG19, VGG19_PERCEPTUAL_LAYERS
from stages.motion.extractor import motion_info

# torchvision's ImageNet statistics, which the VGG-19 weights were trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Stage2LossWeights:
    # The paper gives no values for λ_rec, λ_perc, λ_motion, λ_adv or λ_c. rec 1 / perc 0.01 /
    # adv 0.01 are MuseTalk v1.5's (pixel L1 1.0, VGG perceptual 0.01, GAN 0.01), the closest
    # published latent-inpainting lip-sync recipe. motion 1.0 puts the motion L1 on the same
    # footing as the pixel L1, and lambda_c 0.1 keeps identity (x_c) a weaker constraint than
    # mouth shape (δ), mirroring the paper's λ = 0.1 for its Stage 1 secondary term.
    rec: float = 1.0
    perc: float = 0.01
    motion: float = 1.0
    adv: float = 0.01
    lambda_c: float = 0.1
    # Optional, not in the paper: L1 between the completed latent ẑ and E(I_gt) inside the
    # latent-resolution mouth mask. 0 = off (the paper's objective). It gives the UNet a direct
    # target without the decoder in the graph, e.g. for a cheap warm-up or a sanity overfit.
    latent: float = 0.0


def reconstruction_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Eq. 11: pixel L1 over the whole image, mean over elements."""
    return F.l1_loss(pred, target)


def masked_l1(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean |pred − target| over the elements where mask is 1 (mask broadcasts to pred, e.g.
    (B or 1, 1, h, w) against (B, C, h, w); soft masks weight elements). No mask: plain mean."""
    if mask is None:
        return F.l1_loss(pred, target)
    weight = mask.to(pred.dtype).expand_as(pred)
    return ((pred - target).abs() * weight).sum() / weight.sum().clamp_min(1e-8)


def _freeze(net: nn.Module) -> nn.Module:
    net.requires_grad_(False)
    return net.eval()


class PerceptualLoss(nn.Module):
    """Eq. 12: Σ_l mean ||φ_l(Î) − φ_l(I_gt)||² over VGG-19 activations φ_l.

    The VGG is frozen (no parameter gradients) but the loss is differentiable wrt Î.
    """

    def __init__(self, vgg: VGG19, layers: tuple[int, ...] = VGG19_PERCEPTUAL_LAYERS):
        super().__init__()
        if not layers:
            raise ValueError("PerceptualLoss needs at least one VGG layer")
        self.vgg = _freeze(vgg)
        self.layers = tuple(layers)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> "PerceptualLoss":
        super().train(mode)
        self.vgg.eval()  # a frozen network stays in eval mode when the loss is set to train()
        return self

    def _features(self, image: Tensor) -> list[Tensor]:
        return self.vgg.feature_maps((image - self.mean) / self.std, self.layers)

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        pred_feats = self._features(pred)
        with torch.no_grad():  # the target is a constant: keep no graph for it
            target_feats = self._features(target)
        return sum(F.mse_loss(p, t) for p, t in zip(pred_feats, target_feats))


class MotionLoss(nn.Module):
    """Eq. 13: ||δ̂ − δ||_1 + λ_c ||x̂_c − x_c||_1.

    The frozen motion extractor runs on the generated frame, differentiably, so the loss
    steers the generator toward the driving mouth shape δ (exp) while keeping the
    canonical keypoints x_c (identity) of the source.

    keypoints: optional subset of keypoints for the δ term (e.g. the lip set). The paper's
    δ_k could mean the lip keypoints only; by default all K are used, as in Eq. 8's tokens.
    """

    def __init__(self, extractor: nn.Module, lambda_c: float = 0.1, *, keypoints: tuple[int, ...] | None = None):
        super().__init__()
        self.extractor = _freeze(extractor)
        self.lambda_c = float(lambda_c)
        self.keypoints = tuple(keypoints) if keypoints is not None else None

    def train(self, mode: bool = True) -> "MotionLoss":
        super().train(mode)
        self.extractor.eval()  # frozen: no dropout or running-statistics updates during training
        return self

    def terms(self, generated: Tensor, target_exp: Tensor, target_x_c: Tensor) -> tuple[Tensor, Tensor]:
        """(δ term, x_c term), unweighted. generated: (B,3,256,256) in [0,1]; targets (B,K,3)."""
        info = motion_info(self.extractor(generated))
        exp, x_c = info["exp"], info["x_c"]  # (B,K,3) each
        if exp.shape != target_exp.shape or x_c.shape != target_x_c.shape:
            raise ValueError(
                f"motion targets have shapes exp {tuple(target_exp.shape)}, x_c {tuple(target_x_c.shape)}; "
                f"the extractor gives {tuple(exp.shape)}, {tuple(x_c.shape)}"
            )
        if self.keypoints is not None:
            exp, target_exp = exp[:, self.keypoints], target_exp[:, self.keypoints]
        return F.l1_loss(exp, target_exp), F.l1_loss(x_c, target_x_c)

    def forward(self, generated: Tensor, target_exp: Tensor, target_x_c: Tensor) -> Tensor:
        exp_term, x_c_term = self.terms(generated, target_exp, target_x_c)
        return exp_term + self.lambda_c * x_c_term


def adversarial_generator_loss(fake_logits: Tensor) -> Tensor:
    """Eq. 14: −E[log D(Î)], the non-saturating GAN loss, as BCE-with-logits against 1.

    Written on logits (log σ(x) = −softplus(−x)) so it stays finite when D is confident.
    """
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


def discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """BCE with real → 1 and fake → 0, each a mean over patches, averaged over the two.

    The ½ is pix2pix's: it halves D's step relative to G's.
    """
    real = F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
    fake = F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    return 0.5 * (real + fake)


class Stage2Loss(nn.Module):
    """Eq. 15. forward -> (total, parts); parts holds the unweighted terms that were computed.

    A term whose weight is 0 is never computed (its network is never run) and is absent
    from parts; its module may then be None.
    """

    def __init__(
        self,
        weights: Stage2LossWeights,
        perceptual: PerceptualLoss | None,
        motion_loss: MotionLoss | None,
        discriminator: nn.Module | None,
    ):
        super().__init__()
        self.weights = weights
        for name in ("rec", "perc", "motion", "adv", "lambda_c", "latent"):
            if getattr(weights, name) < 0:
                raise ValueError(f"Stage2LossWeights.{name} must be >= 0, got {getattr(weights, name)}")
        for name, module in (("perc", perceptual), ("motion", motion_loss), ("adv", discriminator)):
            if getattr(weights, name) > 0 and module is None:
                raise ValueError(f"weight {name}={getattr(weights, name)} needs its module, got None")
        if not any((weights.rec, weights.perc, weights.motion, weights.adv, weights.latent)):
            raise ValueError("all Stage 2 loss weights are 0: nothing to train")
        # One source of truth for λ_c: a MotionLoss built with another value is a config mistake.
        if motion_loss is not None and weights.motion > 0 and motion_loss.lambda_c != weights.lambda_c:
            raise ValueError(
                f"MotionLoss.lambda_c={motion_loss.lambda_c} disagrees with Stage2LossWeights.lambda_c={weights.lambda_c}"
            )
        self.perceptual = perceptual
        self.motion_loss = motion_loss
        self.discriminator = discriminator

    def forward(
        self,
        generated: Tensor | None,
        target: Tensor | None,
        target_exp: Tensor | None,
        target_x_c: Tensor | None,
        *,
        completed_latent: Tensor | None = None,
        target_latent: Tensor | None = None,
        latent_mask: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        # generated, target: (B,3,256,256) in [0,1]; target_exp, target_x_c: (B,K,3).
        # completed_latent, target_latent (B,4,h,w) and latent_mask (B or 1,1,h,w; None = whole
        # latent) are used only when weights.latent > 0; the pixel inputs only by pixel terms.
        w = self.weights
        parts: dict[str, Tensor] = {}
        if w.latent > 0:
            if completed_latent is None or target_latent is None:
                raise ValueError("Stage2Loss: weights.latent > 0 needs completed_latent and target_latent")
            parts["latent"] = masked_l1(completed_latent, target_latent.detach(), latent_mask)
        if w.rec > 0:
            parts["rec"] = reconstruction_loss(generated, target)
        if w.perc > 0:
            parts["perc"] = self.perceptual(generated, target)
        if w.motion > 0:
            parts["motion"] = self.motion_loss(generated, target_exp, target_x_c)
        if w.adv > 0:
            parts["adv"] = adversarial_generator_loss(self.discriminator(generated))  # logits (B,1,h',w')
        total = sum(getattr(w, name) * value for name, value in parts.items())
        return total, parts
