"""Quality checks of a dubbed video: what goes in the report's `warnings` column, and when a
video fails instead of being committed.

Built in one place from a report row's fields (pure functions, no Ray, no media):

- `qc_warnings` lists, for an ok row, everything an operator should look at: an untrained
  weights bundle, a low SyncNet confidence (qc.low_sync_conf), a dubbed track padded or
  trimmed by more than qc.max_audio_fit_s, a face on fewer than qc.min_face_fraction of the
  frames, and a bundle with SyncNet weights that could not score the video. The driver
  joins them with "; " into the row's `warnings`.
- `qc_failure` says why a finished video must not be committed (its SyncNet confidence is
  below qc.min_sync_conf), or None. finalize_video asks it before the commit and raises
  QCError, so nothing half-right is left at an output location; the row fails with
  error_stage "qc".

The SyncNet figures (sync_conf = LSE-C / AVConf, sync_dist = LSE-D, sync_offset in 25 fps
frames) come from stages/eval/sync_check.py on the final file, audio as muxed.
"""
from __future__ import annotations

from pipeline.config import QCConfig
from pipeline.security import redact

SYNC_FIELDS = ("sync_conf", "sync_dist", "sync_offset")


class QCError(Exception):
    """A finished video failed a quality check and was not committed. `fields` are its
    report fields (the SyncNet figures, padding/trimming, seconds), for the failed row."""

    def __init__(self, message: str, fields: dict | None = None):
        super().__init__(message)
        self.fields = dict(fields or {})

    def __reduce__(self):  # Ray pickles a task's exception: keep the fields
        return (type(self), (str(self), self.fields))


def sync_fields(score) -> dict:
    """Report fields of a stages.eval.syncnet.SyncScore (all None without a score)."""
    if score is None:
        return dict.fromkeys(SYNC_FIELDS)
    return {"sync_conf": float(score.conf), "sync_dist": float(score.min_dist), "sync_offset": int(score.offset)}


def untrained_warning(weights_uri: str) -> str:
    return (f"untrained weights bundle {redact(weights_uri)}: the mouth is re-rendered but not lip-synced "
            "(train one with imgtalk prepare / imgtalk train)")


def qc_failure(fields: dict, qc: QCConfig, output_uri: str) -> str | None:
    """Why the video must not be committed, or None."""
    conf = fields.get("sync_conf")
    if qc.min_sync_conf is None or conf is None or conf >= qc.min_sync_conf:
        return None
    return (f"output {redact(output_uri)}: not committed: lip-sync confidence {conf:.3f} is below "
            f"qc.min_sync_conf={qc.min_sync_conf:g} (SyncNet LSE-C; LSE-D {fields.get('sync_dist'):.3f}, "
            f"offset {fields.get('sync_offset')} frames)")


def qc_warnings(fields: dict, qc: QCConfig, trained: bool = True, weights_uri: str = "",
                sync_expected: bool = False) -> list[str]:
    """What an operator should look at in an ok row (`fields`: a report row as a dict).

    trained: whether the weights bundle is trained (untrained: a warning naming
    `weights_uri`); sync_expected: whether the bundle holds SyncNet weights, so a row
    without a score is worth a warning."""
    out = []
    if not trained:
        out.append(untrained_warning(weights_uri))
    conf = fields.get("sync_conf")
    if conf is not None and conf < qc.low_sync_conf:
        out.append(f"low lip-sync confidence {conf:.3f} (SyncNet LSE-C, below qc.low_sync_conf={qc.low_sync_conf:g}; "
                   f"LSE-D {fields.get('sync_dist'):.3f}, offset {fields.get('sync_offset')} frames)")
    elif conf is None and sync_expected:
        out.append("no lip-sync score: SyncNet found no face to score, or the video is too short")
    padded = fields.get("audio_padded_s") or 0.0
    if padded > qc.max_audio_fit_s:
        out.append(f"dubbed audio padded with {padded:.2f} s of silence: it is shorter than the video "
                   f"by more than {qc.max_audio_fit_s:g} s")
    trimmed = fields.get("audio_trimmed_s") or 0.0
    if trimmed > qc.max_audio_fit_s:
        out.append(f"dubbed audio trimmed by {trimmed:.2f} s: it is longer than the video by more than {qc.max_audio_fit_s:g} s")
    face = fields.get("face_fraction")
    if face is not None and face < qc.min_face_fraction:
        out.append(f"face found on only {face:.2f} of the frames (below qc.min_face_fraction={qc.min_face_fraction:g}); "
                   "the other frames are the source's, not re-rendered")
    return out
