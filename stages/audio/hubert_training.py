"""Training a small HuBERT stand-in briefly, self-supervised, framework-free.

The real HuBERT-large cannot reach the machines this project is built on. A randomly
initialised tiny HuBERT keeps some of the speech (README: a linear read-out of the
synthetic corpus's jaw opening at held-out r 0.68), but Stage 1 trained on it stays below
the issue's bar; the same read-out from 39 MFCCs reaches r 0.87, so the information is in
the sound and a brief self-supervised training should bring it into the features.

The objective is masked acoustic modelling (as TERA / Mockingjay), on HuBERT's own
architecture and masking: spans of the conv features are replaced by HuBERT's learned mask
embedding (`masked_spec_embed`, what `mask_time_indices` does in transformers), and a
linear head on the last hidden state predicts each frame's log-mel spectrum:

    frame k of a crop x covers samples [320 k, 320 k + 400): HuBERT's conv frame k
    target[k] = log-mel (40 bands, 25 ms Hann window) of that frame, standardised per crop
    L = mean over masked frames of |head(h_k) - target_k|_1
        + unmasked_weight * the same over the other frames

HuBERT itself predicts k-means clusters of MFCCs at masked frames (iteration 1). That
needs a pass over the corpus for the codebook before training; the regression target
needs none, carries the same spectral information, and resumes without extra state. The
head is dropped when the model is saved: the bundle keeps a plain `HubertModel`, read
exactly as the real checkpoint is (stages/audio/hubert.py).

Data: `sample_audio_clips` cuts fixed-length crops of the 16 kHz speech stored in the
prepared shards (`wave`, 640 samples per 25 fps frame). Each crop is normalised to zero
mean and unit variance as Wav2Vec2FeatureExtractor does for an utterance.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import transformers
from torch import Tensor, nn

from stages.audio.hubert import NORM_EPS, SAMPLES_PER_FEATURE
from stages.common.optim import optimisation_step, warmup_cosine

SAMPLE_RATE = 16000
WINDOW = 400  # samples: HuBERT's conv receptive field, 25 ms
HOP = 320  # samples: HuBERT's conv stride, 20 ms
N_FFT = WINDOW  # one window per frame, unpadded: torch.stft centres a shorter window in n_fft


def sample_audio_clips(wave: np.ndarray, rng: np.random.Generator, clip_frames: int, count: int) -> list[dict]:
    """Up to `count` crops {"wave": (clip_frames * 640,) float32} of a chunk's speech
    `wave` ((n, 640) int16 PCM or float), at random starts; a chunk shorter than a crop gives
    one crop padded with silence. A chunk without any sound gives none."""
    pcm = np.asarray(wave)
    scale = 32768.0 if pcm.dtype == np.int16 else 1.0
    signal = pcm.reshape(-1).astype(np.float32) / scale
    if not np.any(signal):
        return []
    length = clip_frames * SAMPLES_PER_FEATURE
    if len(signal) <= length:
        return [{"wave": np.pad(signal, (0, length - len(signal)))}]
    starts = rng.integers(0, len(pcm) - clip_frames + 1, size=count) * SAMPLES_PER_FEATURE
    return [{"wave": signal[s : s + length].copy()} for s in starts]


def normalise_crops(waves: Tensor) -> Tensor:
    """(B, S) -> each row at zero mean, unit variance (Wav2Vec2FeatureExtractor's do_normalize)."""
    mean = waves.mean(dim=1, keepdim=True)
    var = waves.var(dim=1, unbiased=False, keepdim=True)
    return (waves - mean) / torch.sqrt(var + NORM_EPS)


def num_conv_frames(samples: int) -> int:
    """HuBERT's conv frames for `samples` input samples (receptive field 400, hop 320)."""
    return (samples - WINDOW) // HOP + 1


class LogMel(nn.Module):
    """(B, S) waveform -> (B, T, n_mels) log-mel of HuBERT's conv frames, T = num_conv_frames(S),
    standardised per crop and band (so loudness and channel colour are not the target)."""

    def __init__(self, n_mels: int = 40):
        super().__init__()
        fb = transformers.audio_utils.mel_filter_bank(
            num_frequency_bins=N_FFT // 2 + 1, num_mel_filters=n_mels, min_frequency=0.0,
            max_frequency=SAMPLE_RATE / 2, sampling_rate=SAMPLE_RATE, norm="slaney", mel_scale="slaney",
        )  # (201, n_mels)
        self.register_buffer("filters", torch.from_numpy(np.asarray(fb, np.float32)), persistent=False)
        self.register_buffer("window", torch.hann_window(WINDOW), persistent=False)

    def forward(self, waves: Tensor, standardise: bool = True) -> Tensor:
        spec = torch.stft(waves, N_FFT, hop_length=HOP, win_length=WINDOW, window=self.window,
                          center=False, return_complex=True)  # (B, 201, T)
        mel = torch.log(spec.abs().pow(2).transpose(1, 2) @ self.filters + 1e-6)  # (B, T, n_mels)
        if not standardise:
            return mel
        return (mel - mel.mean(dim=1, keepdim=True)) / (mel.std(dim=1, keepdim=True) + 1e-3)


def span_mask(batch: int, frames: int, prob: float, length: int, generator: torch.Generator) -> Tensor:
    """(batch, frames) bool: about `prob` of the frames masked in spans of `length` (spans may
    overlap, as in HuBERT), at least one span per row."""
    spans = max(1, round(prob * frames / length))
    starts = torch.randint(0, max(1, frames - length + 1), (batch, spans), generator=generator)
    covered = starts[:, :, None] + torch.arange(length)[None, None]  # (B, spans, length)
    mask = torch.zeros(batch, frames, dtype=torch.bool)
    mask.scatter_(1, covered.reshape(batch, -1).clamp_(max=frames - 1), True)
    return mask


class MaskedMelModel(nn.Module):
    """HuBERT with the training head; only `hubert` is kept in the bundle."""

    def __init__(self, hubert: transformers.HubertModel, n_mels: int):
        super().__init__()
        if getattr(hubert, "masked_spec_embed", None) is None or not getattr(hubert.config, "apply_spec_augment", True):
            raise ValueError("HuBERT training masks with the model's masked_spec_embed: its config needs "
                             "apply_spec_augment=True and mask_time_prob > 0 (the real checkpoint's is 0.075)")
        self.hubert = hubert
        self.head = nn.Linear(hubert.config.hidden_size, n_mels)

    def forward(self, waves: Tensor, mask: Tensor) -> Tensor:
        hidden = self.hubert(waves, mask_time_indices=mask).last_hidden_state  # (B, T, H)
        return self.head(hidden)  # (B, T, n_mels)


@dataclass
class HubertTrainConfig:
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    total_steps: int = 1000
    grad_clip: float = 5.0
    n_mels: int = 40
    mask_prob: float = 0.5  # of the frames, in spans
    mask_length: int = 10  # frames of 20 ms
    unmasked_weight: float = 0.5


class HubertTrainer:
    """step(batch) with batch {"wave": (B, S) float32}; randomness (masks, dropout's seed)
    from the trainer's own generator, so a resumed trainer repeats the next step."""

    def __init__(self, hubert: transformers.HubertModel, cfg: HubertTrainConfig,
                 wrap: Callable[[nn.Module], nn.Module] = lambda m: m, device="cpu", seed: int = 0):
        self.cfg = cfg
        self.device = torch.device(device)
        self.model = MaskedMelModel(hubert, cfg.n_mels).to(self.device).train()
        self.net = wrap(self.model)
        self.log_mel = LogMel(cfg.n_mels).to(self.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = warmup_cosine(self.optimizer, cfg.warmup_steps, cfg.total_steps)
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def hubert(self) -> transformers.HubertModel:
        return self.model.hubert

    def _loss(self, net: nn.Module, waves: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        waves = normalise_crops(waves.to(self.device, torch.float32))
        target = self.log_mel(waves)  # (B, T, n_mels)
        if target.shape[1] != mask.shape[1]:
            raise ValueError(f"{target.shape[1]} log-mel frames for {mask.shape[1]} conv frames")
        mask = mask.to(self.device)
        err = (net(waves, mask) - target).abs().mean(dim=-1)  # (B, T)
        masked = err[mask].mean()
        return masked + self.cfg.unmasked_weight * err[~mask].mean(), masked

    def _mask(self, waves: Tensor) -> Tensor:
        return span_mask(waves.shape[0], num_conv_frames(waves.shape[1]), self.cfg.mask_prob,
                         self.cfg.mask_length, self.generator)

    def step(self, batch: dict, step: int) -> dict[str, float]:
        self.net.train()
        mask = self._mask(batch["wave"])
        # dropout draws from torch's global generator: seed it from ours, so a resume repeats it
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=self.generator)))
        loss, masked = self._loss(self.net, batch["wave"], mask)
        lr = optimisation_step(loss, self.optimizer, self.scheduler, self.model.parameters(), self.cfg.grad_clip)
        return {"loss": float(loss.detach()), "masked": float(masked.detach()), "lr": lr}

    @torch.no_grad()
    def evaluate(self, batch: dict) -> dict[str, float]:
        """loss and the masked frames' L1 on a fixed mask (seeded by the batch's size), dropout off."""
        self.model.eval()
        fixed = torch.Generator().manual_seed(0)
        waves = batch["wave"]
        mask = span_mask(waves.shape[0], num_conv_frames(waves.shape[1]), self.cfg.mask_prob, self.cfg.mask_length, fixed)
        loss, masked = self._loss(self.model, waves, mask)
        return {"loss": float(loss), "masked": float(masked)}

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
