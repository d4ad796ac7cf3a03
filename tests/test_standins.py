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


def test_vae_decoder_fine_tune_keeps_the_latents_and_improves_the_decode(tmp_path):
    torch.manual_seed(0)
    batch = {"image": _images(_crops(2))}
    trained = with_scaling_factor(LatentVAE.from_config(tiny_vae_config()), 0.8)  # stands for a trained VAE
    trained.save_pretrained(str(tmp_path / "vae"))
    with torch.no_grad():
        latents_before = trained.encode(batch["image"])
    cfg = VaeTrainConfig(lr=3e-3, warmup_steps=0, total_steps=40, decoder_only=True)
    trainer = VaeTrainer(LatentVAE.from_pretrained(str(tmp_path / "vae")), MouthMask().array(), cfg, seed=1)
    assert all(not p.requires_grad for p in trainer.vae.vae.encoder.parameters())
    before = trainer.evaluate(batch)
    for step in range(30):
        logs = trainer.step(batch, step)
    after = trainer.evaluate(batch)
    assert after["rec"] < 0.7 * before["rec"], (before, after)
    assert logs["latent_std"] == pytest.approx(0.8)
    tuned = trainer.trained_vae()
    assert tuned.scaling_factor == pytest.approx(1.25)
    with torch.no_grad():
        assert torch.equal(tuned.encode(batch["image"]), latents_before)  # Stage 2's inputs unchanged
        assert not torch.equal(tuned.decode(latents_before), trained.decode(latents_before))


def test_vae_decoder_fine_tune_on_the_posterior_mode_is_free_of_the_sampling_noise(tmp_path):
    torch.manual_seed(0)
    batch = {"image": _images(_crops(2))}
    with_scaling_factor(LatentVAE.from_config(tiny_vae_config()), 0.8).save_pretrained(str(tmp_path / "vae"))
    mask = MouthMask().array()

    def first_step(sample_latents: bool, seed: int) -> dict:
        cfg = VaeTrainConfig(lr=3e-3, warmup_steps=0, total_steps=10, decoder_only=True, sample_latents=sample_latents)
        return VaeTrainer(LatentVAE.from_pretrained(str(tmp_path / "vae")), mask, cfg, seed=seed).step(batch, 0)

    # the mode: the step's loss is the weighted L1 of decoding the posterior mean, whatever the seed
    vae = LatentVAE.from_pretrained(str(tmp_path / "vae")).vae
    with torch.no_grad():
        decoded = (vae.decode(vae.encode(batch["image"] * 2 - 1).latent_dist.mode()).sample + 1) / 2
    weight = 1.0 + 4.0 * torch.from_numpy(mask)[None, None]
    expected = float((weight * (decoded - batch["image"]).abs()).mean() / weight.mean())
    assert first_step(False, seed=1)["rec"] == pytest.approx(expected, rel=1e-5)
    assert first_step(False, seed=2)["rec"] == pytest.approx(expected, rel=1e-5)
    # a posterior sample (the default) draws its noise from the trainer's generator
    assert first_step(True, seed=1)["rec"] != pytest.approx(first_step(True, seed=2)["rec"], rel=1e-5)


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
    # a decoder fine-tune keeps the first pass's record inside its own
    write_bundle(out, out, "vae", vae, {"id": "card1"}, 4, "run2", Storage(), fine_tune=True)
    with open(os.path.join(out, "bundle.json")) as f:
        vae_record = json.load(f)["training"]["vae"]
    assert (vae_record["corpus"], vae_record["steps"], vae_record["fine_tunes"]["corpus"],
            vae_record["fine_tunes"]["steps"]) == ("card1", 4, "card0", 9)


# ---- the HuBERT stand-in (`imgtalk train hubert`, stages/audio/hubert_training.py)


