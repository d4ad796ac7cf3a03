"""Ray Data operators of the dub job: thin wrappers that open URIs, unpack rows, call a
Ray-free stage from `stages/`, and pack the result. A failure in one row marks that row
(error, stage) and the row flows on untouched by later stages, so one bad video never
stops the job.

What every operator does around its stage (skip rows that failed upstream or whose
segment an earlier run committed, time the call, turn an exception into a failed row
whose message names the file, count it) is written once, in `pipeline.steps`. The classes hold
no Ray imports; `pipeline.dub.job` decides where and how many of each run. Constructors
load models once per actor.
"""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from fractions import Fraction

import numpy as np

# mediapipe's C++ logging prints a warning per graph; keep worker logs readable.
os.environ.setdefault("GLOG_minloglevel", "2")

from pipeline import metrics
from pipeline.config import JobConfig
from pipeline.features import TrackAudio, cached_features, cached_speech_level, hubert_and_cache
from pipeline.dub.rows import fail, fps_of, normalise, pack, unpack
from pipeline.steps import ConfiguredOp, RowError, make_row_step, open_source, video_subject
from pipeline.storage import join_uri
from pipeline.weights import load_motion_extractor, load_stage1, load_stage2, load_vae
from pipeline.workarea import (
    committed_segment, device_faults, digest, mark_video_failed, record_device_fault, segment_marker_uri, segment_uri,
    video_failure,
)

# Every row an operator fails is counted (imgtalk_errors_total{stage, kind}) where it fails.
fail = metrics.counting_failures(fail)
log = logging.getLogger("imgtalk.operators")


class _Op(ConfiguredOp):
    config_model = JobConfig


def _skip(row: dict) -> bool:
    # A segment committed by an earlier run of the same work is done: nothing to recompute.
    return bool(row["error"]) or bool(row["segment_reused"])


def _audio(row: dict) -> str:
    return f"audio {row['audio_uri']}"


def _segment(row: dict) -> str:
    return f"video {row['video_uri']} segment {row['seg_idx']}"


def _subject(row: dict) -> str:
    return _segment(row) if int(row["seg_idx"]) >= 0 else video_subject(row)


# Where a segment first looks for a failure of another segment of its video in this job:
# face, where its work starts, and complete, the GPU's. One small read each; the other
# stages cost less than the look would save.
_CHECK_VIDEO_FAILED_AT = ("face", "complete")
# Where GPU faults are counted and bounded (retries.device_faults): every stage that runs
# a network on the device, per video (analyse, audio) or per segment (motion, complete).
# Without the count a fault that recurs on one input would end actor after actor for ever.
# One more small read per row there.
_COUNT_DEVICE_FAULTS_AT = ("analyse", "audio", "motion", "complete")


def _abandoned(op: _Op, row: dict, stage: str) -> str | None:
    """Why a row is failed without work: it faulted the GPU as often as
    retries.device_faults allows, or (a segment) another segment of its video failed in
    this job."""
    is_segment = int(row["seg_idx"]) >= 0
    try:
        if stage in _COUNT_DEVICE_FAULTS_AT:
            faults = device_faults(op.storage, op.config, row, stage)
            if faults >= op.config.retries.device_faults:
                reason = f"the GPU faulted {faults} times on this {'segment' if is_segment else 'video'}; not tried again"
                _record_video_failed(op, dict(row, error=f"{_subject(row)}: {reason}", error_stage=stage))
                return reason
        if is_segment and stage in _CHECK_VIDEO_FAILED_AT:
            failure = video_failure(op.storage, op.config, row)
            # The failed segment itself may be tried again (Ray resubmits it after an actor died).
            if failure is not None and failure["seg_idx"] != int(row["seg_idx"]):
                return f"skipped: segment {failure['seg_idx']} of this video failed"
    except Exception as e:  # noqa: BLE001 - the look only saves work: without it, do the work
        log.warning("could not check the earlier failures of %s: %s: %s", _subject(row), type(e).__name__, e)
    return None


