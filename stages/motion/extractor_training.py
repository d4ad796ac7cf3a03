"""Training a small stand-in for LivePortrait's motion extractor, landmark-guided, framework-free.

LivePortrait's released extractor cannot reach the machines this project is built on, and a
randomly initialised one is a poor stand-in: measured on the synthetic corpus
(benchmarks/standin_signal.py, README), the ground-truth mouth explains under 2% of the
variance of a random extractor's Δδ on the driven keypoints; the rest follows the head
sway. Stage 1 then has nothing audio-predictable to learn. LivePortrait trains its
keypoints with a landmark-guided loss (2-D face landmarks steer the lip and eye keypoints);
`imgtalk train extractor` does the same, reduced to what a dub needs: the expression
offsets of the driven keypoints D carry the mouth opening that the face mesh measures on
the frame (`mouth_open` of the prepared shards, inner-lip gap over mouth width), along one
fixed direction, and nothing else:

    target δ[D] = AMPLITUDE * (open - open_mean) / open_std * U        (|D|, 3)
    L = batch mean of the sum over D of |δ[D] - target|²  (in units of AMPLITUDE²)

U is a fixed unit pattern (the y coordinate of every driven keypoint, equal weights), so
the lips' keypoints move down as the mouth opens. Pose, x_c and the other keypoints are not
constrained. With the real extractor in a bundle this is never needed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from stages.common.optim import optimisation_step, warmup_cosine
from stages.motion.audio2motion import DRIVEN_KEYPOINTS
from stages.motion.extractor import MotionExtractor, motion_info

# The scale of the stand-in's δ is arbitrary downstream (Stage 1 and Stage 2 normalise δ with
# the corpus's statistics); LivePortrait's lips move by ~0.02, but a target that small sits
# below the step Adam takes on the head (~lr x sqrt(64) per output), and training stalls
# at the zero-prediction loss. At 0.5 the same lr resolves it.
AMPLITUDE = 0.5


def sample_frames(chunk: dict, rng: np.random.Generator, count: int) -> list[dict]:
    """Up to `count` {"image": (S,S,3) uint8, "mouth_open": float32} of a prepared chunk,
    among frames with a face and a measured opening."""
    ok = np.asarray(chunk["has_face"], bool) & np.isfinite(np.asarray(chunk["mouth_open"], np.float64))
    picks = rng.permutation(np.flatnonzero(ok))[:count]
    return [{"image": np.asarray(chunk["crops"][int(i)]), "mouth_open": np.float32(chunk["mouth_open"][int(i)])}
            for i in picks]


def opening_direction(num_kp: int = 21, driven: tuple = DRIVEN_KEYPOINTS) -> np.ndarray:
    """U: (num_kp, 3) float32, unit norm, the y coordinate of each driven keypoint."""
    u = np.zeros((num_kp, 3), np.float32)
    u[list(driven), 1] = 1.0
    return u / np.linalg.norm(u)


@dataclass
class ExtractorTrainConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 50
    total_steps: int = 1000
    grad_clip: float = 1.0
    open_mean: float = 0.0  # the corpus's mouth_open statistics (prepare's card)
    open_std: float = 1.0
    # δ starts at 0 (a trained extractor's δ is ~1e-2; a random head's is ~10x that), so the
    # first steps learn the mouth instead of shrinking random outputs
    zero_expression_head: bool = True


class ExtractorTrainer:
    def __init__(self, extractor: MotionExtractor, cfg: ExtractorTrainConfig,
                 wrap: Callable[[nn.Module], nn.Module] = lambda m: m, device="cpu", seed: int = 0):
        if not cfg.open_std > 0:
            raise ValueError(f"ExtractorTrainer: open_std must be > 0, got {cfg.open_std}")
        self.cfg = cfg
        self.device = torch.device(device)
        self.extractor = extractor.to(self.device).train().requires_grad_(True)
        if cfg.zero_expression_head:
            with torch.no_grad():
                head = self.extractor.detector.fc_exp
                head.weight.zero_()
                head.bias.zero_()
        self.net = wrap(self.extractor)
        self.driven = list(DRIVEN_KEYPOINTS)
        self.direction = torch.from_numpy(opening_direction(extractor.config.num_kp)).to(self.device)[self.driven]
        self.optimizer = torch.optim.AdamW(self.extractor.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = warmup_cosine(self.optimizer, cfg.warmup_steps, cfg.total_steps)
        self.generator = torch.Generator().manual_seed(seed)

    def _loss(self, net: nn.Module, batch: dict) -> tuple[Tensor, Tensor]:
        images = batch["image"].to(self.device, torch.float32)  # (B,3,S,S) in [0,1]
        z = (batch["mouth_open"].to(self.device, torch.float32) - self.cfg.open_mean) / self.cfg.open_std  # (B,)
        exp = motion_info(net(images))["exp"][:, self.driven]  # (B,|D|,3)
        target = AMPLITUDE * z[:, None, None] * self.direction  # (B,|D|,3)
        # summed over the driven coordinates, averaged over the batch: a mean over the 24
        # coordinates would make the signal (along U only) a 1/24 share of a tiny loss
        loss = ((exp - target) ** 2).sum(dim=(1, 2)).mean() / AMPLITUDE**2
        along = (exp * self.direction).sum(dim=(1, 2)) / AMPLITUDE  # the opening read back, in z units
        return loss, along

    def step(self, batch: dict, step: int) -> dict[str, float]:
        self.net.train()
        loss, _ = self._loss(self.net, batch)
        lr = optimisation_step(loss, self.optimizer, self.scheduler, self.extractor.parameters(), self.cfg.grad_clip)
        return {"loss": float(loss.detach()), "lr": lr}

    @torch.no_grad()
    def evaluate(self, batch: dict) -> dict[str, float]:
        """loss, and r: Pearson r of the opening read back from δ[D] against the measured one."""
        self.extractor.eval()
        loss, along = self._loss(self.extractor, batch)
        z = batch["mouth_open"].double().cpu().numpy()
        a = along.double().cpu().numpy()
        r = float(np.corrcoef(a, z)[0, 1]) if len(z) > 2 and z.std() > 0 and a.std() > 0 else 0.0
        return {"loss": float(loss), "r": r}

    def state_dict(self) -> dict:
        return {"extractor": self.extractor.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.extractor.load_state_dict(state["extractor"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
