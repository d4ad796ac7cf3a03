"""Every metric of one (source, generated, audio) video pair, Ray-free.

The source video's face track defines the geometry: its 256x256 aligned crops (the affine of
stages/face/align.py) are cut from the source and from the generated frame alike, so the
pair is pixel-aligned and a dub, which only re-renders the mouth, is compared region for
region. Per frame with a source face:

- reconstruction protocol (the generated video dubs the source with its own audio):
  PSNR and SSIM of the crops (stages/eval/image_metrics.py), LMD of the mouth landmarks of
  the generated crop (FaceMesh run on the generated frames) against the source's
  (stages/eval/lmd.py);
- both protocols: Inception pool features of both crops for FID (pooled over the whole test
  set by the caller, every `fid_stride`-th face frame) and SyncNet's LSE-C / LSE-D / offset
  of the generated video against the audio it was dubbed with; in reconstruction also the
  source video against the same audio (the "ground truth" row).

A metric whose network is not loaded is absent from the result; the caller reports it as
skipped with its reason. Frames are processed in chunks, so a long video costs a chunk of
frames plus its Inception features; SyncNet's pass (stages/eval/sync_check.py, the dub's
own check) holds its 224x224 crops at 25 fps.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from stages.eval.image_metrics import psnr_per_frame, ssim_per_frame
from stages.eval.lmd import lmd_per_frame, mouth_points

CHUNK_FRAMES = 64


@dataclass(frozen=True)
class VideoPair:
    source: str  # local path of the original video (the ground truth in reconstruction)
    generated: str  # local path of the dubbed video
    audio: str  # local path of the audio the generated video was dubbed with
    reconstruction: bool  # True: `audio` is the source's own, so the source is the ground truth


def _upright(frame: np.ndarray, rotation: int) -> np.ndarray:
    return np.ascontiguousarray(np.rot90(frame, k=rotation // 90)) if rotation else frame


def _mean(values: list[np.ndarray]) -> float | None:
    v = np.concatenate(values) if values else np.zeros(0)
    v = v[np.isfinite(v)]
    return float(v.mean()) if len(v) else None


class VideoQuality:
    """Constructor loads what the metrics need; `__call__(pair)` returns one video's figures.

    inception: a stages.eval.fid.InceptionFeatures (or None: no FID features);
    sync: a stages.eval.syncnet.SyncNetScorer (or None: no LSE-C / LSE-D)."""

    def __init__(self, inception=None, sync=None, fid_stride: int = 1, tracker_factory=None):
        from stages.face.tracker import FaceTracker

        self.inception = inception
        self.sync = sync
        self.fid_stride = max(1, int(fid_stride))
        # Each frame's own detection, as the lip-sync measure does: smoothing would blur
        # the very mouth motion LMD compares.
        make = tracker_factory or (lambda: FaceTracker(smoothing_sigma_frames=0.0, max_gap_frames=0))
        self.tracker = make()

    def close(self) -> None:
        self.tracker.close()

    def __call__(self, pair: VideoPair) -> dict:
        from stages.face.align import crop_transform, transform_points, warp_crop
        from stages.media.decode import decode_frames
        from stages.media.probe import probe_video

        src_info, gen_info = probe_video(pair.source), probe_video(pair.generated)
        n = min(src_info.n_frames, gen_info.n_frames)
        if n == 0:
            raise ValueError(f"{pair.generated}: no frames to compare")
        fps = Fraction(gen_info.fps)

        psnr, ssim, lmd = [], [], []
        feats_real, feats_fake = [], []
        face_frames = 0
        src_frames = decode_frames(pair.source, 0, n)
        gen_frames = decode_frames(pair.generated, 0, n)
        for start in range(0, n, CHUNK_FRAMES):
            stop = min(n, start + CHUNK_FRAMES)
            src = [_upright(next(src_frames)[1], src_info.rotation) for _ in range(start, stop)]
            gen = [_upright(next(gen_frames)[1], gen_info.rotation) for _ in range(start, stop)]
            track = self.tracker(src)
            faces = np.flatnonzero(track.has_face)
            face_frames += len(faces)
            if len(faces) == 0:
                continue
            affines = [crop_transform(track.landmarks[i]) for i in faces]
            real = np.stack([warp_crop(src[i], M) for i, M in zip(faces, affines)])
            fake = np.stack([warp_crop(gen[i], M) for i, M in zip(faces, affines)])
            if pair.reconstruction:
                psnr.append(psnr_per_frame(real, fake))
                ssim.append(ssim_per_frame(real, fake))
                gen_track = self.tracker([gen[i] for i in faces])
                both = np.asarray(gen_track.has_face, bool)
                if both.any():
                    src_pts = np.stack([transform_points(M, mouth_points(track.landmarks[i]))
                                        for i, M in zip(faces[both], np.asarray(affines)[both])])
                    gen_pts = np.stack([transform_points(M, mouth_points(gen_track.landmarks[j]))
                                        for j, M in zip(np.flatnonzero(both), np.asarray(affines)[both])])
                    lmd.append(lmd_per_frame(src_pts, gen_pts))
            if self.inception is not None:
                keep = ((start + faces) % self.fid_stride) == 0
                if keep.any():
                    feats_real.append(self.inception({"frames": real[keep]})["features"])
                    feats_fake.append(self.inception({"frames": fake[keep]})["features"])

        out: dict = {"frames": n, "face_frames": face_frames, "fps": float(fps)}
        if pair.reconstruction:
            out.update(psnr=_mean(psnr), ssim=_mean(ssim), lmd=_mean(lmd),
                       lmd_frames=int(sum(len(v) for v in lmd)))
        if self.inception is not None:
            dim = 2048
            out["fid_real"] = np.concatenate(feats_real).astype(np.float32) if feats_real else np.zeros((0, dim), np.float32)
            out["fid_fake"] = np.concatenate(feats_fake).astype(np.float32) if feats_fake else np.zeros((0, dim), np.float32)
        if self.sync is not None:
            out.update(self._sync_scores(pair))
        return out

    def _sync_scores(self, pair: VideoPair) -> dict:
        """SyncNet on the generated video (and, in reconstruction, on the source: the ground
        truth's own figure) with the audio it was dubbed with: stages/eval/sync_check.py,
        the same check the dub job runs on every output."""
        from stages.eval.sync_check import sync_score_video

        out = {}
        named = [("sync", pair.generated)] + ([("gt_sync", pair.source)] if pair.reconstruction else [])
        for name, video in named:
            score = sync_score_video(video, pair.audio, self.sync, tracker=self.tracker)
            if score is None:
                out[f"{name}_error"] = f"{video}: no face, or too short for SyncNet's 5-frame windows"
                continue
            out.update({f"{name}_conf": float(score.conf), f"{name}_dist": float(score.min_dist),
                        f"{name}_offset": int(score.offset)})
        return out