def _record_video_failed(op: _Op, row: dict) -> None:
    """A segment failed: its video's later segments need not be computed."""
    if int(row["seg_idx"]) < 0:  # a whole video's row: split_segments already gives it no segments
        return
    try:
        mark_video_failed(op.storage, op.config, row)
    except Exception as e:  # noqa: BLE001 - without the marker the other segments are merely computed
        log.warning("could not record that %s failed: %s: %s", row["video_uri"], type(e).__name__, e)


def _record_device_fault(op: _Op, row: dict, stage: str) -> None:
    if stage in _COUNT_DEVICE_FAULTS_AT:
        record_device_fault(op.storage, op.config, row, stage)


row_step = make_row_step(normalise, _skip, fail, metrics.instrumented, retries=lambda op: op.config.retries,
                         abandoned=_abandoned, on_failed=_record_video_failed, on_device_fault=_record_device_fault)


# --------------------------------------------------------------------------- plan


class PlanOp(_Op):
    """Probe each video (fps, frame count, size) and check the dubbed audio is there."""

    def __init__(self, config: dict):
        from stages.media.probe import codec_threads

        super().__init__(config)
        # The probe decodes the first frame: with FFmpeg's automatic count that is a frame
        # thread (and a frame buffer) per core of the node, whatever the plan pool reserved.
        self.threads = codec_threads(self.config.pools["plan"].num_cpus)

    @row_step("plan", video_subject)
    def __call__(self, row: dict) -> dict:
        from stages.media import deliverable_format, probe_video
        from stages.media.encode import check_container, container_for

        if not self.storage.exists(row["audio_uri"]):
            raise RowError(f"audio {row['audio_uri']}: no such file")
        with open_source(self.storage, row["video_uri"]) as src:
            info = probe_video(src, threads=self.threads, measure_gop=self.config.output.codec == "match-source")
        # A format the output cannot keep fails here, before any face or GPU work.
        codec = encoder_settings(self.config.output).for_source(info, row["video_uri"]).codec
        deliverable_format(info, codec, row["video_uri"])
        check_container(codec, container_for(row["output_uri"]), row["output_uri"])
        video_identity = self.storage.identity(row["video_uri"])
        return dict(
            width=info.width,
            height=info.height,
            fps_num=info.fps.numerator,
            fps_den=info.fps.denominator,
            n_frames=info.n_frames,
            duration_s=info.duration_s,
            rotation=info.rotation,
            # What compose writes the output in: the source's format and colour, its codec family.
            pix_fmt=info.pix_fmt,
            color_primaries=info.color_primaries,
            color_trc=info.color_trc,
            colorspace=info.colorspace,
            color_range=info.color_range,
            bit_depth=info.bit_depth,
            source_codec=info.codec,
            source_bit_rate=info.bit_rate,
            source_gop=info.gop,
            mastering_display=info.mastering_display,
            content_light=info.content_light,
            work_key=digest(row["work_key"], row["video_uri"], video_identity),
        )


def encoder_settings(out):
    """stages.media.EncoderSettings of an OutputConfig."""
    from stages.media import EncoderSettings

    return EncoderSettings(codec=out.codec, crf=out.crf, preset=out.preset, bitrate=out.bitrate, gop=out.gop,
                           qscale=out.qscale, prores_profile=out.prores_profile)


def source_video(row: dict):
    """The source's VideoInfo as PlanOp put it in the row (compose writes in its format);
    None for a row PlanOp did not fill (compose then probes the source itself)."""
    from stages.media import VideoInfo

    if not row["pix_fmt"]:
        return None
    return VideoInfo(
        width=int(row["width"]), height=int(row["height"]), rotation=int(row["rotation"]), fps=fps_of(row),
        n_frames=int(row["n_frames"]), duration_s=float(row["duration_s"]), codec=row["source_codec"],
        pix_fmt=row["pix_fmt"], has_audio=False, color_primaries=int(row["color_primaries"]),
        color_trc=int(row["color_trc"]), colorspace=int(row["colorspace"]), color_range=int(row["color_range"]),
        bit_depth=int(row["bit_depth"]), bit_rate=int(row["source_bit_rate"]), gop=int(row["source_gop"]),
        mastering_display=row["mastering_display"], content_light=row["content_light"],
    )


