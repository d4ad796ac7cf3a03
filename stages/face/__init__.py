"""Face stage: mediapipe detection + tracking + smoothing, LivePortrait-style aligned 256²
crops with their affines (from a list of frames, or streamed from two decodes of a clip),
the mouth mask in crop geometry, and feathered paste-back."""
from .align import crop_faces, crop_transform, crop_transforms, eye_lip_anchors, transform_points, warp_crop
from .mouth_mask import MouthMask
from .paste import coded_affine, paste_back, upright_size, upright_view
from .stream import track_and_crop
from .tracker import FaceTrack, FaceTracker, fill_gaps, smooth_landmarks

__all__ = [
    "FaceTrack", "FaceTracker", "fill_gaps", "smooth_landmarks",
    "crop_transform", "crop_transforms", "eye_lip_anchors", "transform_points", "warp_crop", "crop_faces",
    "MouthMask", "coded_affine", "paste_back", "track_and_crop", "upright_size", "upright_view",
]
