"""The source's colour coding: which Y'CbCr pixel formats, matrices and ranges the
compose stage can paste into and write back unchanged, and the R'G'B' -> Y'CbCr code-value
conversion it pastes with.

Face work (tracking, crops, the model) sees 8-bit R'G'B' code values decoded with the
source's own matrix and range (decode.frame_to_rgb); the generated mouth is converted back
with the same matrix and range at the source's bit depth (rgb_to_ycbcr), so the round trip
is consistent and the transfer function and primaries are never touched: a PQ or HLG
source stays PQ or HLG coded, and everything outside the mouth is the source's decoded
Y'CbCr samples.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# AVColorSpace values (libavutil/pixfmt.h) and their luma weights (Kr, Kb).
_MATRIX_WEIGHTS = {
    1: (0.2126, 0.0722),  # BT.709
    4: (0.30, 0.11),  # FCC
    5: (0.299, 0.114),  # BT.470BG (BT.601 625)
    6: (0.299, 0.114),  # SMPTE 170M (BT.601 525)
    7: (0.212, 0.087),  # SMPTE 240M
    9: (0.2627, 0.0593),  # BT.2020 non-constant luminance
}
# The same matrices as swscale names them (its SWS_CS_* values), for frame.reformat.
SWS_MATRIX = {1: 1, 4: 4, 5: 5, 6: 5, 7: 7, 9: 9}
UNSPECIFIED_MATRIX = 2
MATRIX_NAMES = {0: "rgb", 1: "bt709", 2: "unspecified", 4: "fcc", 5: "bt470bg", 6: "smpte170m", 7: "smpte240m",
                8: "ycgco", 9: "bt2020nc", 10: "bt2020c", 11: "smpte2085", 12: "chroma-derived-nc",
                13: "chroma-derived-c", 14: "ictcp"}
PRIMARIES_NAMES = {1: "bt709", 2: "unspecified", 4: "bt470m", 5: "bt470bg", 6: "smpte170m", 7: "smpte240m",
                   8: "film", 9: "bt2020", 10: "smpte428", 11: "smpte431", 12: "smpte432", 22: "ebu3213"}
TRC_NAMES = {1: "bt709", 2: "unspecified", 4: "gamma22", 5: "gamma28", 6: "smpte170m", 7: "smpte240m", 8: "linear",
             9: "log100", 10: "log316", 11: "iec61966-2-4", 12: "bt1361e", 13: "iec61966-2-1", 14: "bt2020-10",
             15: "bt2020-12", 16: "smpte2084", 17: "smpte428", 18: "arib-std-b67"}
RANGE_MPEG, RANGE_JPEG = 1, 2  # AVColorRange: limited ("tv") and full ("pc")

# Planar Y'CbCr formats whose samples compose can paste into and write back as they are:
# name -> (bits, horizontal chroma step, vertical chroma step). 12-bit, alpha, packed,
# semi-planar and RGB formats are refused (deliverable_format) rather than converted.
PLANAR_YUV = {
    "yuv420p": (8, 2, 2), "yuvj420p": (8, 2, 2), "yuv422p": (8, 2, 1), "yuvj422p": (8, 2, 1),
    "yuv444p": (8, 1, 1), "yuvj444p": (8, 1, 1),
    "yuv420p10le": (10, 2, 2), "yuv422p10le": (10, 2, 1), "yuv444p10le": (10, 1, 1),
}
# The 4:4:4 format of the same depth (odd sizes cannot be coded subsampled) and the
# non-"j" name of a full-range format (encoders that lack yuvj* take yuv* tagged full range).
FULL_CHROMA = {"yuv420p": "yuv444p", "yuvj420p": "yuvj444p", "yuv422p": "yuv444p", "yuvj422p": "yuvj444p",
               "yuv420p10le": "yuv444p10le", "yuv422p10le": "yuv444p10le"}
NON_J = {"yuvj420p": "yuv420p", "yuvj422p": "yuv422p", "yuvj444p": "yuv444p"}


def guessed_matrix(height: int) -> int:
    """The matrix a player assumes for an untagged stream: BT.709 from 720 lines up,
    BT.601 below."""
    return 1 if height >= 720 else 6


@dataclass(frozen=True)
class Coding:
    """How R'G'B' code values map to one frame's Y'CbCr samples."""

    bits: int  # 8 or 10
    kr: float
    kb: float
    full_range: bool
    chroma_step: tuple[int, int]  # (x, y): 2, 2 for 4:2:0; 2, 1 for 4:2:2; 1, 1 for 4:4:4

    @classmethod
    def of(cls, pix_fmt: str, colorspace: int, color_range: int, height: int) -> Coding:
        """The coding of a frame of `pix_fmt` tagged `colorspace`/`color_range`; an
        untagged matrix is guessed as a player would, an untagged range is limited unless
        the format is a full-range "j" one. ValueError for what compose cannot paste into."""
        if pix_fmt not in PLANAR_YUV:
            raise ValueError(f"pixel format {pix_fmt} is not one compose can keep ({', '.join(PLANAR_YUV)})")
        bits, sx, sy = PLANAR_YUV[pix_fmt]
        matrix = guessed_matrix(height) if colorspace == UNSPECIFIED_MATRIX else colorspace
        if matrix not in _MATRIX_WEIGHTS:
            raise ValueError(f"colour matrix {MATRIX_NAMES.get(colorspace, colorspace)} is not one compose can keep")
        kr, kb = _MATRIX_WEIGHTS[matrix]
        full = color_range == RANGE_JPEG or pix_fmt.startswith("yuvj")
        return cls(bits=bits, kr=kr, kb=kb, full_range=full, chroma_step=(sx, sy))

    @property
    def max_code(self) -> int:
        return (1 << self.bits) - 1

    @property
    def dtype(self):
        return np.uint8 if self.bits == 8 else np.dtype("<u2")


def rgb_to_ycbcr(rgb: np.ndarray, coding: Coding) -> np.ndarray:
    """(..., 3) R'G'B' code values 0..255 (float) -> (..., 3) float Y', Cb, Cr samples at
    the coding's bit depth and range (not rounded: the caller blends first)."""
    e = rgb.astype(np.float32) / 255.0
    r, g, b = e[..., 0], e[..., 1], e[..., 2]
    kr, kb = coding.kr, coding.kb
    y = kr * r + (1.0 - kr - kb) * g + kb * b
    cb = (b - y) / (2.0 * (1.0 - kb))
    cr = (r - y) / (2.0 * (1.0 - kr))
    if coding.full_range:
        scale = float(coding.max_code)
        offset = float(1 << (coding.bits - 1))
        return np.stack([y * scale, cb * scale + offset, cr * scale + offset], axis=-1)
    unit = float(1 << (coding.bits - 8))  # limited range is defined at 8 bits and scaled up
    return np.stack([(16.0 + 219.0 * y) * unit, (128.0 + 224.0 * cb) * unit, (128.0 + 224.0 * cr) * unit], axis=-1)