# --------------------------------------------------------------------------- analyse


class AnalyseOp(_Op):
    """Per video: sample frames, decide who is dubbed (the row's `face` option), and pick
    the neutral frame and the reference bank from that person's faces only."""

    def __init__(self, config: dict, weights_uri: str):
        from stages.face import FaceTracker
        from stages.media.probe import codec_threads

        super().__init__(config, weights_uri)
        self.extractor = load_motion_extractor(self.bundle)
        # Each call of a FaceTracker starts a fresh clip, so one tracker serves every video.
        self.tracker = FaceTracker(min_detection_confidence=self.config.face.min_detection_confidence, smoothing_sigma_frames=0.0,
                                   identity_max_distance=self.config.face.identity_max_distance)
        # Decoder threads follow the cores the pool reserved, not the node's.
        self.threads = codec_threads(self.config.pools["analyse"].num_cpus)

    def _store_references(self, row: dict, ref_crops: np.ndarray) -> str:
        """The reference bank goes to the work area once per video; segments carry its URI
        (a 1.2 MB bank copied into every segment row would grow with video length)."""
        uri = join_uri(self.config.work_dir(), "refs", f"{row['video_id']}.npy")
        self.storage.write_bytes_atomic(pack(ref_crops), uri)
        return uri

    @row_step("analyse", video_subject)
    def __call__(self, row: dict) -> dict:
        from stages.face import crop_faces, FaceTrack, upright_size, upright_view
        from stages.face.identity import (
            FaceChoice, SampledFace, best_match, choose_person, face_in_box, face_signature, group_people, mean_signature,
        )
        from stages.media import decode_frames
        from stages.motion.extractor import extract_motion
        from stages.motion.selection import (
            NoFaceError, dark_lip_gap, mouth_opening, mouth_spread, select_neutral_and_references,
        )

        n = int(row["n_frames"])
        rotation = int(row["rotation"])  # faces are found upright; the box option is in upright pixels too
        choice = FaceChoice.parse(row["face"])
        max_distance = self.config.face.identity_max_distance
        count = min(self.config.analyse.sample_frames, n)
        indices = np.unique(np.linspace(0, n - 1, count).round().astype(np.int64))

        def crop_of(frame, landmarks):  # (256, 256, 3) uint8 aligned crop of one face
            return crop_faces([frame], FaceTrack(landmarks[None].astype(np.float32), np.ones(1, bool)))[0][0]

        # Every face of every sampled frame, with its crop: who is dubbed is decided from
        # all of them. Sampled frames are far apart in time and each is dropped once its
        # faces are cropped (24 sampled 4K frames held together would be 0.6 GB).
        sampled: list[SampledFace] = []
        sampled_crops: list[np.ndarray] = []
        sampled_gaps: list[float] = []  # dark_lip_gap: the pixels' mouth opening
        anchor = None  # the box option's face: its signature
        with open_source(self.storage, row["video_uri"]) as src:
            for k, i in enumerate(indices):
                for _, frame in decode_frames(src, int(i), int(i) + 1, threads=self.threads):
                    frame = upright_view(frame, rotation)
                    for landmarks in self.tracker.faces(frame):
                        sampled.append(SampledFace(k, landmarks, face_signature(frame, landmarks)))
                        sampled_crops.append(crop_of(frame, landmarks))
                        sampled_gaps.append(dark_lip_gap(frame, landmarks))
            if choice.mode == "box":
                at = min(n - 1, max(0, int(round(choice.t * float(fps_of(row))))))
                for _, frame in decode_frames(src, at, at + 1, threads=self.threads):
                    frame = upright_view(frame, rotation)
                    faces = self.tracker.faces(frame)
                    picked = face_in_box(faces, choice.box)
                    if picked is None:
                        raise RowError(f"video {row['video_uri']}: no face centre inside the face box {list(choice.box)} "
                                       f"at {choice.t:g} s (frame {at}); {len(faces)} face(s) there")
                    anchor = face_signature(frame, faces[picked])
        if anchor is not None:
            identity = anchor
        else:
            person = choose_person(group_people(sampled, max_distance), choice,
                                   upright_size(int(row["width"]), int(row["height"]), rotation))
            if person is None:
                raise RowError(
                    f"video {row['video_uri']}: no face found in any of {len(indices)} frames sampled across the video")
            identity = mean_signature([f.signature for f in person])
        # The chosen person's face in each sampled frame (at most one; none where absent).
        landmarks = np.full((len(indices), 478, 2), np.nan, np.float32)  # (S, 478, 2)
        crops = np.zeros((len(indices), 256, 256, 3), np.uint8)  # (S, 256, 256, 3)
        has_face = np.zeros(len(indices), bool)
        gaps = np.full(len(indices), np.nan)
        chosen = []
        for k in range(len(indices)):
            here = [j for j, f in enumerate(sampled) if f.frame == k]
            match = best_match([sampled[j].signature for j in here], identity, max_distance)
            if match is not None:
                j = here[match]
                landmarks[k], crops[k], has_face[k], gaps[k] = sampled[j].landmarks, sampled_crops[j], True, sampled_gaps[j]
                chosen.append(sampled[j].signature)
        if anchor is not None and chosen:
            # The box names one look; the person's average over the video matches their other looks better.
            identity = mean_signature([anchor] + chosen)
        motion = extract_motion(self.extractor, crops, batch_size=self.config.batch.motion_frames)
        # A candidate neutral frame's mouth is read in the frames either side of it too (is it at rest?).
        window = self.config.analyse.still_window_seconds
        around = max(1, round(window * float(fps_of(row))))

        def spread_of(k: int) -> float:
            i = int(indices[k])
            nearby = [self.tracker.faces(upright_view(frame, rotation))  # every face of each frame around i
                      for j, frame in decode_frames(src, max(0, i - around), min(n, i + around + 1), threads=self.threads)
                      if j != i]
            return mouth_spread(landmarks[k], nearby)

        try:
            with open_source(self.storage, row["video_uri"]) as src:
                analysis = select_neutral_and_references(
                    indices, crops, has_face, mouth_opening(landmarks), motion, self.config.analyse.reference_bank,
                    dark_gap=gaps, spread_of=spread_of if window > 0 else None,
                )
        except NoFaceError:
            raise RowError(
                f"video {row['video_uri']}: the chosen face ({row['face']}) is in none of {len(indices)} frames sampled "
                "across the video"
            ) from None
        return dict(
            neutral_frame=analysis.neutral_frame,
            neutral_x_c=pack(analysis.neutral_x_c),
            neutral_exp=pack(analysis.neutral_exp),
            ref_frames=pack(analysis.ref_frames),
            ref_crops_uri=self._store_references(row, analysis.ref_crops),
            ref_pose=pack(analysis.ref_pose),
            sampled_face_fraction=analysis.sampled_face_fraction,
            face_identity=pack(identity.astype(np.float32)),
        )


