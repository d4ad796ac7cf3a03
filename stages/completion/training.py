"""IMGTalk Stage 2 training, framework-free: pair sampling and one G/D optimisation step.

Plain PyTorch (no Ray): a Ray Train harness hosts `Stage2Trainer` and passes DDP as `wrap`.

Step (MuseTalk's recipe, training.md §1, with IMGTalk's conditions):

    masked = target * (1 - M)                    pixel mouth mask M, 1 = completed
    z_m, z_r = E(masked), E(reference)           frozen VAE, posterior mode, no grad
    z_hat = UNet(z_m, motion, z_r)               the only trained generator
    I_hat = D_vae(z_hat)                         frozen decoder, in the graph
    L = Stage2Loss(I_hat, target, δ, x_c)        Eq. 15 (+ optional latent L1)

GAN under DDP (training.md §4): the UNet and the patch discriminator are wrapped separately,
each with its own AdamW and warm-up + cosine schedule. During the G step the discriminator is
frozen (requires_grad_(False)) and run unwrapped: its parameters take no gradient there, so
its DDP wrapper must not see that forward (its reducer would wait for gradients that never
come). The D step runs the wrapped D on the target and on I_hat.detach(). The adversarial
term and the D updates start at `gan_start_step` (MuseTalk: 1000). The frozen critics (VAE,
VGG, motion extractor) are eval, requires_grad_(False), outside every wrapper and optimiser.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stages.common.optim import warmup_cosine
from stages.completion.losses import (
    MotionLoss,
    PerceptualLoss,
    Stage2Loss,
    Stage2LossWeights,
    discriminator_loss,
    masked_l1,
)
from stages.motion.audio2motion import DRIVEN_KEYPOINTS  # lip set + 3, 7: what Stage 1 drives


# ----------------------------------------------------------------------------- pairs


def stage2_condition(target_exp: np.ndarray, neutral_exp: np.ndarray, driven: tuple = DRIVEN_KEYPOINTS) -> np.ndarray:
    """The Stage 2 motion condition (21,3): the target's δ on the driven keypoints, the video's
    neutral δ elsewhere. At dubbing time the non-driven keypoints come from the source frame,
    which still carries the source's mouth; training on neutral values there means the network
    never learns to read a mouth from them (review finding c)."""
    motion = np.array(neutral_exp, dtype=np.float32, copy=True)
    driven = list(driven)
    motion[driven] = np.asarray(target_exp, dtype=np.float32)[driven]
    return motion


def audio_window(audio: np.ndarray, t: int, window_frames: int) -> np.ndarray:
    """The audio condition of frame t (the "audio-conditioned IMC-UNet" ablation):
    audio (n, k, A), k rows per 25 fps frame (k = 2: HuBERT's 50 Hz) -> (k * (2w+1), A)
    float32, the rows of frames t-w..t+w in time order, frames clamped to [0, n-1] at the
    chunk's edges (the edge frame's rows repeat)."""
    audio = np.asarray(audio)
    if audio.ndim != 3 or len(audio) == 0:
        raise ValueError(f"audio_window: audio must be (n, k, A) with n >= 1, got {audio.shape}")
    if window_frames < 0:
        raise ValueError(f"audio_window: window_frames must be >= 0, got {window_frames}")
    frames = np.clip(np.arange(t - window_frames, t + window_frames + 1), 0, len(audio) - 1)
    return audio[frames].reshape(-1, audio.shape[-1]).astype(np.float32)


def sample_pairs(
    chunk: dict,
    video: dict,
    rng: np.random.Generator,
    pairs: int,
    min_gap_frames: int = 12,
    max_pose_deg: float = 10.0,
    driven: tuple = DRIVEN_KEYPOINTS,
    audio_window_frames: int | None = None,
    source_swap: float = 0.0,
    mouth_mask: np.ndarray | None = None,
) -> list[dict]:
    """Up to `pairs` (target, reference) training pairs from one prepared chunk (25 fps).

    Targets are drawn without replacement among the frames with a face. A target's reference
    is, among the frames with a face in the same shot (another shot may be another camera or
    person) at least `min_gap_frames` away (so never the target itself: MuseTalk's inference
    uses the target as its own reference, which hands the network the answer), the one with
    the most similar head pose: smallest Euclidean distance over (pitch, yaw, roll) in degrees.
    A target whose best distance exceeds `max_pose_deg`, or that has no allowed frame, is
    dropped. Fewer than `pairs` pairs come back when the chunk has too few usable targets.

    Each pair: target, reference (S,S,3) uint8; motion (21,3) float32, the Stage 2 condition
    (`stage2_condition`); target_exp, target_x_c (21,3) float32, the L_motion targets; gap
    (int, |Δt| in frames); target_index, reference_index (int). With `audio_window_frames`
    w given, also audio_condition (2*(2w+1), A) float32: `audio_window` of chunk["audio"]
    (n, 2, A) at the target, the condition of the audio-conditioned ablation.

    `source_swap` p: in a share p of the pairs, drawn at random, the frame the network sees
    through its hole is another one, s: at random among the frames allowed as the reference
    (same shot, `min_gap_frames` away, pose within `max_pose_deg`), and the pair's target is
    s with t's pixels under `mouth_mask` (S,S), 1 = hidden. That is what a dub asks of Stage
    2: the mouth of the condition drawn into a source whose own mouth, still speaking, is
    another, and whatever the hole leaves in view of it (cheeks, the shading the warp moves)
    tells nothing about the mouth wanted, so Stage 2 cannot learn to read it there. Each pair
    also has source_index (s, or t when not swapped). p = 0 draws nothing from `rng`: the
    pairs are those of before this option.
    """
    if min_gap_frames < 1:
        raise ValueError(f"sample_pairs: min_gap_frames must be >= 1 (never the target itself), got {min_gap_frames}")
    has_face = np.asarray(chunk["has_face"], dtype=bool)
    n = len(has_face)
    shot = np.asarray(chunk["shot"]) if "shot" in chunk else np.zeros(n, dtype=np.int32)
    pose = np.asarray(chunk["pose"], dtype=np.float64)  # (n,3) degrees
    exp, x_c, crops = chunk["exp"], chunk["x_c"], chunk["crops"]
    neutral = np.asarray(video["neutral_exp"], dtype=np.float32)
    frames = np.arange(n)
    if not 0.0 <= source_swap <= 1.0:
        raise ValueError(f"sample_pairs: source_swap must be in [0, 1], got {source_swap}")
    if source_swap > 0:
        if mouth_mask is None or np.shape(mouth_mask) != np.shape(crops[0])[:2]:
            raise ValueError(f"sample_pairs: source_swap needs the mouth_mask of the crops' size "
                             f"{np.shape(crops[0])[:2]}, got {None if mouth_mask is None else np.shape(mouth_mask)}")
        hidden = np.asarray(mouth_mask, dtype=np.float32)[..., None]  # (S,S,1)
    audio = None
    if audio_window_frames is not None:
        audio = np.asarray(chunk["audio"])
        if audio.ndim != 3 or len(audio) != n:
            raise ValueError(f"sample_pairs: chunk audio must be ({n}, k, A) rows per frame, got {audio.shape}")

    out: list[dict] = []
    for t in rng.permutation(np.flatnonzero(has_face)):
        if len(out) >= pairs:
            break
        allowed = has_face & (shot == shot[t]) & (np.abs(frames - t) >= min_gap_frames)
        if not allowed.any():
            continue
        candidates = np.flatnonzero(allowed)
        distance = np.linalg.norm(pose[candidates] - pose[t], axis=1)
        best = int(np.argmin(distance))
        if distance[best] > max_pose_deg:
            continue
        r = int(candidates[best])
        t = int(t)
        target, source = np.asarray(crops[t]), t
        if source_swap > 0 and rng.random() < source_swap:
            source = int(rng.choice(candidates[distance <= max_pose_deg]))
            seen = np.asarray(crops[source], dtype=np.float32)
            target = np.rint(seen * (1.0 - hidden) + target.astype(np.float32) * hidden).astype(target.dtype)
        pair = {
            "target": target,
            "reference": np.asarray(crops[r]),
            "motion": stage2_condition(exp[t], neutral, driven),
            "target_exp": np.asarray(exp[t], dtype=np.float32),
            "target_x_c": np.asarray(x_c[t], dtype=np.float32),
            "gap": abs(r - t),
            "target_index": t,
            "reference_index": r,
            "source_index": source,
        }
        if audio is not None:
            pair["audio_condition"] = audio_window(audio, t, audio_window_frames)
        out.append(pair)
    return out


def motion_statistics(motions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-keypoint mean and std (21,3) of Stage 2 conditions (N,21,3), for
    `IMCUNetConfig.with_motion_statistics`."""
    motions = np.asarray(motions, dtype=np.float64)
    return motions.mean(axis=0), motions.std(axis=0)


