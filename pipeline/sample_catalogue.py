"""A small sample catalogue the project makes itself: talking-head-like videos of
`skimage.data.astronaut()` with gentle head motion, dubbed tracks spoken by espeak-ng,
and the Parquet manifest that points at them.

The videos cover what a real catalogue throws at the job: 29.97 and 25 fps, one long
enough to span several segments, one with a stretch of frames without the face, a dubbed
track shorter than its video (padded) and one longer (trimmed).
"""
from __future__ import annotations

import math
import os
import shutil
import subprocess
from dataclasses import dataclass
from fractions import Fraction

import av
import cv2
import numpy as np

from pipeline.dub.schemas import write_manifest
from pipeline.storage import Storage


class SampleError(RuntimeError):
    pass


@dataclass(frozen=True)
class SampleVideo:
    name: str
    fps: Fraction
    seconds: float
    text: str
    no_face: tuple[float, float] | None = None  # seconds without the face
    size: tuple[int, int] = (480, 360)  # width, height


SAMPLES = (
    SampleVideo("newsreader_2997", Fraction(30000, 1001), 3.0, "Good evening. Here is the news of the day, read slowly."),
    SampleVideo("interview_25", Fraction(25), 3.0, "Thank you."),  # shorter than the video: padded
    SampleVideo(
        "lecture_long_25",
        Fraction(25),
        10.0,
        "Today we will talk about how sound becomes motion, and how motion becomes a face that speaks a new language.",
    ),
    SampleVideo(
        "cutaway_25",
        Fraction(25),
        4.0,
        "The camera looks away for a moment, and then it comes back to our speaker, who keeps talking for much longer than the picture lasts.",
        no_face=(1.2, 2.2),
    ),
)


def _face_plate() -> np.ndarray:
    from skimage import data

    img = data.astronaut()  # 512x512 RGB, the face is in the upper middle
    return img[0:340, 80:420]  # 340x340 head-and-shoulders


def render_frame(plate: np.ndarray, t: float, size: tuple[int, int], face: bool) -> np.ndarray:
    """One frame: the plate with gentle head motion (small sway, nod and zoom)."""
    w, h = size
    if not face:
        # A cutaway: a sky-like gradient with slow drift, no face in it.
        y = np.linspace(0, 1, h, dtype=np.float32)[:, None]
        x = np.linspace(0, 1, w, dtype=np.float32)[None, :]
        r = 40 + 60 * y + 10 * np.sin(2 * math.pi * (x + 0.1 * t))
        g = 90 + 70 * y
        b = 170 + 60 * (1 - y) + 0 * x
        return np.clip(np.stack([r + 0 * x, g + 0 * x, b + 0 * x], -1), 0, 255).astype(np.uint8)
    angle = 3.0 * math.sin(2 * math.pi * 0.3 * t)
    scale = (h / plate.shape[0]) * (1.0 + 0.03 * math.sin(2 * math.pi * 0.2 * t))
    cx, cy = plate.shape[1] / 2, plate.shape[0] / 2
    M = cv2.getRotationMatrix2D((cx, cy), angle, scale)
    M[0, 2] += w / 2 - cx + 6 * math.sin(2 * math.pi * 0.25 * t)
    M[1, 2] += h / 2 - cy + 3 * math.sin(2 * math.pi * 0.4 * t)
    return cv2.warpAffine(plate, M, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def write_video(path: str, sample: SampleVideo) -> int:
    plate = _face_plate()
    n = int(round(sample.seconds * sample.fps))
    w, h = sample.size
    with av.open(path, "w") as out:
        stream = out.add_stream("libx264", rate=sample.fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": "20", "preset": "veryfast"}
        for i in range(n):
            t = float(i / sample.fps)
            face = not (sample.no_face and sample.no_face[0] <= t < sample.no_face[1])
            frame = av.VideoFrame.from_ndarray(render_frame(plate, t, sample.size, face), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return n


def speak(text: str, path: str) -> None:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise SampleError("espeak-ng is not installed (apt-get install espeak-ng); it speaks the sample dubbed tracks")
    subprocess.run([exe, "-s", "150", "-w", path, text], check=True, capture_output=True)


def make_sample_catalogue(folder: str, samples: tuple[SampleVideo, ...] = SAMPLES,
                          extra_rows: list[dict] = ()) -> dict[str, str]:
    """Write videos, dubbed tracks and manifest.parquet under `folder`; return their paths.
    extra_rows (video_uri, audio_uri, output_uri) are appended to the manifest."""
    folder = os.path.abspath(folder)
    for sub in ("videos", "audio", "outputs"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    rows = []
    for s in samples:
        video = os.path.join(folder, "videos", f"{s.name}.mp4")
        audio = os.path.join(folder, "audio", f"{s.name}.wav")
        if not os.path.exists(video):
            write_video(video, s)
        if not os.path.exists(audio):
            speak(s.text, audio)
        rows.append(
            {
                "video_uri": video,
                "audio_uri": audio,
                "output_uri": os.path.join(folder, "outputs", f"{s.name}.dubbed.mp4"),
                "options": None,
            }
        )
    rows += [{"video_uri": r["video_uri"], "audio_uri": r["audio_uri"], "output_uri": r["output_uri"], "options": None}
             for r in extra_rows]
    manifest = os.path.join(folder, "manifest.parquet")
    write_manifest(rows, manifest, Storage())
    return {"manifest": manifest, "outputs": os.path.join(folder, "outputs"), "report": os.path.join(folder, "report.parquet")}
