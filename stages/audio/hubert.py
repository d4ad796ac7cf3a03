"""HuBERT features at their native 50 Hz (two rows per 40 ms video frame at 25 fps), and
the 25 Hz pair means, for any length of audio.

The checkpoint is `facebook/hubert-large-ls960-ft` (as in GeneFace, ER-NeRF, SyncTalk,
Real3DPortrait): transformers' `HubertModel`, feature = `last_hidden_state`, 1024-d.

Waveform -> features:
1. Normalise the WHOLE utterance as Wav2Vec2FeatureExtractor(do_normalize=True) does,
   (x - mean) / sqrt(var + 1e-7), before chunking, so chunks are not renormalised.
2. Pad zeros at the end to n = ceil(N / 640) blocks of 640 samples (40 ms), then 40
   samples each side. HuBERT's conv stack (receptive field 400, hop 320) gives
   floor((640n + 80 - 400) / 320) + 1 = 2n frames at 50 Hz; HuBERT frame k covers samples
   [320k - 40, 320k + 360), centred at 20 ms * k + 10 ms.
3. `hubert_features_50hz` keeps the 2n HuBERT frames: 25 Hz frame j owns exactly rows
   2j and 2j+1. `hubert_features_25hz` averages those pairs: 25 Hz frame j is centred at
   (j + 0.5) / 25 s and stands for [j/25, (j+1)/25). N seconds of audio give exactly
   25 N frames (50 N rows). The cache stores the 50 Hz rows; `steps_per_frame` maps them
   to a Stage 1 config's k audio steps per frame (k=2: the rows, k=1: the pair means).

Long audio is cut into windows of `chunk_seconds`, each run with `context_seconds` of
audio on either side (window edges on the 640-sample grid) and only the centre frames
kept, so memory is bounded by the window, not the file. The conv feature encoder sees
exactly the same samples as in one pass (its frames never straddle a window edge), so
only the transformer differs: its positional conv (kernel 128 frames = 2.56 s) and its
attention see less context.

Measured chunked-vs-whole differences (one-off run, CPU float32, seed 0): randomly initialised
HuBERT with the real conv stack (7 x 512, layer norm) and 4 transformer layers of width
256 (4 heads, intermediate 1024, positional conv 128 taps / 16 groups), on 65 s of
espeak-ng speech (1630 frames, features rms 0.90, max |x| 3.5). Relative L2 is
||chunked - whole|| / ||whole|| over all frames; worst frame is the largest per-frame
relative L2.

    chunk  context   max |diff|   relative L2   worst frame
    20 s   0 s       0.80         0.046         0.21
    20 s   1 s       0.35         0.014         0.097
    20 s   2 s       0.046        0.0093        0.018
    20 s   4 s       0.038        0.0075        0.016
    20 s   8 s       0.037        0.0066        0.013
    10 s   2 s       0.046        0.0116        0.018
    10 s   4 s       0.038        0.0097        0.016

The step between 1 s and 2 s is the positional conv: 128 taps at 50 Hz reach 1.28 s to
each side, so with less context the kept frames at a window edge see a truncated
positional embedding. Beyond that only attention differs, and the gain per extra second
is small. A random model attends across the whole sequence; a trained HuBERT attends
mostly locally, so these figures are an upper guide, not a guarantee.
Defaults: chunk 20 s, context 2 s (1.2x the compute of one pass; covers the positional
conv; a 24 s window keeps attention at utterance-like lengths).
"""
from __future__ import annotations

import hashlib
import math
import os
from typing import Union

import numpy as np
import torch
import transformers

from .load import SAMPLE_RATE, AudioError

FEATURE_RATE = 25  # Hz: one feature frame per video frame at 25 fps
HUBERT_RATE = 50  # Hz: HuBERT's native frame rate, two rows per 25 Hz frame
ROWS_PER_FRAME = HUBERT_RATE // FEATURE_RATE  # 2
SAMPLES_PER_FEATURE = SAMPLE_RATE // FEATURE_RATE  # 640
_EDGE_PAD = 40  # samples each side, so 640 n samples give exactly 2 n HuBERT frames
NORM_EPS = 1e-7  # Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm

DEFAULT_HUBERT = "facebook/hubert-large-ls960-ft"
# Ends every HubertFeatures.model_id: the stage returns 50 Hz rows. Entries cached before
# (25 Hz features, ids without the suffix) are never looked up under the new ids.
MODEL_ID_SUFFIX = "-50hz"
DEFAULT_CHUNK_SECONDS = 20.0
DEFAULT_CONTEXT_SECONDS = 2.0

# HuBERT's feature encoder: receptive field 400 samples, hop 320 (20 ms).
_CONV_KERNEL = (10, 3, 3, 3, 3, 2, 2)
_CONV_STRIDE = (5, 2, 2, 2, 2, 2, 2)


def hubert_large_config() -> transformers.HubertConfig:
    """The architecture of facebook/hubert-large-ls960-ft, written out."""
    return transformers.HubertConfig(
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        intermediate_size=4096,
        hidden_act="gelu",
        conv_dim=(512,) * 7,
        conv_kernel=_CONV_KERNEL,
        conv_stride=_CONV_STRIDE,
        conv_bias=True,
        feat_extract_norm="layer",
        feat_extract_activation="gelu",
        do_stable_layer_norm=True,
        feat_proj_layer_norm=True,
        num_conv_pos_embeddings=128,
        num_conv_pos_embedding_groups=16,
        layer_norm_eps=1e-5,
        vocab_size=32,
    )


def tiny_hubert_config(hidden_size: int = 32) -> transformers.HubertConfig:
    """A test-sized HuBERT that keeps the real conv kernels/strides (320-sample hop) and
    the real layout (layer-norm feature encoder, stable layer norm, 128-tap positional conv),
    so frame counts and chunking behave as in production. The conv stack is 64 wide: as a
    random stand-in for the real model its features carry more of the speech (on the
    synthetic corpus a linear read-out of ±2 frames predicts held-out jaw opening at r 0.67,
    against 0.55 with 16 channels and 0.48 with a 128-wide transformer; README)."""
    return transformers.HubertConfig(
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        conv_dim=(64,) * 7,
        conv_kernel=_CONV_KERNEL,
        conv_stride=_CONV_STRIDE,
        conv_bias=True,
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
        feat_proj_layer_norm=True,
        num_conv_pos_embeddings=128,
        num_conv_pos_embedding_groups=4,
        layer_norm_eps=1e-5,
        vocab_size=32,
    )