# --------------------------------------------------------------------------- audio


class AudioOp(_Op):
    """Per video: HuBERT features of the dubbed track, through the content cache."""

    def __init__(self, config: dict, weights_uri: str):
        super().__init__(config, weights_uri)
        self.hubert, self.cache = hubert_and_cache(self.config, self.bundle, self.storage)

    @row_step("audio", _audio)
    def __call__(self, row: dict) -> dict:
        track = TrackAudio(self.storage.read_bytes(row["audio_uri"]))
        cached, hit = cached_features(self.cache, self.hubert, track)
        level = cached_speech_level(self.cache, track) if self.config.motion.silence_gate_db is not None else None
        return dict(
            audio_sha256=track.sha,
            features_path=cached.path,
            speech_level_path=level.path if level is not None else "",
            feature_frames=cached.n_frames,
            feature_dim=cached.dim,
            audio_duration_s=cached.duration_s,
            cache_hit=hit,
        )


# --------------------------------------------------------------------------- split


def split_segments(row: dict) -> list[dict]:
    """One video row -> its segment rows (one marker row when the video already failed)."""
    from stages.media import VideoInfo, segment_plan

    row = normalise(row)
    if _skip(row):
        return [dict(row, n_segments=0)]
    info = VideoInfo(
        width=int(row["width"]), height=int(row["height"]), rotation=0, fps=fps_of(row),
        n_frames=int(row["n_frames"]), duration_s=float(row["duration_s"]), codec="", pix_fmt="", has_audio=False,
    )
    plan = segment_plan(row["video_id"], info, float(row["segment_seconds"]))
    return [
        dict(row, seg_idx=s.seg_idx, n_segments=len(plan), frame_start=s.frame_start, frame_end=s.frame_end)
        for s in plan
    ]


