"""The weights bundle: init, load, round trip, and errors that name the file and tensor."""
import json
import os

import numpy as np
import pytest
import torch

from safetensors.torch import load_file, save_file

from pipeline.weights import BundleError, init_bundle, load_bundle, read_bundle_info
from stages.audio.hubert import steps_per_frame


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("bundle") / "tiny")
    init_bundle(path, size="tiny", seed=3)
    return path


def test_tiny_bundle_layout_and_metadata(tiny_bundle):
    meta = json.load(open(os.path.join(tiny_bundle, "bundle.json")))
    assert meta["trained"] is False and meta["size"] == "tiny" and meta["format"] == "imgtalk-weights"
    for rel in ("hubert/config.json", "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
                "liveportrait/motion_extractor.pth", "stage1/model.safetensors", "stage2/model.safetensors"):
        assert os.path.exists(os.path.join(tiny_bundle, rel)), rel
    # the motion extractor file is LivePortrait's layout: a flat dict of detector.* tensors
    sd = torch.load(os.path.join(tiny_bundle, "liveportrait/motion_extractor.pth"), weights_only=True)
    assert all(k.startswith("detector.") for k in sd)


def test_bundle_loads_full_model_set_that_runs_and_round_trips(tiny_bundle, tmp_path):
    a = load_bundle(tiny_bundle)
    b = load_bundle("file://" + tiny_bundle)
    x = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        za = a.vae.encode(x)
        assert za.shape == (1, 4, 32, 32)
        motion = torch.randn(1, 21, 3) * 0.05
        out_a = a.stage2(za, motion, za)
        out_b = b.stage2(b.vae.encode(x), motion, za)
        assert torch.equal(out_a, out_b)
        ra, rb = a.motion_extractor(x), b.motion_extractor(x)
        assert all(torch.equal(ra[k], rb[k]) for k in ra)
    wave = np.random.randn(16000).astype(np.float32)
    fa = a.hubert(wave)  # 50 Hz rows: two per 25 fps frame
    assert fa.shape[0] == 50 and np.array_equal(fa, b.hubert(wave))
    audio = torch.from_numpy(steps_per_frame(fa, a.stage1.cfg.audio_steps_per_frame))[None]
    off = a.stage1.generate(audio, torch.zeros(1, 21, 3), torch.zeros(1, 21, 3))
    assert off.shape == (1, 25, len(a.stage1.cfg.driven_keypoints), 3)


def test_two_seeds_give_different_weights(tmp_path):
    p1, p2 = str(tmp_path / "s1"), str(tmp_path / "s2")
    init_bundle(p1, size="tiny", seed=1)
    init_bundle(p2, size="tiny", seed=2)
    w1 = load_file(os.path.join(p1, "stage2", "model.safetensors"))
    w2 = load_file(os.path.join(p2, "stage2", "model.safetensors"))
    assert any(not torch.equal(w1[k], w2[k]) for k in w1)


def test_mismatched_tensor_names_file_and_tensor(tiny_bundle, tmp_path):
    import shutil

    broken = str(tmp_path / "broken")
    shutil.copytree(tiny_bundle, broken)
    path = os.path.join(broken, "stage2", "model.safetensors")
    sd = load_file(path)
    key = sorted(sd)[0]
    sd[key] = torch.zeros(3, 3)
    save_file(sd, path)
    with pytest.raises(BundleError) as e:
        load_bundle(broken)
    assert path in str(e.value) and key in str(e.value)


def test_corrupt_file_names_the_file(tiny_bundle, tmp_path):
    import shutil

    broken = str(tmp_path / "corrupt")
    shutil.copytree(tiny_bundle, broken)
    path = os.path.join(broken, "liveportrait", "motion_extractor.pth")
    with open(path, "r+b") as f:
        f.truncate(100)
    with pytest.raises(BundleError) as e:
        load_bundle(broken)
    assert "motion_extractor.pth" in str(e.value)


def test_missing_component_and_bad_metadata(tiny_bundle, tmp_path):
    import shutil

    broken = str(tmp_path / "nostage1")
    shutil.copytree(tiny_bundle, broken)
    shutil.rmtree(os.path.join(broken, "stage1"))
    with pytest.raises(BundleError, match="stage1"):
        read_bundle_info(broken)
    with pytest.raises(BundleError, match="bundle.json"):
        read_bundle_info(str(tmp_path))
    with pytest.raises(BundleError, match="not found"):
        load_bundle(str(tmp_path / "nowhere"))


def test_dub_refuses_an_audio_conditioned_stage2_that_cannot_take_the_bundles_hubert(tmp_path, tiny_bundle):
    import shutil

    from pipeline.dub.job import _check_stage2_condition, run_dub
    from stages.completion.imc_unet import IMCUNet, IMCUNetConfig

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    shutil.rmtree(bundle / "stage2")
    IMCUNet(IMCUNetConfig.tiny(condition="audio", audio_dim=48)).save_pretrained(str(bundle / "stage2"))
    with pytest.raises(BundleError, match="audio_dim=48") as e:
        run_dub(str(tmp_path / "missing-manifest.parquet"), str(bundle), str(tmp_path / "report.parquet"))
    assert "stage2" in str(e.value) and "32-d" in str(e.value)
    assert not (tmp_path / "report.parquet").exists()
    # the tiny HuBERT's width: the ablation variant dubs (its condition: stages/completion/stage.audio_conditions)
    shutil.rmtree(bundle / "stage2")
    IMCUNet(IMCUNetConfig.tiny(condition="audio", audio_dim=32)).save_pretrained(str(bundle / "stage2"))
    _check_stage2_condition(read_bundle_info(str(bundle)))


def test_audio_conditions_are_the_hubert_rows_around_each_frames_25hz_slot():
    from stages.completion.stage import audio_conditions

    rows = np.arange(20 * 3, dtype=np.float32).reshape(20, 3)  # 10 frames of 25 Hz, rows 2t, 2t+1
    first = 4  # rows start at 25 Hz frame 4
    # 50 fps frames 10..13: centres 0.21, 0.23, 0.25, 0.27 s -> 25 Hz slots 5, 5, 6, 6
    centres = (np.arange(10, 14) + 0.5) / 50
    got = audio_conditions(rows, first, centres, window_frames=1)
    assert got.shape == (4, 6, 3)
    slot = lambda t: rows[2 * t: 2 * t + 2]  # noqa: E731
    np.testing.assert_array_equal(got[0], np.concatenate([slot(0), slot(1), slot(2)]))  # 25 Hz 4, 5, 6
    np.testing.assert_array_equal(got[0], got[1])
    np.testing.assert_array_equal(got[3], np.concatenate([slot(1), slot(2), slot(3)]))
    # clamped at the rows' edges, as training's audio_window
    edge = audio_conditions(rows, first, np.array([0.17]), window_frames=2)[0]  # slot 4 - 4 = 0
    np.testing.assert_array_equal(edge, np.concatenate([slot(0), slot(0), slot(0), slot(1), slot(2)]))