def normalize_waveform(waveform: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance over the whole utterance, as Wav2Vec2FeatureExtractor."""
    x = np.asarray(waveform, dtype=np.float64)
    return ((x - x.mean()) / np.sqrt(x.var() + NORM_EPS)).astype(np.float32)


def num_feature_frames(num_samples: int) -> int:
    """25 Hz frames for `num_samples` at 16 kHz: ceil(N / 640), a partial 40 ms counts."""
    return -(-num_samples // SAMPLES_PER_FEATURE)


@torch.inference_mode()
def _features_of_window(model: transformers.HubertModel, padded: torch.Tensor, first: int, stop: int) -> torch.Tensor:
    """50 Hz rows of 25 Hz frames [first, stop), (2 (stop - first), H) float32, computed
    from the padded signal alone, no outside context."""
    # 25 Hz frame j needs original samples [640 j - 40, 640 j + 680), i.e. padded
    # samples [640 j, 640 j + 720): the window is exactly the conv receptive field.
    window = padded[first * SAMPLES_PER_FEATURE : stop * SAMPLES_PER_FEATURE + 2 * _EDGE_PAD]
    hidden = model(window[None]).last_hidden_state[0]  # (2 (stop - first), H) at 50 Hz
    if hidden.shape[0] != ROWS_PER_FRAME * (stop - first):
        raise AudioError(
            f"HuBERT gave {hidden.shape[0]} frames for {stop - first} 40 ms blocks, expected "
            f"{ROWS_PER_FRAME * (stop - first)}: the model's conv stack is not the 320-sample-hop HuBERT one"
        )
    return hidden.float()


def pair_mean(features_50hz: np.ndarray) -> np.ndarray:
    """(2 F, D) 50 Hz rows -> (F, D) means of the pairs (2j, 2j+1), float32."""
    rows = np.asarray(features_50hz)
    if rows.ndim != 2 or len(rows) % ROWS_PER_FRAME:
        raise ValueError(f"expected (2 F, D) 50 Hz rows, an even number of rows, got shape {rows.shape}")
    pairs = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32)).reshape(-1, ROWS_PER_FRAME, rows.shape[1])
    return pairs.mean(dim=1).numpy()


def steps_per_frame(features_50hz: np.ndarray, k: int) -> np.ndarray:
    """Cached 50 Hz rows (2 F, D) -> k audio steps per 25 fps frame (k F, D) for Stage 1.

    The single place that maps the cache's 50 Hz rows to a Stage 1 config's
    `audio_steps_per_frame`: k=2 returns the rows unchanged (HuBERT's native rate), k=1 the
    pair means (the 25 Hz features). Any other k raises ValueError.
    """
    rows = np.asarray(features_50hz)
    if rows.ndim != 2 or len(rows) % ROWS_PER_FRAME:
        raise ValueError(f"expected (2 F, D) 50 Hz rows, an even number of rows, got shape {rows.shape}")
    if k == 2:
        return rows
    if k == 1:
        return pair_mean(rows)
    raise ValueError(f"audio steps per frame k={k} is not supported: HuBERT's 50 Hz rows give k=1 or k=2 at 25 fps")


def hubert_features_50hz(
    model: transformers.HubertModel,
    waveform: np.ndarray,
    chunk_seconds: float = DEFAULT_CHUNK_SECONDS,
    context_seconds: float = DEFAULT_CONTEXT_SECONDS,
) -> np.ndarray:
    """(2 ceil(N / 640), hidden) float32 HuBERT rows at 50 Hz of a 16 kHz mono waveform of
    N samples; 25 Hz frame j owns rows 2j and 2j+1.

    Chunks and their context are whole 40 ms blocks, so chunk edges stay on the 640-sample
    grid and a pair is never split. `chunk_seconds=math.inf` runs the whole utterance in
    one pass.
    """
    x = np.asarray(waveform)
    if x.ndim != 1:
        raise ValueError(f"expected a 1-D mono waveform, got shape {x.shape}")
    n = num_feature_frames(len(x))
    hidden_size = model.config.hidden_size
    if n == 0:
        return np.zeros((0, hidden_size), np.float32)

    x = normalize_waveform(x)
    # Normalised silence is 0, so the end pad and edge pads add silence, not DC.
    padded = np.zeros(n * SAMPLES_PER_FEATURE + 2 * _EDGE_PAD, np.float32)
    padded[_EDGE_PAD : _EDGE_PAD + len(x)] = x
    param = next(model.parameters())
    padded_t = torch.from_numpy(padded).to(device=param.device, dtype=param.dtype)

    chunk = n if math.isinf(chunk_seconds) else max(1, round(chunk_seconds * FEATURE_RATE))
    context = max(0, round(context_seconds * FEATURE_RATE))
    r = ROWS_PER_FRAME
    out = np.empty((r * n, hidden_size), np.float32)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        first, last = max(0, start - context), min(n, stop + context)
        rows = _features_of_window(model, padded_t, first, last)  # (2 (last - first), H)
        out[r * start : r * stop] = rows[r * (start - first) : r * (stop - first)].cpu().numpy()
    return out


def hubert_features_25hz(
    model: transformers.HubertModel,
    waveform: np.ndarray,
    chunk_seconds: float = DEFAULT_CHUNK_SECONDS,
    context_seconds: float = DEFAULT_CONTEXT_SECONDS,
) -> np.ndarray:
    """(ceil(N / 640), hidden) float32 features of a 16 kHz mono waveform of N samples: the
    pair means of `hubert_features_50hz` (same chunking).

    `chunk_seconds=math.inf` runs the whole utterance in one pass.
    """
    return pair_mean(hubert_features_50hz(model, waveform, chunk_seconds, context_seconds))


def sample_features(features_25hz: np.ndarray, times_s: np.ndarray) -> np.ndarray:
    """Feature rows at arbitrary timestamps (e.g. video frame times at 23.976/29.97/50 fps).

    Nearest centre: row j is centred at (j + 0.5) / 25 s, so the row for time t is the
    40 ms window that contains it, j = floor(25 t), clamped to the first/last row. Pass a
    video frame's presentation time (its start): at 25 fps frame i gets row i. A tolerance
    of 1e-6 of a frame absorbs float error in timestamps such as i / 25.
    """
    features = np.asarray(features_25hz)
    if features.ndim != 2 or len(features) == 0:
        raise ValueError(f"expected non-empty (T, D) features, got shape {features.shape}")
    times = np.asarray(times_s, dtype=np.float64)
    rows = np.floor(times * FEATURE_RATE + 1e-6).astype(np.int64)
    return features[np.clip(rows, 0, len(features) - 1)]


def _sha256_files(paths: list[str]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(os.path.basename(path).encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def _sha256_state_dict(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _weight_files(folder: str) -> list[str]:
    return sorted(
        os.path.join(folder, f)
        for f in os.listdir(folder)
        if f.endswith((".safetensors", ".bin")) or f.endswith(".index.json")
    )


class HubertFeatures:
    """Stage: loads HuBERT once; `rows = stage(waveform_16k)` -> (2 T25, hidden) float32 rows
    at 50 Hz (`steps_per_frame(rows, k)` gives Stage 1's input, `pair_mean` the 25 Hz features).

    `model_id` ends in "-50hz": it names what the stage returns, so cache entries written
    when the stage returned 25 Hz features are never read as 50 Hz rows.

    `model` is a local folder in transformers format (save_pretrained output, or the
    downloaded checkpoint), an already built HubertModel, or a hub id, which is fetched
    only with allow_download=True.
    """

    def __init__(
        self,
        model: Union[str, os.PathLike, transformers.HubertModel],
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        chunk_seconds: float = DEFAULT_CHUNK_SECONDS,
        context_seconds: float = DEFAULT_CONTEXT_SECONDS,
        allow_download: bool = False,
    ):
        if isinstance(model, transformers.HubertModel):
            name = model.config._name_or_path or "in-memory"
            self.model_id = self._memory_id(os.path.basename(os.path.normpath(name)), model)
        elif isinstance(model, (str, os.PathLike)):
            source = os.fspath(model)
            if os.path.isdir(source):
                model, self.model_id = self._load_folder(source, allow_download)
            elif allow_download:
                model = self._load(source, local_files_only=False)
                self.model_id = self._memory_id(source.replace("/", "--"), model)
            else:
                raise AudioError(
                    f"HuBERT weights {source!r}: no such local folder, and downloading is off. "
                    f"Pass a folder holding the checkpoint in transformers format (config.json + "
                    f"model.safetensors), or allow_download=True to fetch a hub id."
                )
        else:
            raise TypeError(f"model must be a folder, a hub id or a HubertModel, got {type(model).__name__}")
        self.model = model.to(device=device, dtype=dtype).eval()
        self.hidden_size = self.model.config.hidden_size
        self.device = torch.device(device)
        self.dtype = dtype
        self.chunk_seconds = chunk_seconds
        self.context_seconds = context_seconds

    @staticmethod
    def _load(source: str, local_files_only: bool) -> transformers.HubertModel:
        try:
            return transformers.HubertModel.from_pretrained(source, local_files_only=local_files_only)
        except (OSError, ValueError) as e:
            raise AudioError(f"HuBERT weights {source}: cannot load ({e})") from e

    @classmethod
    def _load_folder(cls, folder: str, allow_download: bool) -> tuple[transformers.HubertModel, str]:
        config_path = os.path.join(folder, "config.json")
        weights = _weight_files(folder)
        if not os.path.isfile(config_path) or not weights:
            raise AudioError(f"HuBERT weights {folder}: needs config.json and model weights (*.safetensors or *.bin)")
        model = cls._load(folder, local_files_only=not allow_download)
        name = os.path.basename(os.path.normpath(os.path.abspath(folder)))
        model_id = f"{name}-cfg{_sha256_files([config_path])[:8]}-w{_sha256_files(weights)[:12]}{MODEL_ID_SUFFIX}"
        return model, model_id

    @staticmethod
    def _memory_id(name: str, model: transformers.HubertModel) -> str:
        config_hash = hashlib.sha256(model.config.to_json_string().encode()).hexdigest()
        return f"{name}-cfg{config_hash[:8]}-w{_sha256_state_dict(model)[:12]}{MODEL_ID_SUFFIX}"

    feature_rate = HUBERT_RATE  # rows per second that __call__ returns

    def __call__(self, waveform: np.ndarray) -> np.ndarray:
        return hubert_features_50hz(self.model, waveform, self.chunk_seconds, self.context_seconds)