# --------------------------------------------------------------------------- face


class FaceOp(_Op):
    """Detect/track/smooth the dubbed person's face in a segment, aligned 256² crops +
    affines; frames without that person have no face (they pass through). The segment
    is decoded twice (landmarks, then crops) so that one frame is in memory at a time,
    never the whole segment."""

    def __init__(self, config: dict):
        from stages.face import FaceTracker
        from stages.media.probe import codec_threads

        super().__init__(config)
        # Each call starts a fresh clip (mediapipe state does not carry across segments).
        self.tracker = FaceTracker(
            min_detection_confidence=self.config.face.min_detection_confidence,
            smoothing_sigma_frames=self.config.face.smoothing_sigma_frames,
            max_gap_frames=self.config.face.max_gap_frames,
            identity_max_distance=self.config.face.identity_max_distance,
        )
        # Decoder threads follow the cores the pool reserved, not the node's.
        self.threads = codec_threads(self.config.pools["face"].num_cpus)

    @row_step("face", _segment)
    def __call__(self, row: dict) -> dict:
        from stages.face import coded_affine, track_and_crop, upright_view
        from stages.media import decode_frames

        uri = segment_uri(self.config, row)
        done = committed_segment(self.storage, uri)
        if done is not None:  # an earlier run of this very work committed it
            return dict(segment_uri=uri, segment_frames=done["frames"], face_frames=done["face_frames"], segment_reused=True)

        # Faces are found upright (a phone video's coded frames hold them sideways) and
        # their affines turned back to coded pixels, where compose pastes.
        rotation = int(row["rotation"])

        def segment_frames():
            with open_source(self.storage, row["video_uri"]) as src:
                for _, frame in decode_frames(src, int(row["frame_start"]), int(row["frame_end"]), threads=self.threads):
                    yield upright_view(frame, rotation)

        # The video's person (decided once, in analyse), re-found by signature at every
        # (re)acquisition; a row without one (analyse not run) takes the largest face.
        identity = unpack(row["face_identity"]) if row["face_identity"] else None
        track, crops, affines = track_and_crop(self.tracker, segment_frames, identity=identity)
        if rotation % 360:
            affines = np.stack([coded_affine(M, rotation, int(row["width"]), int(row["height"])) for M in affines])
        return dict(
            crops=pack(crops),
            affines=pack(affines),
            has_face=pack(track.has_face.astype(bool)),
            face_frames=int(track.has_face.sum()),
        )


# --------------------------------------------------------------------------- motion