def pairs_to_batch(pairs: list[dict], device="cpu") -> dict[str, Tensor]:
    """Stack pair dicts into the tensors `Stage2Trainer.step` takes: images (B,3,S,S) in [0,1]."""
    images = lambda key: torch.from_numpy(np.stack([p[key] for p in pairs])).permute(0, 3, 1, 2).float() / 255.0  # noqa: E731
    arrays = lambda key: torch.from_numpy(np.stack([p[key] for p in pairs]).astype(np.float32))  # noqa: E731
    batch = {"target": images("target"), "reference": images("reference")}
    batch.update({key: arrays(key) for key in ("motion", "target_exp", "target_x_c")})
    return {key: value.to(device) for key, value in batch.items()}


# ----------------------------------------------------------------------------- config


@dataclass
class Stage2TrainConfig:
    # MuseTalk's optimiser (AdamW β (0.5, 0.999), wd 1e-2, clip 1.0, 1000 warm-up steps).
    lr: float = 1e-4
    alpha_lr: float = 1e-3  # RSCA alphas: own group, no weight decay, higher rate (they start at 0)
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.5, 0.999)
    warmup_steps: int = 1000
    total_steps: int = 100000
    grad_clip: float = 1.0
    d_lr: float = 5e-5
    d_betas: tuple[float, float] = (0.5, 0.999)
    gan_start_step: int = 1000  # L_adv and the D updates are off before this step
    loss: Stage2LossWeights = field(default_factory=Stage2LossWeights)
    gradient_checkpointing: bool = False
    # std of Gaussian noise added to the driven keypoints' δ of the condition in training
    # (`noisy_motion`), drawn from noise_seed and the step, so a resumed run draws the same
    motion_noise: float = 0.0
    noise_seed: int = 0

    def __post_init__(self):
        self.betas = tuple(float(b) for b in self.betas)
        self.d_betas = tuple(float(b) for b in self.d_betas)
        if isinstance(self.loss, dict):
            self.loss = Stage2LossWeights(**self.loss)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Stage2TrainConfig":
        data = json.loads(text)
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"Stage2TrainConfig: unknown keys {unknown}")
        return cls(**data)


