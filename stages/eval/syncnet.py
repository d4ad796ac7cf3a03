"""SyncNet v2 (joonson/syncnet_python @6efbb1c) and its scores: AV offset, LSE-D (min dist)
and LSE-C (confidence, = AVConf in the IMGTalk paper). Ray-free, CPU or GPU.

Read top to bottom:
1. `SyncNetConfig`, `SyncNet`: the reference's class `S` with the same module names and
   Sequential indices, so the published `syncnet_v2.model` (a plain name -> tensor dict,
   no `__S__.` prefix) loads into it by name. `SyncNet.from_file` loads it strictly with
   `torch.load(weights_only=True)`; `save_file` writes the same layout. The project ships
   no weights: fetch `syncnet_v2.model` yourself (syncnet_python's download_model.sh).
2. Front-end (`mfcc_16k`, `sync_windows`): as `SyncNetInstance.evaluate`. Audio is mono
   16 kHz int16, `python_speech_features.mfcc` with its defaults (25 ms window, 10 ms hop:
   100 columns/s, 4 per video frame at 25 fps, 13 coefficients, c0 = log energy). Video is
   224x224 colour face crops in cv2's BGR order, raw 0-255 floats (no mean, no scaling).
   min_length = min(n_frames, floor(n_samples / 640)); there are min_length - 5 windows
   (the reference drops the last valid one); window i = frames i..i+4 with MFCC columns
   4i..4i+19 (0.2 s of audio for 0.2 s of video).
3. `offset_search`: the reference's `calc_pdist` + scoring. For each video window i, the
   Euclidean distance (torch's pairwise_distance, eps 1e-6, embeddings not normalised) to
   the audio windows i-15..i+15 (audio embeddings zero-padded by 15 at both ends):
   31 offsets. mean_dists[k] = mean over windows; min_dist (LSE-D) = min_k mean_dists;
   offset = 15 - argmin_k; conf (LSE-C, AVConf) = median_k(mean_dists) - min_dist (median
   over the 31 offsets, not over frames).

   Sign of the offset: the best match pairs video window i with audio window i - offset.
   offset > 0 means the video lags the audio (the mouth moves `offset` frames after the
   sound); offset < 0 means the video leads. A well-synced clip gives 0 (the reference's
   example.avi gives 3, min dist 5.353, conf 10.021).
4. Face crops (`face_boxes_from_landmarks`, `smooth_boxes`, `syncnet_face_crops`): the
   crop geometry of run_pipeline.py's crop_video (crop_scale 0.4: box half-size bs,
   rows [cy - bs, cy + 1.8 bs), cols [cx - 1.4 bs, cx + 1.4 bs), pad value 110 outside the
   frame, bilinear resize to 224x224). The reference takes its boxes from S3FD; here they
   come from the project's mediapipe FaceMesh landmarks (square box around the 478
   points), which is close to but not the same as an S3FD box, so scores are comparable
   between our systems, and only approximately with published numbers. The reference also
   writes the crops through an XVID video before scoring; we score the crops directly.
5. `SyncNetScorer`: the stage. Constructor loads the model; `score(crops, wave)` ->
   `SyncScore`; `__call__({"crops", "wave_16k"[, "fps"]})` -> dict.

The reference assumes 25 fps video (4 MFCC steps per frame); other rates are refused.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Optional

import cv2
import numpy as np
import python_speech_features
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import signal

from stages.common.checkpoint import load_state_dict_strict, load_torch_state, save_torch_state, with_batch_counts

SAMPLE_RATE = 16000
FPS = 25.0
SAMPLES_PER_FRAME = 640  # 16000 / 25
MFCC_PER_FRAME = 4  # 100 Hz MFCC / 25 fps
WINDOW_FRAMES = 5  # video frames per window (0.2 s)
WINDOW_MFCC = 20  # MFCC columns per window (0.2 s)
CROP_SIZE = 224
DEFAULT_VSHIFT = 15
CROP_SCALE = 0.4
CROP_PAD_VALUE = 110
BOX_MEDFILT = 13  # run_pipeline.py's median filter on box centre and size


# ---------------------------------------------------------------------------- the model

@dataclass(frozen=True)
class SyncNetConfig:
    embedding_dim: int = 1024  # syncnet_v2: num_layers_in_fc_layers = 1024


def _fc(embedding_dim: int) -> nn.Sequential:
    # indices 0 Linear, 1 BN1d, 2 ReLU, 3 Linear
    return nn.Sequential(
        nn.Linear(512, 512),
        nn.BatchNorm1d(512),
        nn.ReLU(),
        nn.Linear(512, embedding_dim),
    )


class SyncNet(nn.Module):
    """syncnet_python's `S`. Conv/BN at Sequential indices 0/1, 4/5, 8/9, 11/12, 14/15, 18/19
    in both branches (ReLUs and max-pools in between hold no parameters)."""

    def __init__(self, config: SyncNetConfig = SyncNetConfig()):
        super().__init__()
        self.config = config

        # Audio: MFCC (B, 1, 13, 20) -> (B, 512, 1, 1)
        self.netcnnaud = nn.Sequential(
            nn.Conv2d(1, 64, kernel_size=3, stride=1, padding=1),  # 0 -> (B, 64, 13, 20)
            nn.BatchNorm2d(64),  # 1
            nn.ReLU(inplace=True),  # 2
            nn.MaxPool2d(kernel_size=1, stride=1),  # 3 (identity)

            nn.Conv2d(64, 192, kernel_size=3, stride=1, padding=1),  # 4 -> (B, 192, 13, 20)
            nn.BatchNorm2d(192),  # 5
            nn.ReLU(inplace=True),  # 6
            nn.MaxPool2d(kernel_size=3, stride=(1, 2)),  # 7 -> (B, 192, 11, 9)

            nn.Conv2d(192, 384, kernel_size=3, padding=1),  # 8 -> (B, 384, 11, 9)
            nn.BatchNorm2d(384),  # 9
            nn.ReLU(inplace=True),  # 10

            nn.Conv2d(384, 256, kernel_size=3, padding=1),  # 11 -> (B, 256, 11, 9)
            nn.BatchNorm2d(256),  # 12
            nn.ReLU(inplace=True),  # 13

            nn.Conv2d(256, 256, kernel_size=3, padding=1),  # 14
            nn.BatchNorm2d(256),  # 15
            nn.ReLU(inplace=True),  # 16
            nn.MaxPool2d(kernel_size=3, stride=2),  # 17 -> (B, 256, 5, 4)

            nn.Conv2d(256, 512, kernel_size=(5, 4), padding=0),  # 18 -> (B, 512, 1, 1)
            nn.BatchNorm2d(512),  # 19
            nn.ReLU(),  # 20
        )
        self.netfcaud = _fc(config.embedding_dim)
        self.netfclip = _fc(config.embedding_dim)

        # Video: 5 BGR frames (B, 3, 5, 224, 224) -> (B, 512, 1, 1, 1)
        self.netcnnlip = nn.Sequential(
            nn.Conv3d(3, 96, kernel_size=(5, 7, 7), stride=(1, 2, 2), padding=0),  # 0 -> (B, 96, 1, 109, 109)
            nn.BatchNorm3d(96),  # 1
            nn.ReLU(inplace=True),  # 2
            nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2)),  # 3 -> (B, 96, 1, 54, 54)

            nn.Conv3d(96, 256, kernel_size=(1, 5, 5), stride=(1, 2, 2), padding=(0, 1, 1)),  # 4 -> (B, 256, 1, 26, 26)
            nn.BatchNorm3d(256),  # 5
            nn.ReLU(inplace=True),  # 6
            nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),  # 7 -> (B, 256, 1, 13, 13)

            nn.Conv3d(256, 256, kernel_size=(1, 3, 3), padding=(0, 1, 1)),  # 8
            nn.BatchNorm3d(256),  # 9
            nn.ReLU(inplace=True),  # 10

            nn.Conv3d(256, 256, kernel_size=(1, 3, 3), padding=(0, 1, 1)),  # 11
            nn.BatchNorm3d(256),  # 12
            nn.ReLU(inplace=True),  # 13

            nn.Conv3d(256, 256, kernel_size=(1, 3, 3), padding=(0, 1, 1)),  # 14
            nn.BatchNorm3d(256),  # 15
            nn.ReLU(inplace=True),  # 16
            nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2)),  # 17 -> (B, 256, 1, 6, 6)

            nn.Conv3d(256, 512, kernel_size=(1, 6, 6), padding=0),  # 18 -> (B, 512, 1, 1, 1)
            nn.BatchNorm3d(512),  # 19
            nn.ReLU(inplace=True),  # 20
        )

    def forward_aud(self, mfcc: torch.Tensor) -> torch.Tensor:
        """(B, 1, 13, 20) MFCC windows -> (B, embedding_dim)."""
        mid = self.netcnnaud(mfcc)  # (B, 512, 1, 1)
        return self.netfcaud(mid.flatten(1))  # (B, 512) -> (B, D)

    def forward_lip(self, video: torch.Tensor) -> torch.Tensor:
        """(B, 3, 5, 224, 224) BGR 0-255 float windows -> (B, embedding_dim)."""
        mid = self.netcnnlip(video)  # (B, 512, 1, 1, 1)
        return self.netfclip(mid.flatten(1))  # (B, 512) -> (B, D)

    # ------------------------------------------------------------ loading and saving

    @classmethod
    def from_file(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
                  config: SyncNetConfig = SyncNetConfig()) -> "SyncNet":
        """Load `syncnet_v2.model` (a plain name -> tensor dict) strictly, in eval mode.

        Every key of the architecture must be in the file with its exact shape; BN
        `num_batches_tracked` entries may be present or absent (they are not used in eval);
        anything else is an error naming the file and the key(s)."""
        model = cls(config)
        state = load_torch_state(path, "SyncNet v2 (syncnet_v2.model)")
        load_state_dict_strict(model, with_batch_counts(model, state), source=os.fspath(path))
        return model.to(device).eval()

    def save_file(self, path: str | os.PathLike) -> None:
        """Write the state dict as a plain name -> tensor dict (the syncnet_v2.model layout)."""
        save_torch_state(self, path)


# ---------------------------------------------------------------------------- front-end

def wave_to_int16(wave_16k: np.ndarray) -> np.ndarray:
    """float mono in [-1, 1] -> int16, as ffmpeg's pcm_s16le does (round(x * 32768), clipped)."""
    wave = np.asarray(wave_16k, dtype=np.float64)
    if wave.ndim != 1:
        raise ValueError(f"expected mono audio (N,), got shape {wave.shape}")
    return np.clip(np.rint(wave * 32768.0), -32768, 32767).astype(np.int16)


