"""Stage 1 training step (plain PyTorch, no Ray: Ray Train hosts it, passing DDP as `wrap`).

Data. `sample_clips` cuts training clips out of one prepared chunk: T consecutive 25 fps
frames that all hold a face and belong to one shot (a clip never crosses a scene cut or a
face-absent span), at non-overlapping random starts. Targets are the frames' own driven
keypoints (Eq. 1 with the frame's x_c, expression and pose) on the driven set D; the model
is conditioned on the video's neutral state (neutral x_c, neutral expression) and predicts
Δδ = exp - δ_neutral on D.

Optimisation. `Stage1Trainer.step` runs Eq. 4-6 (`stage1_loss`, λ_temp) with AdamW and the
shared warm-up + cosine schedule, gradient clipping, and two input corruptions against
exposure bias: Gaussian noise (in normalised units) on the teacher-forced previous offsets,
and two-pass scheduled sampling (a first no-grad pass; each previous offset is replaced by the
model's own prediction with a probability ramped linearly from 0 to `scheduled_sampling` over
`total_steps`). The first pass is teacher-forced (`sampling_source="teacher_forced"`: every
prediction one step off the truth) or free-running `generate` (`"free_running"`: the states
the inference loop's own drift leads to; it reads the unwrapped network, so DDP, not FSDP). All randomness of a step (noise, sampling masks,
dropout) comes from the trainer's own torch.Generator, which is part of `state_dict()`, so a
resumed trainer reproduces the next step exactly. Under DDP give each rank its own `seed`.
`autocast_dtype` is meant for bfloat16 (no loss scaling is done).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from stages.common.optim import warmup_cosine
from stages.motion.audio2motion import Audio2Motion, stage1_loss


# ----------------------------------------------------------------------------- data


def _runs(valid: np.ndarray, shot: np.ndarray) -> list[tuple[int, int]]:
    """Maximal [start, end) spans of valid frames within one shot."""
    n = len(valid)
    if n == 0:
        return []
    cuts = np.flatnonzero((valid[1:] != valid[:-1]) | (shot[1:] != shot[:-1])) + 1
    bounds = np.concatenate([[0], cuts, [n]])
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if valid[a]]


def sample_clips(chunk: dict, video: dict, clip_frames: int, k: int, driven: tuple,
                 rng: np.random.Generator, max_clips: int | None = None) -> list[dict]:
    """Training clips of `clip_frames` frames from one prepared chunk (numpy arrays).

    chunk: n, has_face (n,), shot (n,) (-1 without a face), x_c and exp (n, 21, 3), R (n, 3, 3),
    t (n, 3), scale (n, 1), audio (n, 2, A) = HuBERT 50 Hz rows, two per frame.
    video: neutral_x_c, neutral_exp (21, 3).
    Each clip: audio (T*k, A) (k=2: both rows per frame in order; k=1: their mean); x_c and
    delta_neutral (21, 3) = the neutral state; offsets (T, |D|, 3) = exp[:, D] - neutral_exp[D];
    R (T, 3, 3), scale (T, 1), t (T, 3); x_gt (T, |D|, 3) = the frame's own driven keypoints
    s * (x_c @ R + exp) + (t_x, t_y, 0) on D. All float32. Clips are shuffled; at most `max_clips`.
    """
    if k not in (1, 2):
        raise ValueError(f"training.py sample_clips: k={k}; the chunk holds 2 audio rows per frame, so k is 1 or 2")
    if clip_frames < 1:
        raise ValueError(f"training.py sample_clips: clip_frames must be >= 1, got {clip_frames}")
    n = int(chunk["n"])
    has_face = np.asarray(chunk["has_face"], bool)
    shot = np.asarray(chunk["shot"])
    for name in ("has_face", "shot", "x_c", "exp", "R", "t", "scale", "audio"):
        if len(chunk[name]) != n:
            raise ValueError(f"training.py sample_clips: chunk[{name!r}] has {len(chunk[name])} rows, n = {n}")
    driven = list(driven)
    neutral_x_c = np.asarray(video["neutral_x_c"], np.float32)
    neutral_exp = np.asarray(video["neutral_exp"], np.float32)

    starts = []
    for a, b in _runs(has_face & (shot >= 0), shot):
        count = (b - a) // clip_frames
        if count == 0:
            continue
        # Spread the slack randomly over the count + 1 gaps: random, non-overlapping starts.
        gaps = rng.multinomial((b - a) - count * clip_frames, np.full(count + 1, 1.0 / (count + 1)))
        offsets = np.cumsum(gaps[:count]) + clip_frames * np.arange(count)
        starts.extend(int(a + o) for o in offsets)
    starts = [starts[i] for i in rng.permutation(len(starts))]
    if max_clips is not None:
        starts = starts[:max_clips]

    clips = []
    for s in starts:
        sl = slice(s, s + clip_frames)
        audio = np.asarray(chunk["audio"][sl], np.float32)  # (T, 2, A)
        audio = audio.reshape(-1, audio.shape[-1]) if k == 2 else audio.mean(axis=1)
        exp = np.asarray(chunk["exp"][sl], np.float32)[:, driven]
        x_c = np.asarray(chunk["x_c"][sl], np.float32)[:, driven]
        R = np.asarray(chunk["R"][sl], np.float32)
        t = np.asarray(chunk["t"][sl], np.float32)
        scale = np.asarray(chunk["scale"][sl], np.float32)
        translation = np.concatenate([t[:, None, :2], np.zeros_like(t[:, None, :1])], axis=-1)
        x_gt = scale[:, :, None] * (x_c @ R + exp) + translation
        clips.append({
            "audio": np.ascontiguousarray(audio, np.float32),
            "x_c": neutral_x_c.copy(),
            "delta_neutral": neutral_exp.copy(),
            "offsets": (exp - neutral_exp[driven]).astype(np.float32),
            "R": R, "scale": scale, "t": t,
            "x_gt": x_gt.astype(np.float32),
        })
    return clips


# ----------------------------------------------------------------------------- training


@dataclass
class Stage1TrainConfig:
    lr: float = 3e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.99)
    warmup_steps: int = 500
    total_steps: int = 50000
    lam_temp: float = 0.1  # λ of Eq. 6
    grad_clip: float = 1.0
    prev_noise_std: float = 0.1  # Gaussian noise on teacher-forced previous offsets, normalised units
    scheduled_sampling: float = 0.25  # max probability (reached at total_steps) of feeding back own predictions
    # Where the fed-back predictions come from. "teacher_forced": a teacher-forced pass, so each
    # is one step off the truth. "free_running": `generate`, the inference loop itself, so the
    # model also sees the states its own drift leads to (a mouth still open when speech has
    # stopped) and learns to come back from them to the truth.
    sampling_source: str = "teacher_forced"


BATCH_KEYS = ("audio", "x_c", "delta_neutral", "offsets", "R", "scale", "t", "x_gt")


class Stage1Trainer:
    """One optimisation step at a time; the caller owns data loading and checkpoint storage."""

    def __init__(self, model: Audio2Motion, cfg: Stage1TrainConfig, wrap: Callable[[nn.Module], nn.Module] = lambda m: m,
                 device: str | torch.device = "cpu", autocast_dtype: torch.dtype | None = None, seed: int = 0):
        if cfg.sampling_source not in ("teacher_forced", "free_running"):
            raise ValueError(f"training.py: sampling_source {cfg.sampling_source!r} is not teacher_forced or free_running")
        self.cfg = cfg
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.net = wrap(self.model)  # forward through this (DDP syncs gradients); weights live in self.model
        self.autocast_dtype = autocast_dtype
        decay, no_decay = [], []
        for param in self.model.parameters():
            if param.requires_grad:  # biases and LayerNorm gains (1-d) get no weight decay
                (decay if param.dim() >= 2 else no_decay).append(param)
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=tuple(cfg.betas),
        )
        self.scheduler = warmup_cosine(self.optimizer, cfg.warmup_steps, cfg.total_steps)
        self.generator = torch.Generator().manual_seed(seed)  # CPU: same stream on any device

    # --- pieces

    def _batch(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        missing = [key for key in BATCH_KEYS if key not in batch]
        if missing:
            raise ValueError(f"training.py: batch lacks {missing}")
        return {key: batch[key].to(self.device, torch.float32) for key in BATCH_KEYS}

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    def _loss(self, b: dict[str, Tensor], pred: Tensor):
        return stage1_loss(pred.float(), b["x_c"], b["delta_neutral"], b["R"], b["scale"], b["t"], b["x_gt"],
                           lip=self.model.cfg.driven_keypoints, lam=self.cfg.lam_temp)

    def _draw(self, shape, kind: str) -> Tensor:
        """Random numbers from the trainer's generator, moved to the device."""
        draw = torch.randn if kind == "normal" else torch.rand
        return draw(*shape, generator=self.generator).to(self.device)

    def _own_predictions(self, args: tuple[Tensor, ...], offsets: Tensor) -> Tensor:
        if self.cfg.sampling_source == "teacher_forced":
            return self.net(*args, offsets)
        self.model.eval()  # generate decodes as inference does: no dropout; under no_grad, no DDP sync
        try:
            return self.model.generate(*args)
        finally:
            self.model.train()

    def sampling_probability(self, step: int) -> float:
        return self.cfg.scheduled_sampling * min(1.0, max(0, step) / max(1, self.cfg.total_steps))

    # --- API

    def step(self, batch: dict[str, Tensor], step: int) -> dict[str, float]:
        """One optimisation step; returns {"loss", "rec", "temp", "lr"} as Python floats."""
        b = self._batch(batch)
        offsets = b["offsets"]
        args = (b["audio"], b["x_c"], b["delta_neutral"])
        self.net.train()
        # Dropout draws from the global RNG: seed it from the trainer's generator for this step
        # (and restore the global state afterwards) so a resumed trainer repeats the step exactly.
        dropout_seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(dropout_seed)
            prev = offsets
            probability = self.sampling_probability(step)
            if probability > 0:  # two-pass scheduled sampling
                with torch.no_grad(), self._autocast():
                    own = self._own_predictions(args, offsets).float()
                use_own = self._draw(offsets.shape[:2], "uniform") < probability
                prev = torch.where(use_own[..., None, None], own, prev)
            if self.cfg.prev_noise_std > 0:  # noise in normalised units = std x offset_std in raw units
                prev = prev + self.cfg.prev_noise_std * self.model.offset_std * self._draw(offsets.shape, "normal")
            with self._autocast():
                pred = self.net(*args, prev)
            loss, parts = self._loss(b, pred)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        return {"loss": loss.item(), "rec": parts["rec"].item(), "temp": parts["temp"].item(), "lr": float(lr)}

    @torch.no_grad()
    def evaluate(self, batch: dict[str, Tensor]) -> dict[str, float]:
        """Teacher-forced loss without noise or sampling, plus "rec_free": L_rec of free-running generate()."""
        b = self._batch(batch)
        self.model.eval()
        with self._autocast():
            pred = self.model(b["audio"], b["x_c"], b["delta_neutral"], b["offsets"])
            free = self.model.generate(b["audio"], b["x_c"], b["delta_neutral"])
        loss, parts = self._loss(b, pred)
        _, free_parts = self._loss(b, free)
        return {"loss": loss.item(), "rec": parts["rec"].item(), "temp": parts["temp"].item(),
                "rec_free": free_parts["rec"].item()}

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