def _speechlike(seconds: float, seed: int) -> np.ndarray:
    """A 16 kHz signal of syllable-like bursts: a voiced tone whose pitch and loudness change
    every 0.2 s, with pauses, so masked frames are predictable from their context."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(16000 * seconds)) / 16000
    out = np.zeros_like(t)
    for start in np.arange(0, seconds, 0.2):
        if rng.random() < 0.3:
            continue
        f0, loud = rng.uniform(120, 300), rng.uniform(0.2, 0.8)
        span = (t >= start) & (t < start + 0.16)
        for h in range(1, 6):
            out[span] += loud / h * np.sin(2 * np.pi * h * f0 * t[span])
    return out.astype(np.float32)


def test_log_mel_frames_are_hubert_frames_and_a_tone_lands_in_its_band():
    from transformers import HubertModel

    from stages.audio.hubert import tiny_hubert_config
    from stages.audio.hubert_training import LogMel, num_conv_frames

    log_mel = LogMel(40)
    for samples in (20480, 16000, 12345):
        with torch.no_grad():
            hidden = HubertModel(tiny_hubert_config()).eval()(torch.zeros(1, samples)).last_hidden_state
        assert log_mel(torch.zeros(1, samples)).shape[1] == hidden.shape[1] == num_conv_frames(samples)
    # a 1 kHz tone switched on halfway: the band that rises most is one whose filter covers 1 kHz (bin 25 of 40 Hz)
    t = np.arange(16000) / 16000
    wave = np.where(t >= 0.5, np.sin(2 * np.pi * 1000 * t), 0.0) + 1e-3 * np.random.default_rng(0).standard_normal(16000)
    raw = log_mel(torch.from_numpy(wave.astype(np.float32))[None], standardise=False)[0].numpy()  # (T, 40)
    frames = raw.shape[0]
    rise = raw[frames // 2 + 2:].mean(0) - raw[: frames // 2 - 2].mean(0)
    covering = set(np.flatnonzero(log_mel.filters.numpy()[25] > 0))
    assert len(covering) == 2 and int(rise.argmax()) in covering, rise
    # standardised per crop and band: zero mean, unit spread
    mel = log_mel(torch.from_numpy(wave.astype(np.float32))[None])[0].numpy()
    np.testing.assert_allclose(mel.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(mel.std(0, ddof=1), 1, atol=1e-2)


def test_span_mask_covers_about_its_share_in_spans_and_follows_its_generator():
    from stages.audio.hubert_training import span_mask

    mask = span_mask(64, 100, 0.5, 10, torch.Generator().manual_seed(1))
    assert mask.shape == (64, 100) and mask.dtype == torch.bool
    share = float(mask.float().mean())
    assert 0.3 < share <= 0.5  # five spans of 10, overlaps allowed
    for row in mask.numpy():  # every masked run is at least a span long
        edges = np.flatnonzero(np.diff(np.r_[0, row.astype(int), 0]))
        assert ((edges[1::2] - edges[::2]) >= 10).all()
    assert torch.equal(mask, span_mask(64, 100, 0.5, 10, torch.Generator().manual_seed(1)))
    assert span_mask(2, 100, 0.01, 10, torch.Generator().manual_seed(1)).sum(1).min() >= 10  # at least one span


def test_sample_audio_clips_cut_the_chunk_speech():
    from stages.audio.hubert_training import sample_audio_clips

    pcm = (np.arange(40 * 640) % 1000 - 500).astype(np.int16).reshape(40, 640)
    clips = sample_audio_clips(pcm, np.random.default_rng(0), 32, 3)
    assert len(clips) == 3
    flat = pcm.reshape(-1).astype(np.float32) / 32768
    for c in clips:
        assert c["wave"].shape == (32 * 640,) and c["wave"].dtype == np.float32
        start = int(np.flatnonzero(np.isclose(flat, c["wave"][0]))[0])
        assert start % 640 == 0 or np.array_equal(flat[start: start + 20480], c["wave"])
    short = sample_audio_clips(pcm[:10], np.random.default_rng(0), 32, 3)
    assert len(short) == 1 and np.array_equal(short[0]["wave"][: 6400], flat[: 6400]) and not short[0]["wave"][6400:].any()
    assert sample_audio_clips(np.zeros((40, 640), np.int16), np.random.default_rng(0), 32, 3) == []


def test_hubert_trainer_learns_resumes_and_saves_a_plain_hubert(tmp_path):
    from transformers import HubertModel

    from pipeline.train.tasks import _HubertFolder
    from stages.audio.hubert import HubertFeatures, tiny_hubert_config
    from stages.audio.hubert_training import HubertTrainConfig, HubertTrainer

    torch.manual_seed(0)
    batch = {"wave": torch.from_numpy(np.stack([_speechlike(1.28, s) for s in range(4)]))}
    cfg = HubertTrainConfig(lr=2e-3, warmup_steps=0, total_steps=80)
    trainer = HubertTrainer(HubertModel(tiny_hubert_config()), cfg, seed=0)
    before = trainer.evaluate(batch)
    for step in range(60):
        trainer.step(batch, step)
    after = trainer.evaluate(batch)
    assert after["masked"] < 0.7 * before["masked"], (before, after)

    torch.save(trainer.state_dict(), tmp_path / "state.pt")
    twin = HubertTrainer(HubertModel(tiny_hubert_config()), cfg, seed=7)
    twin.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert trainer.step(batch, 60) == twin.step(batch, 60)

    # the bundle's folder holds the plain model (no head) in transformers format, read as the real one is
    _HubertFolder(trainer.hubert.eval()).save_pretrained(str(tmp_path / "hubert"))
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= set(os.listdir(tmp_path / "hubert"))
    stage = HubertFeatures(str(tmp_path / "hubert"))
    wave = _speechlike(2.0, 9)
    padded = np.pad((wave - wave.mean()) / np.sqrt(wave.var() + 1e-7), 40)  # the stage's 40 samples each side
    with torch.no_grad():
        want = trainer.hubert(torch.from_numpy(padded)[None].float()).last_hidden_state[0].numpy()
    rows = stage(wave)
    assert rows.shape == want.shape == (100, 32)
    np.testing.assert_allclose(rows, want, atol=1e-4)


def test_hubert_trainer_refuses_a_model_without_a_mask_embedding():
    from transformers import HubertModel

    from stages.audio.hubert import tiny_hubert_config
    from stages.audio.hubert_training import HubertTrainConfig, HubertTrainer

    config = tiny_hubert_config()
    config.mask_time_prob = 0.0
    with pytest.raises(ValueError, match="mask_time_prob"):
        HubertTrainer(HubertModel(config), HubertTrainConfig())
