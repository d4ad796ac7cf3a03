"""Paste a (generated) aligned crop back into its source frame: into 8-bit RGB
(paste_back), or into the source's own Y'CbCr planes at its own bit depth, matrix and
range (paste_back_native), which compose uses so that a 10-bit, 4:2:2 or HDR source is
written back in its own format."""
from __future__ import annotations

import av
import cv2
import numpy as np

from stages.media.colour import Coding, rgb_to_ycbcr


def _warped_roi(crop: np.ndarray, M: np.ndarray, blend_mask: np.ndarray, h: int, w: int, step: tuple[int, int] = (1, 1)):
    """(x0, y0, face, alpha): the frame rectangle under the non-zero part of the mask,
    its corners on multiples of `step` (chroma blocks) where the frame allows, with the
    crop (rh, rw, 3) float32 and the mask (rh, rw) float32 warped into it; None where
    nothing is pasted (no face: M all NaN; an empty mask; a footprint off the frame)."""
    M = np.asarray(M, dtype=np.float64)
    if not np.all(np.isfinite(M)):
        return None
    d = crop.shape[0]
    if crop.shape[:2] != (d, d) or blend_mask.shape != (d, d):
        raise ValueError(f"face/paste.py: crop {crop.shape} and blend_mask {blend_mask.shape} "
                         f"must both be {d}x{d}")
    ys, xs = np.nonzero(blend_mask > 0)
    if len(xs) == 0:
        return None
    to_frame = cv2.invertAffineTransform(M)
    # Footprint of the mask's bounding box (plus a pixel for bilinear reach) in the frame.
    corners = np.array([[xs.min() - 1, ys.min() - 1], [xs.max() + 1, ys.min() - 1],
                        [xs.min() - 1, ys.max() + 1], [xs.max() + 1, ys.max() + 1]], np.float64)
    footprint = corners @ to_frame[:, :2].T + to_frame[:, 2]
    sx, sy = step
    x0, y0 = np.maximum(np.floor(footprint.min(0)).astype(int), 0)
    x1, y1 = np.minimum(np.ceil(footprint.max(0)).astype(int) + 1, (w, h))
    if x0 >= x1 or y0 >= y1:
        return None
    x0, y0 = x0 - x0 % sx, y0 - y0 % sy
    x1, y1 = min(-(-x1 // sx) * sx, w), min(-(-y1 // sy) * sy, h)
    to_roi = to_frame.copy()
    to_roi[:, 2] -= (x0, y0)
    size = (int(x1 - x0), int(y1 - y0))
    face = cv2.warpAffine(crop, to_roi, size, flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0).astype(np.float32)
    alpha = cv2.warpAffine(blend_mask.astype(np.float32), to_roi, size, flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return int(x0), int(y0), face, alpha


def paste_back(frame: np.ndarray, crop: np.ndarray, M: np.ndarray,
               blend_mask: np.ndarray) -> np.ndarray:
    """A new uint8 frame: crop alpha-blended into frame through the inverse of M.

    frame (H, W, 3) uint8; crop (d, d, 3) uint8; M (2, 3) source->crop affine (all NaN for
    a frame without a face, which is returned unchanged); blend_mask (d, d) float in [0, 1].
    Only the frame rectangle under the non-zero part of the mask is warped and blended, so
    a 1080p frame costs about as much as the face, and every pixel outside that footprint
    (and every pixel where the warped mask is exactly 0) is copied bit for bit.
    """
    out = np.array(frame, dtype=np.uint8, copy=True)
    roi = _warped_roi(crop, M, blend_mask, *out.shape[:2])
    if roi is None:
        return out
    x0, y0, face, alpha = roi
    y1, x1 = y0 + alpha.shape[0], x0 + alpha.shape[1]
    alpha = alpha[..., None]
    under = out[y0:y1, x0:x1].astype(np.float32)
    out[y0:y1, x0:x1] = np.clip(np.rint(under + alpha * (face - under)), 0, 255).astype(np.uint8)
    return out


def _to_chroma_grid(a: np.ndarray, sx: int, sy: int) -> np.ndarray:
    """(h, w) luma-grid values -> (h/sy, w/sx) at the chroma samples' sites: horizontally
    co-sited with the even luma columns ("left", the MPEG-2/H.264/HEVC default and 4:2:2's
    definition; PyAV does not expose a stream's chroma location), a [1, 2, 1] / 4 filter;
    vertically halfway between two rows (4:2:0), their mean. Values left of the first
    column count as 0: the caller's rectangle starts where the mask is already 0."""
    if sx == 2:
        left = np.concatenate([np.zeros_like(a[:, :1]), a[:, :-1]], axis=1)  # left[:, x] = a[:, x - 1]
        a = 0.25 * left[:, 0::2] + 0.5 * a[:, 0::2] + 0.25 * a[:, 1::2]
    if sy == 2:
        a = 0.5 * (a[0::2] + a[1::2])
    return a


def paste_back_planes(planes: list[np.ndarray], crop: np.ndarray, M: np.ndarray, blend_mask: np.ndarray,
                      coding: Coding) -> list[np.ndarray]:
    """New [Y (H, W), Cb, Cr (H/sy, W/sx)] planes (uint8 or uint16 samples at
    coding.bits): the crop's R'G'B' code values converted with the source's matrix and
    range (colour.rgb_to_ycbcr) and blended into the planes through the inverse of M.

    Luma blends per pixel with the warped mask. Chroma blends per chroma sample with the
    mask and the premultiplied crop chroma both filtered onto the chroma sites
    (_to_chroma_grid: left-sited 4:2:0 / 4:2:2). Every sample where the mask (filtered, for
    chroma) is exactly 0, and everything outside the mouth's rectangle, is the source's,
    bit for bit."""
    out = [np.array(p, copy=True) for p in planes]
    h, w = out[0].shape
    sx, sy = coding.chroma_step
    roi = _warped_roi(crop, M, blend_mask, h, w, (sx, sy))
    if roi is None:
        return out
    x0, y0, face, alpha = roi
    rh, rw = alpha.shape
    ycc = rgb_to_ycbcr(face, coding)  # (rh, rw, 3) float samples
    top = float(coding.max_code)
    under = out[0][y0:y0 + rh, x0:x0 + rw].astype(np.float32)
    out[0][y0:y0 + rh, x0:x0 + rw] = np.clip(np.rint(under + alpha * (ycc[..., 0] - under)), 0, top)
    # rh, rw are whole blocks except at a right/bottom edge of odd size, which
    # pix_fmt_for_size never leaves subsampled; crop to whole blocks to be safe.
    bh, bw = rh - rh % sy, rw - rw % sx
    if bh == 0 or bw == 0:
        return out
    a_c = _to_chroma_grid(alpha[:bh, :bw], sx, sy)
    cx0, cy0 = x0 // sx, y0 // sy
    for k in (1, 2):
        premultiplied = _to_chroma_grid(alpha[:bh, :bw] * ycc[:bh, :bw, k], sx, sy)
        view = out[k][cy0:cy0 + a_c.shape[0], cx0:cx0 + a_c.shape[1]]
        under = view.astype(np.float32)
        view[...] = np.clip(np.rint(under * (1.0 - a_c) + premultiplied), 0, top)
    return out


def frame_planes(frame: av.VideoFrame) -> list[np.ndarray]:
    """Read-only (height, width) views of a planar frame's planes (uint8, or uint16 for
    more than 8 bits), without the rows' padding."""
    wide = frame.format.components[0].bits > 8
    dtype = np.dtype("<u2") if wide else np.dtype(np.uint8)
    views = []
    for plane in frame.planes:
        row = plane.line_size // dtype.itemsize
        views.append(np.frombuffer(plane, dtype=dtype).reshape(plane.height, row)[:, : plane.width])
    return views


def frame_from_planes(planes: list[np.ndarray], like: av.VideoFrame) -> av.VideoFrame:
    """A new frame of `like`'s size, format and colour tags holding `planes`."""
    frame = av.VideoFrame(like.width, like.height, like.format.name)
    for plane, samples in zip(frame.planes, planes):
        row = plane.line_size // samples.dtype.itemsize
        padded = np.zeros((plane.height, row), samples.dtype)
        padded[:, : samples.shape[1]] = samples
        plane.update(padded)
    frame.color_primaries, frame.color_trc = like.color_primaries, like.color_trc
    frame.colorspace, frame.color_range = like.colorspace, like.color_range
    return frame


def paste_back_native(frame: av.VideoFrame, crop: np.ndarray, M: np.ndarray, blend_mask: np.ndarray,
                      coding: Coding) -> av.VideoFrame:
    """paste_back_planes on a decoded planar Y'CbCr frame: a new frame of the same format
    and tags (the decoder's own frame is never written to: it may be a reference frame)."""
    planes = paste_back_planes(frame_planes(frame), crop, M, blend_mask, coding)
    return frame_from_planes(planes, frame)


def upright_view(frame: np.ndarray, rotation: int) -> np.ndarray:
    """The coded frame (H, W, C) as players show it, np.rot90 by the display rotation
    (VideoInfo.rotation, degrees counter-clockwise): faces are found and cropped in this
    view, where they stand upright. A contiguous copy when rotated (OpenCV and mediapipe
    read C-contiguous images), the frame itself when not."""
    k = (int(rotation) // 90) % 4
    return np.ascontiguousarray(np.rot90(frame, k=k)) if k else frame


def upright_size(width: int, height: int, rotation: int) -> tuple[int, int]:
    """(width, height) of upright_view of a coded width x height frame."""
    return (height, width) if (int(rotation) // 90) % 2 else (width, height)


def coded_affine(M_upright: np.ndarray, rotation: int, coded_width: int, coded_height: int) -> np.ndarray:
    """(2, 3) source->crop affine in the coded frame's pixels from one found in the upright
    view np.rot90(coded, k=rotation // 90) (VideoInfo.rotation, degrees counter-clockwise),
    so faces can be found upright and pasted back in coded orientation, where the output
    keeps the source's coded size and display matrix. NaN (no face) stays NaN.

    np.rot90 moves integer pixel centres onto integer pixel centres, so the crop is sampled
    at exactly the points the upright affine samples it at."""
    k = (int(rotation) // 90) % 4
    w1, h1 = coded_width - 1, coded_height - 1
    # coded (x, y) -> upright (x', y') for np.rot90(coded, k)
    to_upright = {
        0: [[1, 0, 0], [0, 1, 0]],
        1: [[0, 1, 0], [-1, 0, w1]],
        2: [[-1, 0, w1], [0, -1, h1]],
        3: [[0, -1, h1], [1, 0, 0]],
    }[k]
    R = np.asarray(to_upright, np.float64)
    M = np.asarray(M_upright, np.float64)
    return np.concatenate([M[:, :2] @ R[:, :2], (M[:, :2] @ R[:, 2] + M[:, 2])[:, None]], axis=1)