def mfcc_16k(wave_16k: np.ndarray) -> np.ndarray:
    """Mono 16 kHz float audio in [-1, 1] -> (13, T) MFCC (float64), T = 1 + ceil((N - 400) / 160)
    for N >= 400 samples: python_speech_features.mfcc(int16 samples, 16000) with its defaults."""
    return python_speech_features.mfcc(wave_to_int16(wave_16k), SAMPLE_RATE).T


def num_sync_windows(n_frames: int, n_samples: int) -> int:
    """min(n_frames, floor(n_samples / 640)) - 5, at least 0."""
    min_length = min(int(n_frames), int(n_samples) // SAMPLES_PER_FRAME)
    return max(min_length - WINDOW_FRAMES, 0)


def sync_windows(frames_bgr_224: np.ndarray, mfcc: np.ndarray, n_samples: int,
                 start: int = 0, stop: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """Windows start..stop-1 (default: all) of a clip.

    frames_bgr_224: (n, 224, 224, 3) BGR crops (uint8 or float 0-255); mfcc: (13, T) from
    `mfcc_16k` of `n_samples` samples. Returns lip windows (W, 3, 5, 224, 224) float32 (window
    i = frames i..i+4) and audio windows (W, 1, 13, 20) float32 (MFCC columns 4i..4i+19),
    W = num_sync_windows(n, n_samples) when all are asked for. Long clips: ask for batches
    of windows (start/stop) rather than all at once (each lip window is 3 MB)."""
    frames = np.asarray(frames_bgr_224)
    mfcc = np.asarray(mfcc)
    if frames.ndim != 4 or frames.shape[3] != 3:
        raise ValueError(f"expected (n, H, W, 3) BGR frames, got shape {frames.shape}")
    if mfcc.ndim != 2 or mfcc.shape[0] != 13:
        raise ValueError(f"expected (13, T) MFCC, got shape {mfcc.shape}")
    total = num_sync_windows(len(frames), n_samples)
    stop = total if stop is None else min(stop, total)
    start = max(start, 0)
    idx = range(start, max(stop, start))
    last_col = MFCC_PER_FRAME * (stop - 1) + WINDOW_MFCC
    if len(idx) and last_col > mfcc.shape[1]:
        raise ValueError(f"MFCC has {mfcc.shape[1]} columns, window {stop - 1} needs {last_col}: "
                         f"was it computed from {n_samples} samples?")
    h, w = frames.shape[1:3]
    lip = np.empty((len(idx), 3, WINDOW_FRAMES, h, w), dtype=np.float32)
    aud = np.empty((len(idx), 1, 13, WINDOW_MFCC), dtype=np.float32)
    for j, i in enumerate(idx):
        lip[j] = frames[i:i + WINDOW_FRAMES].transpose(3, 0, 1, 2)  # (5, H, W, 3) -> (3, 5, H, W)
        aud[j, 0] = mfcc[:, MFCC_PER_FRAME * i:MFCC_PER_FRAME * i + WINDOW_MFCC]
    return lip, aud


# ---------------------------------------------------------------------------- scoring

@dataclass(frozen=True)
class SyncScore:
    """offset: frames, > 0 = video lags audio; min_dist: LSE-D; conf: LSE-C (= AVConf);
    mean_dists: (2 vshift + 1,) mean distance per offset, index k <-> offset vshift - k."""
    offset: int
    min_dist: float
    conf: float
    mean_dists: np.ndarray = field(compare=False, repr=False)

    @property
    def lse_d(self) -> float:
        return self.min_dist

    @property
    def lse_c(self) -> float:
        return self.conf

    def to_dict(self) -> dict:
        return {"offset": int(self.offset), "min_dist": float(self.min_dist),
                "conf": float(self.conf),
                "mean_dists": [float(x) for x in np.asarray(self.mean_dists).ravel()]}


def offset_search(lip_emb, aud_emb, vshift: int = DEFAULT_VSHIFT) -> SyncScore:
    """calc_pdist + the reference's scoring on (W, D) video and audio embeddings (float32,
    as the reference computes them). See the module docstring for the sign of the offset."""
    lip, aud = (e.detach().cpu().float() if isinstance(e, torch.Tensor)
                else torch.as_tensor(np.asarray(e), dtype=torch.float32) for e in (lip_emb, aud_emb))
    if lip.ndim != 2 or lip.shape != aud.shape:
        raise ValueError(f"expected two (W, D) embeddings of equal shape, got "
                         f"{tuple(lip.shape)} and {tuple(aud.shape)}")
    if len(lip) == 0:
        raise ValueError("no windows to score")
    if vshift < 0:
        raise ValueError(f"vshift must be >= 0, got {vshift}")
    win = 2 * vshift + 1
    aud_p = F.pad(aud, (0, 0, vshift, vshift))  # (W + 2 vshift, D), zero rows at both ends
    offsets = torch.arange(win)
    dists = []
    for s in range(0, len(lip), 256):  # chunks bound memory at 256 x win x D
        i = torch.arange(s, min(s + 256, len(lip)))
        near = aud_p[i[:, None] + offsets[None, :]]  # (w, win, D): audio windows i-vshift..i+vshift
        dists.append(F.pairwise_distance(lip[i][:, None, :].expand_as(near), near))
    mdist = torch.cat(dists).mean(0)  # (win,) mean over windows
    return scores_from_mean_dists(mdist, vshift)


def scores_from_mean_dists(mean_dists, vshift: int = DEFAULT_VSHIFT) -> SyncScore:
    """(2 vshift + 1,) mean distance per offset -> SyncScore: min_dist = min, offset =
    vshift - argmin (first minimum on ties), conf = median - min (torch's median: the middle
    value, the count being odd)."""
    mdist = torch.as_tensor(np.asarray(mean_dists), dtype=torch.float32)
    if mdist.shape != (2 * vshift + 1,):
        raise ValueError(f"expected {2 * vshift + 1} mean distances for vshift {vshift}, "
                         f"got shape {tuple(mdist.shape)}")
    minval, minidx = torch.min(mdist, 0)
    conf = torch.median(mdist) - minval
    return SyncScore(offset=int(vshift - int(minidx)), min_dist=float(minval), conf=float(conf),
                     mean_dists=mdist.numpy().copy())


# ---------------------------------------------------------------------------- face crops

def face_boxes_from_landmarks(landmarks: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """(n, 478, 2) FaceMesh landmarks (pixels) -> (n, 4) square boxes x0, y0, x1, y1.

    Stands in for the reference's S3FD detections: the box is centred on the bounding box
    of the mesh points (forehead top to chin, cheek to cheek) with side = its longer edge
    times `scale`. Rows with NaN landmarks (no face) give NaN boxes."""
    pts = np.asarray(landmarks, dtype=np.float64)
    if pts.ndim != 3 or pts.shape[2] != 2:
        raise ValueError(f"expected (n, points, 2) landmarks, got shape {pts.shape}")
    lo, hi = pts.min(axis=1), pts.max(axis=1)  # (n, 2); NaN propagates
    centre = (lo + hi) / 2
    half = (hi - lo).max(axis=1, keepdims=True) * scale / 2
    return np.concatenate([centre - half, centre + half], axis=1)


def smooth_boxes(boxes: np.ndarray, kernel_size: int = BOX_MEDFILT) -> np.ndarray:
    """run_pipeline.py's smoothing: median filter (scipy.signal.medfilt, zero-padded ends, as
    the reference) on the box half-size max(w, h)/2 and centre; returns square boxes."""
    b = np.asarray(boxes, dtype=np.float64)
    s = np.maximum(b[:, 3] - b[:, 1], b[:, 2] - b[:, 0]) / 2
    cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
    s, cx, cy = (signal.medfilt(v, kernel_size=kernel_size) for v in (s, cx, cy))
    return np.stack([cx - s, cy - s, cx + s, cy + s], axis=1)


def _crop_one(frame_bgr: np.ndarray, box, crop_scale: float) -> np.ndarray:
    x0, y0, x1, y1 = (float(v) for v in box)
    bs = max(y1 - y0, x1 - x0) / 2  # box half-size
    cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
    bsi = int(bs * (1 + 2 * crop_scale))  # the reference pads the frame by this much
    h, w = frame_bgr.shape[:2]
    my, mx = cy + bsi, cx + bsi  # centre in the padded frame
    # Slice of the padded frame (clipped to it, as numpy slicing would be)
    r0 = min(max(int(my - bs), 0), h + 2 * bsi)
    r1 = min(max(int(my + bs * (1 + 2 * crop_scale)), 0), h + 2 * bsi)
    c0 = min(max(int(mx - bs * (1 + crop_scale)), 0), w + 2 * bsi)
    c1 = min(max(int(mx + bs * (1 + crop_scale)), 0), w + 2 * bsi)
    if r1 <= r0 or c1 <= c0:
        raise ValueError(f"empty face crop for box {tuple(box)}")
    # Same pixels as padding the whole frame with 110 and slicing, without the copy.
    face = np.full((r1 - r0, c1 - c0, 3), CROP_PAD_VALUE, dtype=np.uint8)
    fr0, fr1 = max(r0 - bsi, 0), min(r1 - bsi, h)
    fc0, fc1 = max(c0 - bsi, 0), min(c1 - bsi, w)
    if fr1 > fr0 and fc1 > fc0:
        face[fr0 + bsi - r0:fr1 + bsi - r0, fc0 + bsi - c0:fc1 + bsi - c0] = frame_bgr[fr0:fr1, fc0:fc1]
    return cv2.resize(face, (CROP_SIZE, CROP_SIZE))  # bilinear, cv2's default


def syncnet_face_crops(frames_rgb: np.ndarray, boxes: np.ndarray,
                       crop_scale: float = CROP_SCALE) -> np.ndarray:
    """(n, H, W, 3) uint8 RGB frames + (n, 4) face boxes x0, y0, x1, y1 -> (n, 224, 224, 3)
    uint8 BGR crops with run_pipeline.py's crop_video geometry (boxes taken as given; use
    `smooth_boxes` first for the reference's median filter)."""
    frames = np.asarray(frames_rgb)
    boxes = np.asarray(boxes, dtype=np.float64)
    if frames.ndim != 4 or frames.shape[3] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected (n, H, W, 3) uint8 RGB frames, got {frames.shape} {frames.dtype}")
    if boxes.shape != (len(frames), 4):
        raise ValueError(f"expected ({len(frames)}, 4) boxes, got {boxes.shape}")
    out = np.empty((len(frames), CROP_SIZE, CROP_SIZE, 3), dtype=np.uint8)
    for i in range(len(frames)):
        if not np.isfinite(boxes[i]).all():
            raise ValueError(f"frame {i}: no face box (NaN); drop or fill such frames first")
        out[i] = _crop_one(np.ascontiguousarray(frames[i][:, :, ::-1]), boxes[i], crop_scale)
    return out


# ---------------------------------------------------------------------------- the stage

class SyncNetScorer:
    """SyncNet v2 scores of a clip: 25 fps BGR face crops + its 16 kHz audio -> SyncScore."""

    def __init__(self, weights_path: str | None = None, device: str | torch.device = "cpu",
                 batch_size: int = 20, model: SyncNet | None = None, vshift: int = DEFAULT_VSHIFT):
        if model is None:
            if weights_path is None:
                raise ValueError(
                    "SyncNetScorer needs weights_path (syncnet_v2.model from joonson/syncnet_python's "
                    "download_model.sh; the project ships none) or a model")
            model = SyncNet.from_file(weights_path, device=device)
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.batch_size = int(batch_size)
        self.vshift = int(vshift)

    @torch.inference_mode()
    def embeddings(self, face_crops_bgr_224: np.ndarray, wave_16k: np.ndarray,
                   fps: float = FPS) -> tuple[np.ndarray, np.ndarray]:
        """(W, D) video and audio embeddings of the clip's windows."""
        if not math.isclose(float(fps), FPS, abs_tol=1e-3):
            raise ValueError(f"SyncNet assumes 25 fps video (4 MFCC steps per frame); got {fps} fps: "
                             "resample the video to 25 fps first")
        crops = np.asarray(face_crops_bgr_224)
        if crops.ndim != 4 or crops.shape[1:] != (CROP_SIZE, CROP_SIZE, 3):
            raise ValueError(f"expected (n, 224, 224, 3) BGR face crops, got shape {crops.shape}")
        wave = np.asarray(wave_16k)
        if wave.ndim != 1:
            raise ValueError(f"expected mono 16 kHz audio (N,), got shape {wave.shape}")
        usable = min(len(crops), len(wave) // SAMPLES_PER_FRAME)
        total = num_sync_windows(len(crops), len(wave))
        if total < 1:
            raise ValueError(
                f"too short for SyncNet: {len(crops)} frames and {len(wave)} samples give {usable} "
                f"usable frames (min(frames, samples // 640)); at least {WINDOW_FRAMES + 1} are needed")
        mfcc = mfcc_16k(wave)
        lip_out, aud_out = [], []
        for s in range(0, total, self.batch_size):
            lip, aud = sync_windows(crops, mfcc, len(wave), s, s + self.batch_size)
            lip_out.append(self.model.forward_lip(torch.from_numpy(lip).to(self.device)).float().cpu())
            aud_out.append(self.model.forward_aud(torch.from_numpy(aud).to(self.device)).float().cpu())
        return torch.cat(lip_out).numpy(), torch.cat(aud_out).numpy()

    def score(self, face_crops_bgr_224: np.ndarray, wave_16k: np.ndarray, fps: float = FPS) -> SyncScore:
        lip, aud = self.embeddings(face_crops_bgr_224, wave_16k, fps)
        return offset_search(lip, aud, self.vshift)

    def __call__(self, batch: dict) -> dict:
        """{"crops": (n, 224, 224, 3) BGR, "wave_16k": (N,) [, "fps"]} -> SyncScore.to_dict()."""
        return self.score(batch["crops"], batch["wave_16k"], batch.get("fps", FPS)).to_dict()