class MotionOp(_Op):
    """Motion extractor on the source crops; Stage 1 from the cached audio features."""

    def __init__(self, config: dict, weights_uri: str):
        from stages.audio.cache import FeatureCache
        from stages.common.checkpoint import load_config
        from stages.completion.imc_unet import IMCUNetConfig
        from stages.completion.stage import resolve_device
        from stages.motion.stage import MotionStage

        super().__init__(config, weights_uri)
        self.stage = MotionStage(
            load_motion_extractor(self.bundle),
            load_stage1(self.bundle),
            batch_frames=self.config.batch.motion_frames,
            min_reference_gap_frames=self.config.analyse.min_reference_gap_frames,
            silence_gate_db=self.config.motion.silence_gate_db,
            silence_gate_frames=self.config.motion.silence_gate_frames,
            silence_gate_mode=self.config.motion.silence_gate_mode,
            # Ray hides GPUs from actors that reserved none, so "auto" lands on the CPU there.
            device=resolve_device(self.config.device),
        )
        fs, root = self.storage.fs_for(self.config.cache_uri)
        self.cache = FeatureCache(fs, root)
        # An audio-conditioned Stage 2 (the ablation) takes HuBERT windows, not keypoints.
        unet = load_config(IMCUNetConfig, self.bundle.path("stage2"))
        self.audio_window = unet.audio_window_frames if unet.condition == "audio" else None

    @row_step("motion", _segment)
    def __call__(self, row: dict) -> dict:
        from stages.audio.cache import CachedFeatures
        from stages.audio.hubert import steps_per_frame
        from stages.completion.stage import audio_conditions
        from stages.motion.stage import frame_centres

        fps = fps_of(row)
        frame_indices = np.arange(int(row["frame_start"]), int(row["frame_end"]))
        frame_times = np.array([float(Fraction(int(i)) / fps) for i in frame_indices])
        t0 = frame_times[0] if len(frame_times) else 0.0
        t1 = float(Fraction(int(row["frame_end"])) / fps)
        first = max(0, int(math.floor((t0 - self.config.motion.warmup_seconds) * 25)))
        stage1 = self.stage.stage1.cfg
        # Stage 1 may look ahead: read its window's worth of audio past the segment too.
        last = int(math.ceil(t1 * 25)) + 1 + max(int(getattr(stage1, "audio_window_after", 0)), self.audio_window or 0)
        cached = CachedFeatures(row["features_path"], int(row["feature_frames"]), float(row["audio_duration_s"]), int(row["feature_dim"]))
        rows_50hz = self.cache.read_window(cached, first, last)  # two rows per 25 Hz frame
        if len(rows_50hz) < 2 * (last - first):
            # The dubbed track ends before the video: silence drives a closed mouth.
            pad = np.zeros((2 * (last - first) - len(rows_50hz), cached.dim), np.float32)
            rows_50hz = np.concatenate([rows_50hz, pad]) if len(rows_50hz) else pad
        # Exactly the audio steps per frame Stage 1 was trained with (k=2: the 50 Hz rows; k=1: their pair means).
        features = steps_per_frame(rows_50hz, stage1.audio_steps_per_frame)
        level_db = None
        if row.get("speech_level_path"):
            level = self.cache.read_window(CachedFeatures(row["speech_level_path"], cached.n_frames, cached.duration_s, 1),
                                           first, last)
            level_db = level[::2, 0]  # a frame's value sits on both of its rows
        out = self.stage(
            crops=unpack(row["crops"]),
            has_face=unpack(row["has_face"]),
            frame_indices=frame_indices,
            frame_times=frame_times,
            features=features,
            first_feature=first,
            audio_duration_s=float(row["audio_duration_s"]),
            neutral_x_c=unpack(row["neutral_x_c"]),
            neutral_exp=unpack(row["neutral_exp"]),
            ref_frames=unpack(row["ref_frames"]),
            ref_pose=unpack(row["ref_pose"]),
            speech_level_db=level_db,
            neutral_frame=int(row["neutral_frame"]),
        )
        driving = out["driving"]
        if self.audio_window is not None:
            driving = audio_conditions(rows_50hz, first, frame_centres(frame_indices, frame_times), self.audio_window)
        return dict(driving=pack(driving), ref_index=pack(out["ref_index"]), shows_reference=pack(out["shows_reference"]))


