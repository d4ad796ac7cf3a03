"""The mouth region that the IMC-UNet completes, fixed in the aligned-crop geometry."""
from __future__ import annotations

import cv2
import numpy as np


class MouthMask:
    """A rectangle with rounded bottom corners over the lower face of the aligned crop.

    Fixed in crop coordinates, like LatentSync's mask image (MuseTalk blanks the whole
    lower half, nose included): because `crop_transform` normalises position, scale and
    roll, one region fits every frame, and the network always sees the same hole.

    Geometry chosen by measurement: the tracker's mesh on skimage's astronaut pasted into
    1280x720 frames at scales 0.75-2.5x, roll -15/0/+15 deg, and three affine distortions
    standing in for yaw (x squeezed to 0.85), pitch (y squeezed to 0.88) and shear 0.12
    (48 poses), mapped into the 256 crop (face/align.py's crop, measured on the eyes, brows,
    upper cheeks and nose base; the poses are tests/test_face.py's POSES):

    ======================================  ===============
    landmark group (mesh indices)           range (crop px)
    ======================================  ===============
    eye centres, y                          122.5 - 128.6
    nose tip (1), y                         158.0 - 158.8
    nostril base / alae (2, 48, 98, 278,    <= 161.9
    327), y
    lips (FACEMESH_LIPS, 40 points), x      101.1 - 157.0
    lips, y                                 167.8 - 190.0
    chin (152), y                           208.8 - 215.7
    lower jaw contour, x                    81.3 - 177.2
    ======================================  ===============

    So the default box runs from just under the nostrils (top 0.635*256 = 162.6, below the
    lowest nose point and 5 px above the highest lip point, leaving the nose tip and eyes
    untouched) to 0.93*256 = 238 (22 px below the chin, room for the jaw to drop when the
    mouth opens wide: the synthetic speaker's wide-open chin reaches 226), and from
    0.27*256 = 69 to 0.73*256 = 187 across the cheeks (past the lip corners by >= 30 px and
    close to the jaw line, which moves when speaking). Because the crop does not follow the
    mouth, the open upper lip stays inside the box (167 at the synthetic speaker's widest;
    LivePortrait's own box, which zooms out as the jaw drops, put it at 160, in view).
    The bottom corners are rounded (radius 0.1*256) to follow the jaw rather than
    paste over neck and background.

    What the network sees is less than what is pasted: its hole (`array`, `apply`) runs on
    from the box straight down to the crop's bottom edge, because the chin and the neck's
    shadow below the box move with the jaw (on the synthetic speaker the rows under the box
    differ by 8-9 levels on average between open and closed frames, against under one
    elsewhere outside it). Left in view they tell a network trained on a frame's own crop
    how far the mouth is open, and a dub would copy the source's mouth. `feathered`, the
    paste-back alpha, covers the box only: a pasted region reaching the crop's edge would
    end there in a hard seam.
    """

    def __init__(self, dsize: int = 256, top: float = 0.635, bottom: float = 0.93,
                 left: float = 0.27, right: float = 0.73, bottom_corner_radius: float = 0.10,
                 hide_below: bool = True):
        if not (0 <= left < right <= 1 and 0 <= top < bottom <= 1):
            raise ValueError(f"face/mouth_mask.py: box must satisfy 0<=left<right<=1, "
                             f"0<=top<bottom<=1, got {left=} {right=} {top=} {bottom=}")
        self.dsize = dsize
        l, r, t, b = (v * dsize for v in (left, right, top, bottom))
        radius = min(bottom_corner_radius * dsize, (r - l) / 2, b - t)
        # Pixel centres sit at integer coordinates, the convention of cv2.warpAffine and of
        # the landmarks mapped by the crop affine.
        y, x = np.mgrid[0:dsize, 0:dsize].astype(np.float64)
        inside = (x >= l) & (x <= r) & (y >= t) & (y <= b)
        corner_y = b - radius
        for corner_x, outward in ((l + radius, -1), (r - radius, 1)):
            in_corner_zone = (y > corner_y) & ((x - corner_x) * outward > 0)
            outside_arc = np.hypot(x - corner_x, y - corner_y) > radius
            inside &= ~(in_corner_zone & outside_arc)
        self._pasted = inside.astype(np.float32)
        if hide_below:
            inside = inside | ((x >= l) & (x <= r) & (y >= t))
        self._mask = inside.astype(np.float32)

    def array(self) -> np.ndarray:
        """(dsize, dsize) float32: 1 = hidden from the network and completed by it, 0 = kept."""
        return self._mask.copy()

    def pasted(self) -> np.ndarray:
        """(dsize, dsize) float32: 1 = the mouth box that replaces the source on paste-back."""
        return self._pasted.copy()

    def feathered(self, blur_px: float) -> np.ndarray:
        """(dsize, dsize) float32 paste-back alpha: 1 on the whole mouth box, then a
        raised-cosine fall to 0 over `blur_px` pixels outside it.

        The ramp lies outside the box, so every pixel of the box replaces the original
        completely; above and beside the mouth the seam is spread over pixels that the network
        only reconstructed (where generated and original agree most), below it over the chin
        the network painted unseen.
        """
        if blur_px <= 0:
            return self.pasted()
        outside = (self._pasted == 0).astype(np.uint8)
        dist = cv2.distanceTransform(outside, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        ramp = 0.5 * (1 + np.cos(np.pi * np.clip(dist / blur_px, 0, 1)))
        return ramp.astype(np.float32)

    def apply(self, crops: np.ndarray) -> np.ndarray:
        """Crops (..., dsize, dsize, C) with the masked pixels set to 0: I_s * (1 - M)."""
        crops = np.asarray(crops)
        if crops.shape[-3:-1] != (self.dsize, self.dsize):
            raise ValueError(f"face/mouth_mask.py: crops must be "
                             f"(..., {self.dsize}, {self.dsize}, C), got {crops.shape}")
        keep = (self._mask == 0)[..., None]
        return np.where(keep, crops, np.zeros((), dtype=crops.dtype))