# ----------------------------------------------------------------------------- trainer


def _frozen(module: nn.Module | None, device) -> nn.Module | None:
    if module is None:
        return None
    return module.to(device).eval().requires_grad_(False)


def _unwrap(module: nn.Module) -> nn.Module:
    return getattr(module, "module", module)  # DDP / FSDP-style wrappers keep the net in .module


class Stage2Trainer:
    """One Stage 2 G step (+ D step once the GAN is on) per `step` call; see the module docstring.

    mouth_mask: (S,S) float, 1 = masked. Its latent-resolution version (a latent cell is masked
    when any of its pixels is: max-pool by the VAE factor) is where the latent term and the
    latent evaluation look. Loss weights whose module is missing (vgg, extractor,
    discriminator None) are set to 0. autocast_dtype: torch.bfloat16 for mixed precision
    (float16 would need loss scaling, which this trainer does not do).
    """

    def __init__(
        self,
        unet: nn.Module,
        vae: nn.Module,
        mouth_mask: np.ndarray,
        cfg: Stage2TrainConfig,
        extractor: nn.Module | None = None,
        vgg: nn.Module | None = None,
        discriminator: nn.Module | None = None,
        wrap: Callable[[nn.Module], nn.Module] = lambda m: m,
        device="cpu",
        autocast_dtype: torch.dtype | None = None,
    ):
        if autocast_dtype == torch.float16:
            raise ValueError("Stage2Trainer: float16 autocast needs a GradScaler; use torch.bfloat16")
        self.cfg = cfg
        self.device = torch.device(device)
        self.autocast_dtype = autocast_dtype

        self.unet = unet.to(self.device).train()
        if cfg.gradient_checkpointing:
            self.unet.set_gradient_checkpointing(True)
        self.vae = _frozen(vae, self.device)
        extractor, vgg = _frozen(extractor, self.device), _frozen(vgg, self.device)

        mask = torch.as_tensor(np.asarray(mouth_mask, dtype=np.float32))
        if mask.ndim != 2:
            raise ValueError(f"Stage2Trainer: mouth_mask must be (S,S), got {tuple(mask.shape)}")
        self.mask = mask[None, None].to(self.device)  # (1,1,S,S)
        factor = int(getattr(vae, "downsample", 8))
        if mask.shape[0] % factor or mask.shape[1] % factor:
            raise ValueError(f"Stage2Trainer: mask size {tuple(mask.shape)} is not a multiple of the VAE factor {factor}")
        self.latent_mask = F.max_pool2d(self.mask, factor)  # (1,1,S/f,S/f)

        weights = dataclasses.replace(cfg.loss)
        if vgg is None:
            weights.perc = 0.0
        if extractor is None:
            weights.motion = 0.0
        if discriminator is None:
            weights.adv = 0.0
        self.weights = weights
        perceptual = PerceptualLoss(vgg).to(self.device) if vgg is not None and weights.perc > 0 else None
        motion_loss = (
            MotionLoss(extractor, lambda_c=weights.lambda_c).to(self.device)
            if extractor is not None and weights.motion > 0
            else None
        )
        self.discriminator = discriminator.to(self.device).train() if discriminator is not None else None
        # Two views of Eq. 15 sharing the modules: with L_adv (from gan_start_step) and without.
        self.loss_gan = (
            Stage2Loss(weights, perceptual, motion_loss, self.discriminator) if weights.adv > 0 else None
        )
        warm = dataclasses.replace(weights, adv=0.0)
        has_warm_terms = any((warm.rec, warm.perc, warm.motion, warm.latent))
        if not has_warm_terms and self.loss_gan is None:
            raise ValueError("Stage2Trainer: every loss weight is 0 (or lacks its module): nothing to train")
        if not has_warm_terms and cfg.gan_start_step > 0:
            raise ValueError("Stage2Trainer: only L_adv is on, so nothing trains before gan_start_step; set it to 0")
        self.loss_warm = Stage2Loss(warm, perceptual, motion_loss, None) if has_warm_terms else None

        self.unet_model = wrap(self.unet)
        alphas = list(self.unet.rsca_alphas()) if hasattr(self.unet, "rsca_alphas") else []
        alpha_ids = {id(a) for a in alphas}
        others = [p for p in self.unet.parameters() if p.requires_grad and id(p) not in alpha_ids]
        groups = [{"params": others, "lr": cfg.lr, "weight_decay": cfg.weight_decay}]
        if alphas:
            groups.append({"params": alphas, "lr": cfg.alpha_lr, "weight_decay": 0.0})
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        self.scheduler = warmup_cosine(self.optimizer, cfg.warmup_steps, cfg.total_steps)

        self.d_model = self.d_optimizer = self.d_scheduler = None
        if self.discriminator is not None:
            self.d_model = wrap(self.discriminator)
            self.d_optimizer = torch.optim.AdamW(
                self.discriminator.parameters(), lr=cfg.d_lr, betas=cfg.d_betas, weight_decay=cfg.weight_decay
            )
            # D joins at gan_start_step: its own warm-up from there, cosine to the end of training.
            self.d_scheduler = warmup_cosine(
                self.d_optimizer, cfg.warmup_steps, max(1, cfg.total_steps - cfg.gan_start_step)
            )

    # ------------------------------------------------------------------ pieces

    def _autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _batch(self, batch: dict) -> dict[str, Tensor]:
        return {k: v.to(self.device, torch.float32) for k, v in batch.items() if isinstance(v, Tensor)}

    def gan_active(self, step: int) -> bool:
        return self.loss_gan is not None and step >= self.cfg.gan_start_step

    @torch.no_grad()
    def encode_inputs(self, batch: dict) -> dict[str, Tensor]:
        """Frozen-VAE latents: masked (E(target*(1-M))), reference (E(reference)), target (E(target))."""
        batch = self._batch(batch)
        target = batch["target"]
        return {
            "masked": self.vae.encode(target * (1.0 - self.mask)),
            "reference": self.vae.encode(batch["reference"]),
            "target": self.vae.encode(target),
        }

    def complete(self, batch: dict, latents: dict | None = None, model: nn.Module | None = None) -> Tensor:
        """z_hat (B,4,h,w) for a batch (with the current training/eval mode and grad state)."""
        latents = latents if latents is not None else self.encode_inputs(batch)
        motion = batch["motion"].to(self.device, torch.float32)
        with self._autocast():
            completed = (model or self.unet_model)(latents["masked"], motion, latents["reference"])
        return completed.float()

    def noisy_motion(self, motion: Tensor, step: int) -> Tensor:
        """The condition with N(0, motion_noise²) added on the driven keypoints. Stage 2 learns
        from the extractor's keypoints but is driven by Stage 1's, whose errors the extractor
        never makes: on the demo's stand-in extractor the lips' δ move as one along y, Stage
        1's do not (per-keypoint std 0.07-0.26 where the extractor's are equal). Noise on a
        coordinate that is constant in the corpus never reaches the network (it standardises
        to 0, stages/common/standardise.py)."""
        if self.cfg.motion_noise <= 0 or motion.shape[-1] != 3:  # off, or an audio condition
            return motion
        generator = torch.Generator().manual_seed(self.cfg.noise_seed * 1_000_003 + int(step))
        driven = list(DRIVEN_KEYPOINTS)
        noise = torch.zeros(motion.shape)
        noise[:, driven] = self.cfg.motion_noise * torch.randn((motion.shape[0], len(driven), motion.shape[-1]),
                                                               generator=generator)
        return motion + noise.to(motion.device, motion.dtype)

    def _needs_pixels(self, loss: Stage2Loss) -> bool:
        w = loss.weights
        return any((w.rec, w.perc, w.motion, w.adv))

    # ------------------------------------------------------------------ step

    def step(self, batch: dict, step: int) -> dict[str, float]:
        """One G update (and one D update once step >= gan_start_step). Returns floats: loss,
        every computed part, lr (the UNet's main group, as used in this step), and d_loss
        when the D stepped."""
        batch = self._batch(batch)
        batch["motion"] = self.noisy_motion(batch["motion"], step)
        gan = self.gan_active(step)
        loss_fn = self.loss_gan if gan else self.loss_warm
        self.unet_model.train()
        latents = self.encode_inputs(batch)
        lr = self.optimizer.param_groups[0]["lr"]

        if self.discriminator is not None:
            self.discriminator.requires_grad_(False)  # frozen for the G step: L_adv reaches only G
        completed = self.complete(batch, latents)
        generated = None
        with self._autocast():
            if self._needs_pixels(loss_fn):
                generated = self.vae.decode(completed)
            total, parts = loss_fn(
                generated.float() if generated is not None else None,
                batch["target"],
                batch.get("target_exp"),
                batch.get("target_x_c"),
                completed_latent=completed,
                target_latent=latents["target"],
                latent_mask=self.latent_mask,
            )
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.unet.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        out = {"loss": float(total.detach()), "lr": float(lr)}
        out.update({name: float(value.detach()) for name, value in parts.items()})

        if gan:
            self.discriminator.requires_grad_(True)
            fake = generated.detach().float()
            with self._autocast():
                d_loss = discriminator_loss(self.d_model(batch["target"]), self.d_model(fake))
            self.d_optimizer.zero_grad(set_to_none=True)
            d_loss.backward()
            if self.cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.discriminator.parameters(), self.cfg.grad_clip)
            self.d_optimizer.step()
            self.d_scheduler.step()
            out["d_loss"] = float(d_loss.detach())
        return out

    @torch.no_grad()
    def evaluate(self, batch: dict) -> dict[str, float]:
        """No-grad metrics in eval mode: rec (pixel L1, whole frame), pixel_l1_mask (pixel L1
        inside M), latent_l1_mask (|z_hat - E(target)| inside the latent mask), psnr_mask (dB,
        pixel MSE inside M, peak 1)."""
        batch = self._batch(batch)
        was_training = self.unet.training
        self.unet.eval()
        try:
            latents = self.encode_inputs(batch)
            completed = self.complete(batch, latents, model=self.unet)
            generated = self.vae.decode(completed).float()
        finally:
            self.unet.train(was_training)
        target = batch["target"]
        weight = self.mask.expand_as(target)
        mse = (((generated - target) ** 2) * weight).sum() / weight.sum().clamp_min(1e-8)
        return {
            "rec": float(F.l1_loss(generated, target)),
            "pixel_l1_mask": float(masked_l1(generated, target, self.mask)),
            "latent_l1_mask": float(masked_l1(completed, latents["target"], self.latent_mask)),
            "psnr_mask": float(10.0 * math.log10(1.0 / max(float(mse), 1e-12))),
        }

    # ------------------------------------------------------------------ resume

    def state_dict(self) -> dict:
        """UNet (unwrapped) and discriminator weights, both optimisers and schedulers. Tensors are
        references, as torch's own state_dicts: save or deep-copy before training on."""
        state = {
            "unet": self.unet.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }
        if self.discriminator is not None:
            state.update(
                discriminator=self.discriminator.state_dict(),
                d_optimizer=self.d_optimizer.state_dict(),
                d_scheduler=self.d_scheduler.state_dict(),
            )
        return state

    def load_state_dict(self, state: dict) -> None:
        if (self.discriminator is None) != ("discriminator" not in state):
            raise ValueError("Stage2Trainer.load_state_dict: the state and this trainer disagree on the discriminator")
        _unwrap(self.unet_model).load_state_dict(state["unet"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.discriminator is not None:
            self.discriminator.load_state_dict(state["discriminator"])
            self.d_optimizer.load_state_dict(state["d_optimizer"])
            self.d_scheduler.load_state_dict(state["d_scheduler"])
