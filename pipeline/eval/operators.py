"""The eval job's one operator: open a pair's URIs, call stages/eval/video_quality.py, record.

An actor holds the metric networks (FID Inception, SyncNet) for its lifetime; a failure of
one video is that row's, named with its file. No Ray imports: pipeline/eval/job.py decides
where it runs (on a GPU when the config asks for one)."""
from __future__ import annotations

import contextlib
import json
import os

os.environ.setdefault("GLOG_minloglevel", "2")  # mediapipe's per-graph warnings

from pipeline.arrays import pack
from pipeline.eval.config import EvalConfig
from pipeline.steps import ConfiguredOp
from pipeline.storage import Storage

# Where the actor finds each metric's weights: resolved once on the driver (job.py), so
# every actor loads the same files and the output records which.
WEIGHT_KEYS = ("inception_uri", "syncnet_uri")


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


@contextlib.contextmanager
def _local(storage: Storage, uri: str, suffix: str):
    with storage.local_copy(uri, suffix=suffix) as path:
        yield path


class ScoreOp(ConfiguredOp):
    config_model = EvalConfig

    def __init__(self, config: dict, weights: dict):
        import torch

        from stages.eval.video_quality import VideoQuality

        super().__init__(config)
        torch.set_num_threads(self.config.torch_threads)
        device = _device(self.config.device)
        inception = sync = None
        if weights.get("inception_uri"):
            from stages.eval.fid import InceptionFeatures

            with _local(self.storage, weights["inception_uri"], ".pth") as path:
                inception = InceptionFeatures(path, device=device)
        if weights.get("syncnet_uri"):
            from stages.eval.syncnet import SyncNetScorer

            with _local(self.storage, weights["syncnet_uri"], ".model") as path:
                sync = SyncNetScorer(path, device=device)
        self.quality = VideoQuality(inception=inception, sync=sync, fid_stride=self.config.fid_stride)

    def __call__(self, row: dict) -> dict:
        from stages.eval.video_quality import VideoPair

        # Figures travel as one JSON string: every row has the same Arrow schema whichever
        # metrics ran; the features for FID as .npy bytes.
        out = dict(row, status="ok", error="", figures="{}", fid_real=b"", fid_fake=b"")
        try:
            with contextlib.ExitStack() as stack:
                source = stack.enter_context(_local(self.storage, row["video_uri"], os.path.splitext(row["video_uri"])[1]))
                generated = stack.enter_context(_local(self.storage, row["output_uri"], os.path.splitext(row["output_uri"])[1]))
                audio_uri = row["audio_uri"] or row["video_uri"]
                audio = stack.enter_context(_local(self.storage, audio_uri, os.path.splitext(audio_uri)[1]))
                figures = self.quality(VideoPair(source, generated, audio, row["protocol"] == "reconstruction"))
        except FileNotFoundError as e:
            return dict(out, status="failed", error=f"{e.filename or e}: no such file")
        except Exception as e:  # noqa: BLE001 - one video's failure is that row's
            return dict(out, status="failed", error=f"{row['output_uri']}: {type(e).__name__}: {e}")
        for key in ("fid_real", "fid_fake"):
            if key in figures:
                out[key] = pack(figures.pop(key))
        figures.pop("fps", None)
        return dict(out, figures=json.dumps(figures))
