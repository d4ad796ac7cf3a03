"""benchmarks/lipsync_leak.py's pieces (the benchmark itself needs a trained bundle and a
prepared held-out corpus)."""
import os
import sys

import numpy as np
import pytest
import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

from lipsync_leak import complete, sentence_pairs, silence_figures  # noqa: E402
from pipeline.lipsync_eval import silent_frames  # noqa: E402
from stages.completion.imc_unet import IMCUNet, IMCUNetConfig  # noqa: E402
from stages.completion.vae import LatentVAE, tiny_vae_config  # noqa: E402
from stages.face import MouthMask  # noqa: E402


def test_sentence_pairs_take_each_speakers_first_two_sentences(tmp_path):
    rows = [("spk1", "/c/videos/spk1_h01.mp4", "b1"), ("spk1", "/c/videos/spk1_h00.mp4", "a1"),
            ("spk1", "/c/videos/spk1_h02.mp4", "c1"), ("spk0", "/c/videos/spk0_h00.mp4", "a0"),
            ("spk2", "/c/videos/spk2_h00.mp4", "a2")]
    pq.write_table(pa.table({"speaker_id": [r[0] for r in rows], "video_uri": [r[1] for r in rows],
                             "video_id": [r[2] for r in rows]}), tmp_path / "videos.parquet")
    # by file name, not row order; speakers with one sentence are left out
    assert sentence_pairs(str(tmp_path)) == [("spk1", "a1", "b1")]


def test_completion_changes_only_the_hole():
    torch.manual_seed(0)
    vae, unet = LatentVAE.from_config(tiny_vae_config()).eval(), IMCUNet(IMCUNetConfig.tiny()).eval()
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (3, 256, 256, 3), dtype=np.uint8)
    hole = torch.from_numpy(MouthMask().array())[None, None]
    for conditions in (None, rng.normal(scale=0.05, size=(3, 21, 3)).astype(np.float32)):
        out = complete(vae, unet, hole, crops, crops[0], conditions, batch=2)
        kept = MouthMask().array() == 0
        assert out.shape == crops.shape and out.dtype == np.uint8
        np.testing.assert_array_equal(out[:, kept], crops[:, kept])
        assert np.abs(out[:, ~kept].astype(int) - crops[:, ~kept]).mean() > 10  # the hole is repainted


def test_silence_figures_put_the_silent_opening_against_closed_and_the_speech_gap():
    truth = {"is_silent": [True, True, False, False, False, True]}
    silent = silent_frames(truth, 8)  # past the truth's end the dubbed audio has run out
    assert silent.tolist() == [True, True, False, False, False, True, True, True]
    assert silent_frames(truth, 4).tolist() == [True, True, False, False]
    speech = np.where(silent, 0.0, 0.022)
    relative, share = silence_figures(speech + np.where(silent, 0.004, 0.0), silent, closed=0.002)
    assert relative == pytest.approx(1.0) and share == pytest.approx(0.1)  # (0.004 - 0.002) / (0.022 - 0.002)
    relative, share = silence_figures(speech + np.where(silent, 0.002, 0.0), silent, closed=0.002)
    assert relative == pytest.approx(0.0, abs=1e-12) and share == pytest.approx(0.0, abs=1e-12)
    opening = speech + np.where(silent, 0.004, 0.0)
    opening[0] = np.nan  # no face in that frame: left out of the mean
    assert silence_figures(opening, silent, closed=0.002)[0] == pytest.approx(1.0)
