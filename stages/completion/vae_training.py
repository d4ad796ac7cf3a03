"""Training a small stand-in for the SD VAE on a corpus's face crops, framework-free.

No VAE weights reach the machines this project is built and tested on, and a randomly
initialised decoder draws noise, so nothing downstream (Stage 2, the dub, the lip-sync
measure) can show anything. `imgtalk train vae` fits a small `AutoencoderKL` (same diffusers
class and file format as `stabilityai/sd-vae-ft-mse`, narrower) to the prepared crops.
With the real SD VAE in a bundle this is never needed: its weights stay frozen, as in the
paper.

Loss (the SD VAE's recipe without its LPIPS and GAN terms, which need downloaded critics):

    z ~ q(z|x) (reparameterised)           x_hat = D(z)
    L = mean(w * |x_hat - x|) + β KL(q(z|x) || N(0, I))      w = 1 + mouth_weight * M

M is the pixel mouth mask: the mouth is the only region Stage 2 repaints and the only one
the dub pastes back, so its detail is weighted up. After training the diffusers
`scaling_factor` is set to 1 / std of the latents' posterior means (tracked during
training), which is how the SD VAE's 0.18215 was chosen: the IMC-UNet sees unit-variance
latents.

With `decoder_only` the trainer fine-tunes the decoder of an already trained VAE and keeps
its encoder and scaling factor, so the latents, and a Stage 2 trained on them, keep their
meaning: Stability AI made `sd-vae-ft-mse` from the SD VAE the same way. The KL term is then
a constant and is left out.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from stages.common.optim import optimisation_step, warmup_cosine
from stages.completion.vae import LatentVAE


def sample_crops(chunk: dict, rng: np.random.Generator, count: int) -> list[dict]:
    """Up to `count` face crops {"image": (S,S,3) uint8} of a prepared chunk, drawn without
    replacement among the frames where a face was found."""
    faces = np.flatnonzero(np.asarray(chunk["has_face"], dtype=bool))
    picks = rng.permutation(faces)[:count]
    return [{"image": np.asarray(chunk["crops"][int(i)])} for i in picks]


@dataclass
class VaeTrainConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 50
    total_steps: int = 1000
    grad_clip: float = 1.0
    kl: float = 1e-6  # β: the SD VAE's KL weight
    mouth_weight: float = 4.0
    std_momentum: float = 0.05  # EMA of the latents' std, for the scaling factor
    decoder_only: bool = False  # fine-tune the decoder; encoder and scaling factor kept
    # Decode a sample of the posterior while training (the SD VAE's recipe), or its mode, which
    # is what the dub decodes (LatentVAE.encode, Stage 2's latents). A briefly trained encoder's
    # posterior is wide (std about 0.47 against a spread of 0.73 between the means of the demo
    # bundle's first pass), and a decoder fine-tuned on such samples learns to blur what the
    # noise hides: the closed lips' line.
    sample_latents: bool = True


class VaeTrainer:
    """One step at a time, like the Stage 1/2 trainers; `vae` is a LatentVAE whose
    AutoencoderKL is trained here (unfrozen), `mouth_mask` (S,S) with 1 = mouth."""

    def __init__(self, vae: LatentVAE, mouth_mask: np.ndarray, cfg: VaeTrainConfig,
                 wrap: Callable[[nn.Module], nn.Module] = lambda m: m, device="cpu", seed: int = 0):
        self.cfg = cfg
        self.device = torch.device(device)
        self.vae = vae.to(self.device)
        vae_net = self.vae.vae
        vae_net.requires_grad_(True).train()
        if cfg.decoder_only:
            vae_net.encoder.requires_grad_(False)
            if vae_net.quant_conv is not None:
                vae_net.quant_conv.requires_grad_(False)
        self.trained_parameters = [p for p in vae_net.parameters() if p.requires_grad]
        self.net = wrap(vae_net)
        mask = torch.as_tensor(np.asarray(mouth_mask, dtype=np.float32))[None, None]  # (1,1,S,S)
        self.weight = (1.0 + cfg.mouth_weight * mask).to(self.device)
        self.optimizer = torch.optim.AdamW(self.trained_parameters, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = warmup_cosine(self.optimizer, cfg.warmup_steps, cfg.total_steps)
        self.generator = torch.Generator().manual_seed(seed)
        # 0 = not measured yet; a decoder fine-tune keeps the latents, hence their std
        kept_std = 1.0 / float(vae_net.config.scaling_factor) if cfg.decoder_only else 0.0
        self.latent_std = torch.tensor(kept_std, dtype=torch.float64)

    def _images(self, batch: dict) -> Tensor:
        return batch["image"].to(self.device, torch.float32)  # (B,3,S,S) in [0,1]

    def _forward(self, images: Tensor, sample: bool):
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.cfg.decoder_only):
            posterior = self.net.encode(images * 2.0 - 1.0).latent_dist
        if sample:
            noise = torch.randn(posterior.mean.shape, generator=self.generator).to(self.device)
            z = posterior.mean + posterior.std * noise
        else:
            z = posterior.mode()
        decoded = (self.net.decode(z).sample + 1.0) / 2.0  # (B,3,S,S), about [0,1]
        return posterior, decoded

    def step(self, batch: dict, step: int) -> dict[str, float]:
        images = self._images(batch)
        self.net.train()
        posterior, decoded = self._forward(images, sample=self.cfg.sample_latents)
        rec = (self.weight * (decoded - images).abs()).mean() / self.weight.mean()
        kl = posterior.kl().mean() / images[0].numel()  # per pixel, as the reconstruction term
        loss = rec if self.cfg.decoder_only else rec + self.cfg.kl * images[0].numel() * kl
        lr = optimisation_step(loss, self.optimizer, self.scheduler, self.trained_parameters, self.cfg.grad_clip)
        if not self.cfg.decoder_only:
            std = posterior.mean.detach().double().std().cpu()
            m = self.cfg.std_momentum
            self.latent_std = std if float(self.latent_std) == 0.0 else (1 - m) * self.latent_std + m * std
        return {"loss": float(loss.detach()), "rec": float(rec.detach()), "kl": float(kl.detach()), "lr": float(lr),
                "latent_std": float(self.latent_std)}

    @torch.no_grad()
    def evaluate(self, batch: dict) -> dict[str, float]:
        """Deterministic (posterior mode, as the dub encodes): L1, mouth L1, PSNR in dB."""
        images = self._images(batch)
        self.vae.vae.eval()
        _, decoded = self._forward(images, sample=False)
        decoded = decoded.clamp(0, 1)
        mouth = (self.weight > 1).expand_as(images)
        mse = float(((decoded - images) ** 2).mean())
        return {"rec": float((decoded - images).abs().mean()),
                "rec_mouth": float((decoded - images).abs()[mouth].mean()) if mouth.any() else 0.0,
                "psnr": float(10 * np.log10(1.0 / max(mse, 1e-12)))}

    def trained_vae(self) -> LatentVAE:
        """The trained network as a frozen LatentVAE whose scaling factor whitens its latents."""
        return with_scaling_factor(self.vae, float(self.latent_std))

    def state_dict(self) -> dict:
        return {"vae": self.vae.vae.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "generator": self.generator.get_state(),
                "latent_std": self.latent_std.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.vae.vae.load_state_dict(state["vae"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        self.latent_std = state["latent_std"].to(torch.float64).cpu()


def with_scaling_factor(vae: LatentVAE, latent_std: float) -> LatentVAE:
    """A frozen LatentVAE of the same AutoencoderKL whose scaling factor is 1 / latent_std
    (recorded in the diffusers config, so save_pretrained / from_pretrained keep it)."""
    if not latent_std > 0:
        raise ValueError(f"with_scaling_factor: latent std must be > 0, got {latent_std}")
    vae.vae.register_to_config(scaling_factor=1.0 / latent_std)
    return LatentVAE(vae.vae)