# --------------------------------------------------------------------------- complete


class CompleteOp(_Op):
    """GPU actor: VAE + IMC-UNet. One actor per GPU on a cluster; fp32 on the CPU."""

    def __init__(self, config: dict, weights_uri: str):
        from stages.completion.stage import CompletionStage
        from stages.face import MouthMask

        super().__init__(config, weights_uri)
        self.stage = CompletionStage(
            load_vae(self.bundle),
            load_stage2(self.bundle),
            MouthMask().array(),
            batch_frames=self.config.batch.complete_frames,
            device=self.config.device,
            precision=self.config.precision,
            # compose pastes this alpha's pixels only
            decode_region=MouthMask().feathered(self.config.face.feather_px) if self.config.complete.decode == "mouth" else None,
            decode_margin=self.config.complete.decode_margin_latents,
        )
        self._banks: dict[str, np.ndarray] = {}

    def _references(self, uri: str) -> np.ndarray:
        """A video's reference bank, read once per video by this actor."""
        if uri not in self._banks:
            self._banks[uri] = unpack(self.storage.read_bytes(uri))
            while len(self._banks) > 8:
                self._banks.pop(next(iter(self._banks)))
        return self._banks[uri]

    @row_step("complete", _segment)
    def __call__(self, row: dict) -> dict:
        generated = self.stage(
            row["video_id"],
            unpack(row["crops"]),
            unpack(row["has_face"]),
            unpack(row["driving"]),
            unpack(row["ref_index"]),
            self._references(row["ref_crops_uri"]),
            unpack(row["shows_reference"]) if row.get("shows_reference") else None,
        )
        return dict(generated=pack(generated), crops=b"", driving=b"", ref_index=b"", shows_reference=b"")


# --------------------------------------------------------------------------- compose


class ComposeOp(_Op):
    """Re-decode the segment, paste the generated crops back, encode, upload."""

    def __init__(self, config: dict):
        from stages.compose import ComposeStage
        from stages.face import MouthMask
        from stages.media.probe import codec_threads

        super().__init__(config)
        out = self.config.output
        self.stage = ComposeStage(
            MouthMask().feathered(self.config.face.feather_px), codec=out.codec, crf=out.crf, preset=out.preset,
            bitrate=out.bitrate, gop=out.gop, qscale=out.qscale, prores_profile=out.prores_profile,
            # Decoder and x264 threads follow the cores the pool reserved, not the node's.
            threads=codec_threads(self.config.pools["compose"].num_cpus),
        )

    @row_step("compose", _segment)
    def __call__(self, row: dict) -> dict:
        from stages.media.encode import container_for

        uri = segment_uri(self.config, row)
        with tempfile.TemporaryDirectory(prefix="imgtalk-seg-") as tmp:
            # The output's container (its extension), so the segment's packets stream-copy into it.
            local = os.path.join(tmp, "segment." + container_for(row["output_uri"]))
            with open_source(self.storage, row["video_uri"]) as src:
                written = self.stage(
                    src,
                    local,
                    int(row["frame_start"]),
                    int(row["frame_end"]),
                    int(row["width"]),
                    int(row["height"]),
                    fps_of(row),
                    unpack(row["generated"]),
                    unpack(row["affines"]),
                    unpack(row["has_face"]),
                    crf=None if int(row["crf"]) < 0 else int(row["crf"]),
                    video=source_video(row),
                )
            self.storage.put_atomic(local, uri)
        marker = {"frames": int(written), "face_frames": int(row["face_frames"])}
        self.storage.write_bytes_atomic(json.dumps(marker).encode(), segment_marker_uri(uri))
        return dict(segment_uri=uri, segment_frames=written, generated=b"", affines=b"", has_face=b"")
