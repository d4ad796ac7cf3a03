"""The trained stand-ins for downloaded weights: the VAE (`imgtalk train vae`) and the
landmark-guided motion extractor (`imgtalk train extractor`). Each overfits a tiny batch,
resumes to an identical next step, and saves into a bundle the dub job loads unchanged."""
import json
import os

import cv2
import numpy as np
import pytest
import torch

from stages.completion.vae import LatentVAE, tiny_vae_config
from stages.completion.vae_training import VaeTrainConfig, VaeTrainer, sample_crops, with_scaling_factor
from stages.face import MouthMask
from stages.motion.audio2motion import DRIVEN_KEYPOINTS
from stages.motion.extractor import MotionExtractor, MotionExtractorConfig, extract_motion
from stages.motion.extractor_training import (AMPLITUDE, ExtractorTrainConfig, ExtractorTrainer, opening_direction,
                                              sample_frames)


def _crops(n: int) -> np.ndarray:
    """n astronaut face crops (256², uint8) whose chin is pulled down by 0..n-1 pixels' worth."""
    from skimage import data

    face = cv2.resize(data.astronaut()[0:300, 100:400], (256, 256), interpolation=cv2.INTER_AREA)
    out = []
    for i in range(n):
        shifted = face.copy()
        drop = 3 * i
        shifted[170 + drop:, 70:190] = face[170:256 - drop, 70:190]  # the lower face moves down
        shifted[170:170 + drop, 100:160] = 20  # a dark open mouth
        out.append(shifted)
    return np.stack(out)


def _images(crops: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255.0


def test_sample_crops_and_frames_take_only_usable_frames():
    crops = _crops(6)
    chunk = {"has_face": np.array([1, 0, 1, 1, 0, 1], bool), "crops": crops,
             "mouth_open": np.array([0.1, 0.2, np.nan, 0.3, 0.4, 0.5], np.float32)}
    rng = np.random.default_rng(0)
    got = sample_crops(chunk, rng, 10)
    assert len(got) == 4 and all(g["image"].shape == (256, 256, 3) for g in got)
    frames = sample_frames(chunk, np.random.default_rng(0), 10)
    assert sorted(float(f["mouth_open"]) for f in frames) == pytest.approx([0.1, 0.3, 0.5])
    assert len(sample_frames(chunk, np.random.default_rng(0), 2)) == 2


def test_vae_trainer_overfits_resumes_and_saves_whitened_latents(tmp_path):
    torch.manual_seed(0)
    batch = {"image": _images(_crops(2))}
    cfg = VaeTrainConfig(lr=3e-3, warmup_steps=0, total_steps=60, kl=1e-6)
    trainer = VaeTrainer(LatentVAE.from_config(tiny_vae_config()), MouthMask().array(), cfg, seed=1)
    before = trainer.evaluate(batch)
    for step in range(40):
        trainer.step(batch, step)
    after = trainer.evaluate(batch)
    assert after["rec"] < 0.6 * before["rec"], (before, after)
    assert after["psnr"] > before["psnr"] + 3

    # resume: a fresh trainer loaded from the state takes the identical next step
    state = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in trainer.state_dict().items()}
    torch.save(state, tmp_path / "state.pt")
    twin = VaeTrainer(LatentVAE.from_config(tiny_vae_config()), MouthMask().array(), cfg, seed=99)
    twin.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert trainer.step(batch, 40) == twin.step(batch, 40)

    # the saved VAE whitens its latents and round-trips through diffusers' format
    vae = trainer.trained_vae()
    assert vae.scaling_factor == pytest.approx(1.0 / float(trainer.latent_std))
    vae.save_pretrained(str(tmp_path / "vae"))
    loaded = LatentVAE.from_pretrained(str(tmp_path / "vae"))
    assert loaded.scaling_factor == pytest.approx(vae.scaling_factor)
    with torch.no_grad():
        z = loaded.encode(batch["image"])
        assert torch.equal(z, vae.encode(batch["image"]))
        assert 0.3 < float(z.std()) < 3.0
    assert not any(p.requires_grad for p in loaded.parameters())
    with pytest.raises(ValueError, match="latent std"):
        with_scaling_factor(vae, 0.0)


def test_opening_direction_is_a_unit_pattern_on_the_driven_keypoints():
    u = opening_direction()
    assert u.shape == (21, 3) and np.linalg.norm(u) == pytest.approx(1.0)
    assert set(np.flatnonzero(u[:, 1])) == set(DRIVEN_KEYPOINTS)
    assert not u[:, [0, 2]].any()


def test_extractor_trainer_learns_the_opening_and_resumes(tmp_path):
    torch.manual_seed(0)
    crops = _crops(4)
    opening = torch.tensor([0.0, 0.1, 0.2, 0.3])
    batch = {"image": _images(crops), "mouth_open": opening}
    cfg = ExtractorTrainConfig(lr=2e-3, warmup_steps=0, total_steps=80, open_mean=0.15, open_std=0.1)
    trainer = ExtractorTrainer(MotionExtractor(MotionExtractorConfig.tiny()), cfg, seed=0)
    before = trainer.evaluate(batch)
    for step in range(60):
        trainer.step(batch, step)
    after = trainer.evaluate(batch)
    assert after["loss"] < 0.3 * before["loss"], (before, after)
    assert after["r"] > 0.9
    # what prepare will extract: δ on the driven keypoints along U, scaled by the opening
    exp = extract_motion(trainer.extractor.eval(), crops)["exp"]
    along = (exp * opening_direction()).sum(axis=(1, 2)) / AMPLITUDE
    assert np.corrcoef(along, opening.numpy())[0, 1] > 0.9

    state = trainer.state_dict()
    torch.save(state, tmp_path / "state.pt")
    twin = ExtractorTrainer(MotionExtractor(MotionExtractorConfig.tiny()), cfg, seed=5)
    twin.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert trainer.step(batch, 60) == twin.step(batch, 60)


def test_write_bundle_puts_a_trained_extractor_and_vae_where_the_dub_loads_them(tmp_path, tiny_bundle):
    from pipeline.storage import Storage
    from pipeline.train.job import write_bundle
    from pipeline.weights import load_motion_extractor, load_vae, read_bundle_info

    torch.manual_seed(3)
    extractor = MotionExtractor(MotionExtractorConfig.tiny()).eval()
    vae = with_scaling_factor(LatentVAE.from_config(tiny_vae_config()), 0.5)
    out = str(tmp_path / "bundle")
    card = {"id": "card0"}
    write_bundle(tiny_bundle, out, "extractor", extractor, card, 7, "run", Storage(), component="motion_extractor")
    write_bundle(out, out, "vae", vae, card, 9, "run", Storage())
    info = read_bundle_info(out)
    crops = _crops(2)
    want = extract_motion(extractor, crops)["exp"]
    assert np.array_equal(extract_motion(load_motion_extractor(info), crops)["exp"], want)
    assert load_vae(info).scaling_factor == pytest.approx(2.0)
    with open(os.path.join(out, "bundle.json")) as f:
        meta = json.load(f)
    assert meta["training"]["extractor"]["steps"] == 7 and meta["training"]["vae"]["steps"] == 9
    assert meta["trained"] is False  # the stand-ins alone do not make a lip-syncing bundle
    assert not os.path.exists(os.path.join(out, "liveportrait", "motion_extractor.pth.new"))
