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
frames plus its Inception features and 224x224 SyncNet crops at 25 fps.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from stages.eval.image_metrics import psnr_per_frame, ssim_per_frame
from stages.eval.lmd import lmd_per_frame, mouth_points

CHUNK_FRAMES = 64
SYNC_FPS = 25


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
        from stages.media.decode import decode_frames, source_frames_at_rate
        from stages.media.probe import probe_video

        src_info, gen_info = probe_video(pair.source), probe_video(pair.generated)
        n = min(src_info.n_frames, gen_info.n_frames)
        if n == 0:
            raise ValueError(f"{pair.generated}: no frames to compare")
        fps = Fraction(gen_info.fps)
        # The generated frame shown at each 25 fps instant, for SyncNet (the reference
        # re-encodes to 25 fps first).
        n_sync = int(np.floor(n * SYNC_FPS / float(fps) + 1e-9))
        sync_index = source_frames_at_rate(0, n_sync, fps, n, SYNC_FPS)
        want_sync = self.sync is not None and n_sync > 0
        sync_slot = {}
        for slot, i in enumerate(sync_index.tolist()):
            sync_slot.setdefault(i, []).append(slot)

        psnr, ssim, lmd = [], [], []
        feats_real, feats_fake = [], []
        face_frames = 0
        sync_state: dict = {}  # last face box, and (slot, crop) lists of "gen" and "src"
        src_frames = decode_frames(pair.source, 0, n)
        gen_frames = decode_frames(pair.generated, 0, n)
        for start in range(0, n, CHUNK_FRAMES):
            stop = min(n, start + CHUNK_FRAMES)
            src = [_upright(next(src_frames)[1], src_info.rotation) for _ in range(start, stop)]
            gen = [_upright(next(gen_frames)[1], gen_info.rotation) for _ in range(start, stop)]
            track = self.tracker(src)
            faces = np.flatnonzero(track.has_face)
            face_frames += len(faces)
            if want_sync:
                self._collect_sync(track, src, gen, start, sync_slot, sync_state, pair.reconstruction)
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
        if want_sync:
            out.update(self._sync_scores(pair, sync_state))
        return out

    def _collect_sync(self, track, src, gen, start, sync_slot, state: dict, with_source: bool) -> None:
        """Cut the SyncNet crops of this chunk's 25 fps slots now, so no full frame is kept:
        a frame without a detection takes the last detected box (the reference's tracker
        bridges gaps); frames before the first detection wait, uncut, for it."""
        from stages.eval.syncnet import face_boxes_from_landmarks

        for local, i in enumerate(range(start, start + len(src))):
            if track.has_face[local]:
                state["box"] = face_boxes_from_landmarks(track.landmarks[local][None])[0]
                for slot, frames in state.pop("waiting", []):
                    self._cut(state, slot, frames)
            for slot in sync_slot.get(i, ()):
                frames = {"gen": gen[local], **({"src": src[local]} if with_source else {})}
                if "box" in state:
                    self._cut(state, slot, frames)
                else:
                    state.setdefault("waiting", []).append((slot, frames))

    @staticmethod
    def _cut(state: dict, slot: int, frames: dict) -> None:
        from stages.eval.syncnet import syncnet_face_crops

        for name, frame in frames.items():
            state.setdefault(name, []).append((slot, syncnet_face_crops(np.asarray(frame)[None], state["box"][None])[0]))

    def _sync_scores(self, pair: VideoPair, state: dict) -> dict:
        from stages.audio.load import load_audio

        if "box" not in state:
            return {"sync_error": "no face in any frame"}
        wave = load_audio(pair.audio)
        out = {}
        named = [("sync", "gen")] + ([("gt_sync", "src")] if pair.reconstruction else [])
        for name, key in named:
            crops = np.stack([c for _, c in sorted(state.get(key, []), key=lambda t: t[0])])
            try:
                score = self.sync.score(crops, wave, fps=SYNC_FPS)
            except ValueError as e:  # too short for SyncNet's 5-frame windows: no score, said why
                out[f"{name}_error"] = str(e)
                continue
            out.update({f"{name}_conf": float(score.conf), f"{name}_dist": float(score.min_dist),
                        f"{name}_offset": int(score.offset)})
        return out
