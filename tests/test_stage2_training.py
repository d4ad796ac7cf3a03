"""Stage 2 training: pair sampling, the G/D step, overfitting, the GAN switch, optimiser groups, resume."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from stages.completion.discriminator import PatchDiscriminator, PatchDiscriminatorConfig
from stages.completion.imc_unet import IMCUNet, IMCUNetConfig
from stages.completion.losses import Stage2Loss, Stage2LossWeights, masked_l1
from stages.completion.training import (
    DRIVEN_KEYPOINTS,
    Stage2TrainConfig,
    Stage2Trainer,
    motion_statistics,
    pairs_to_batch,
    sample_pairs,
)
from stages.completion.vae import LatentVAE, tiny_vae_config
from stages.face.mouth_mask import MouthMask

S = 64
torch.set_num_threads(1)  # shared CI box; the tiny networks gain nothing from more


# ----------------------------------------------------------------------------- data


def face_images(n: int, rng: np.random.Generator, mouth_open: np.ndarray) -> np.ndarray:
    """(n,S,S,3) uint8 smooth synthetic faces: a per-frame colour with a vertical shade and a
    soft dark mouth inside the mouth mask whose height follows mouth_open."""
    y, x = np.mgrid[0:S, 0:S] / S
    images = []
    for i in range(n):
        colour = rng.uniform(0.35, 0.8, 3)
        shade = rng.uniform(-0.2, 0.2, 3)
        image = colour + shade * y[..., None]
        r = ((x - 0.5) / 0.14) ** 2 + ((y - 0.8) / mouth_open[i]) ** 2
        mouth = 1.0 / (1.0 + np.exp(np.minimum(4.0 * (r - 1.0), 50.0)))  # soft edge: the tiny VAE can reproduce it
        image = image * (1 - mouth[..., None]) + np.array([0.45, 0.1, 0.1]) * mouth[..., None]
        images.append((np.clip(image, 0, 1) * 255).astype(np.uint8))
    return np.stack(images)


def make_chunk(n: int = 60, seed: int = 0) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed)
    has_face = np.ones(n, dtype=bool)
    has_face[[5, 6, 30]] = False
    shot = np.zeros(n, dtype=np.int32)
    shot[40:] = 1
    pose = np.cumsum(rng.normal(0, 1.5, (n, 3)), axis=0).astype(np.float32)
    pose[20] += 60.0  # a frame whose pose nothing else comes near
    exp = rng.normal(0, 0.01, (n, 21, 3)).astype(np.float32)
    crops = face_images(n, rng, rng.uniform(0.03, 0.1, n))
    crops[~has_face] = 0
    chunk = {
        "crops": crops,
        "has_face": has_face,
        "shot": shot,
        "x_c": rng.normal(0, 0.2, (n, 21, 3)).astype(np.float32),
        "exp": exp,
        "pose": pose,
    }
    video = {"neutral_exp": rng.normal(0, 0.01, (21, 3)).astype(np.float32)}
    return chunk, video


# ----------------------------------------------------------------------------- sample_pairs


def test_sample_pairs_rules():
    chunk, video = make_chunk()
    pairs = sample_pairs(chunk, video, np.random.default_rng(1), pairs=100, min_gap_frames=12, max_pose_deg=10.0)
    assert 10 < len(pairs) < 60
    n = len(chunk["has_face"])
    for p in pairs:
        t, r = p["target_index"], p["reference_index"]
        assert t != r and p["gap"] == abs(t - r) >= 12
        assert chunk["has_face"][t] and chunk["has_face"][r] and chunk["shot"][t] == chunk["shot"][r]
        # the reference is the pose-nearest allowed frame, within the limit
        allowed = [
            j for j in range(n)
            if chunk["has_face"][j] and chunk["shot"][j] == chunk["shot"][t] and abs(j - t) >= 12
        ]
        distances = np.linalg.norm(chunk["pose"][allowed] - chunk["pose"][t], axis=1)
        assert np.linalg.norm(chunk["pose"][r] - chunk["pose"][t]) == pytest.approx(distances.min())
        assert distances.min() <= 10.0
        assert np.array_equal(p["target"], chunk["crops"][t]) and np.array_equal(p["reference"], chunk["crops"][r])
        # condition: driven keypoints from the target's δ, neutral δ everywhere else
        driven = list(DRIVEN_KEYPOINTS)
        others = [k for k in range(21) if k not in DRIVEN_KEYPOINTS]
        assert p["motion"].dtype == np.float32 and p["motion"].shape == (21, 3)
        assert np.array_equal(p["motion"][driven], chunk["exp"][t][driven])
        assert np.array_equal(p["motion"][others], video["neutral_exp"][others])
        assert not np.array_equal(p["motion"][others], chunk["exp"][t][others])
        assert np.array_equal(p["target_exp"], chunk["exp"][t]) and np.array_equal(p["target_x_c"], chunk["x_c"][t])
    targets = [p["target_index"] for p in pairs]
    assert len(set(targets)) == len(targets)
    assert 20 not in targets  # its best pose distance is far over 10 degrees
    assert not {5, 6, 30} & set(targets)


def test_sample_pairs_drops_what_cannot_be_paired():
    chunk, video = make_chunk()
    rng = np.random.default_rng(2)
    assert sample_pairs(chunk, video, rng, pairs=10, min_gap_frames=61) == []
    # a huge pose tolerance keeps every face frame except those without any allowed partner
    loose = sample_pairs(chunk, video, rng, pairs=1000, min_gap_frames=12, max_pose_deg=1e9)
    face, shot, n = chunk["has_face"], chunk["shot"], len(chunk["has_face"])
    pairable = [
        t for t in range(n)
        if face[t] and any(face[j] and shot[j] == shot[t] and abs(j - t) >= 12 for j in range(n))
    ]
    assert len(pairable) == 53  # frames 48-51 of the 20-frame second shot have no partner 12 frames away
    assert sorted(p["target_index"] for p in loose) == pairable
    assert len(sample_pairs(chunk, video, rng, pairs=3)) == 3
    with pytest.raises(ValueError, match="min_gap_frames"):
        sample_pairs(chunk, video, rng, pairs=3, min_gap_frames=0)


def test_sample_pairs_source_swap_shows_another_frame_around_the_targets_mouth():
    chunk, video = make_chunk()
    mask = MouthMask(dsize=S).array()
    before = sample_pairs(chunk, video, np.random.default_rng(3), pairs=30, max_pose_deg=10.0)
    off = sample_pairs(chunk, video, np.random.default_rng(3), pairs=30, max_pose_deg=10.0, source_swap=0.0, mouth_mask=mask)
    assert [(p["target_index"], p["reference_index"], p["source_index"]) for p in off] == \
        [(p["target_index"], p["reference_index"], p["target_index"]) for p in before]  # p = 0: the pairs of before
    assert all(np.array_equal(a["target"], b["target"]) for a, b in zip(off, before))

    n, hidden = len(chunk["has_face"]), mask.astype(bool)
    swapped = sample_pairs(chunk, video, np.random.default_rng(3), pairs=30, max_pose_deg=10.0, source_swap=1.0, mouth_mask=mask)
    assert len(swapped) == len(before)
    for p in swapped:
        t, src = p["target_index"], p["source_index"]
        assert src != t and abs(src - t) >= 12 and chunk["has_face"][src] and chunk["shot"][src] == chunk["shot"][t]
        assert np.linalg.norm(chunk["pose"][src] - chunk["pose"][t]) <= 10.0
        # the network sees s through its hole and must draw t's mouth: t under the mask, s elsewhere
        assert np.array_equal(p["target"][hidden], chunk["crops"][t][hidden])
        assert np.array_equal(p["target"][~hidden], chunk["crops"][src][~hidden])
        assert not np.array_equal(p["target"], chunk["crops"][t])
        assert np.array_equal(p["motion"][list(DRIVEN_KEYPOINTS)], chunk["exp"][t][list(DRIVEN_KEYPOINTS)])
        assert np.array_equal(p["target_exp"], chunk["exp"][t]) and np.array_equal(p["reference"], chunk["crops"][p["reference_index"]])
    sources = {p["source_index"] for p in swapped}
    assert len(sources) > len(swapped) // 2  # drawn at random, not always the pose-nearest frame
    assert sources != {p["reference_index"] for p in swapped}

    half = sample_pairs(chunk, video, np.random.default_rng(4), pairs=n, max_pose_deg=10.0, source_swap=0.5, mouth_mask=mask)
    share = np.mean([p["source_index"] != p["target_index"] for p in half])
    assert 0.25 < share < 0.75
    with pytest.raises(ValueError, match="source_swap needs the mouth_mask"):
        sample_pairs(chunk, video, np.random.default_rng(0), pairs=3, source_swap=0.5)
    with pytest.raises(ValueError, match="source_swap needs the mouth_mask"):
        sample_pairs(chunk, video, np.random.default_rng(0), pairs=3, source_swap=0.5, mouth_mask=MouthMask(dsize=2 * S).array())
    with pytest.raises(ValueError, match=r"source_swap must be in \[0, 1\]"):
        sample_pairs(chunk, video, np.random.default_rng(0), pairs=3, source_swap=1.5, mouth_mask=mask)


def test_motion_statistics_feed_the_unet_config():
    chunk, video = make_chunk()
    pairs = sample_pairs(chunk, video, np.random.default_rng(0), pairs=40, max_pose_deg=1e9)
    mean, std = motion_statistics(np.stack([p["motion"] for p in pairs]))
    config = IMCUNetConfig.tiny().with_motion_statistics(mean, std)
    others = [k for k in range(21) if k not in DRIVEN_KEYPOINTS]
    # non-driven keypoints never move in the condition: their std hits the floor
    assert all(config.motion_std[k][0] == 1e-6 for k in others)
    assert all(config.motion_std[k][0] > 1e-3 for k in DRIVEN_KEYPOINTS)


# ----------------------------------------------------------------------------- trainer


def overfit_batch(n: int = 8, seed: int = 3) -> dict:
    rng = np.random.default_rng(seed)
    mouth_open = rng.uniform(0.03, 0.1, n)
    images = face_images(n, rng, mouth_open)
    motion = np.zeros((n, 21, 3), np.float32)
    motion[:, list(DRIVEN_KEYPOINTS), 1] = mouth_open[:, None] * 0.3
    pairs = [
        {
            "target": images[i],
            "reference": images[(i + 3) % n],
            "motion": motion[i],
            "target_exp": motion[i],
            "target_x_c": np.zeros((21, 3), np.float32),
        }
        for i in range(n)
    ]
    return pairs_to_batch(pairs)


def make_trainer(weights: Stage2LossWeights, seed: int = 0, vae=None, discriminator=False, **cfg) -> Stage2Trainer:
    torch.manual_seed(seed)
    unet = IMCUNet(IMCUNetConfig.tiny())
    vae = vae if vae is not None else LatentVAE.from_config(tiny_vae_config())
    disc = PatchDiscriminator(PatchDiscriminatorConfig.tiny()) if discriminator else None
    fields = dict(lr=1e-3, alpha_lr=1e-2, warmup_steps=2, total_steps=1000, gan_start_step=10**9, loss=weights)
    fields.update(cfg)
    return Stage2Trainer(unet, vae, MouthMask(dsize=S).array(), Stage2TrainConfig(**fields), discriminator=disc)


LATENT_ONLY = Stage2LossWeights(rec=0.0, perc=0.0, motion=0.0, adv=0.0, latent=1.0)


def train_tiny_autoencoder(batch: dict, steps: int) -> LatentVAE:
    """The tiny VAE trained briefly as a deterministic autoencoder on the batch's frames, so that
    its latents carry the frames' content and its decoder can (roughly) reproduce them."""
    torch.manual_seed(0)
    raw = LatentVAE.from_config(tiny_vae_config()).vae.requires_grad_(True).train()
    optimizer = torch.optim.Adam(raw.parameters(), lr=3e-3)
    x = batch["target"] * 2 - 1
    for _ in range(steps):
        loss = (raw.decode(raw.encode(x).latent_dist.mode()).sample - x).abs().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return LatentVAE(raw)


@pytest.fixture(scope="module")
def batch():
    return overfit_batch()


@pytest.fixture(scope="module")
def trained_vae(batch):
    return train_tiny_autoencoder(batch, steps=40)


def test_overfit_latent_term_alone(batch, trained_vae):
    # 160 steps: the network's hole runs to the crop's lower edge (MouthMask), more to fit.
    trainer = make_trainer(LATENT_ONLY, vae=trained_vae, lr=2e-3, warmup_steps=5, total_steps=160)
    before = trainer.evaluate(batch)["latent_l1_mask"]
    for step in range(160):
        out = trainer.step(batch, step)
    assert set(out) == {"loss", "latent", "lr"}
    after = trainer.evaluate(batch)["latent_l1_mask"]
    # What one latent for all frames would score (the per-cell median, the best L1 constant):
    # beating it shows per-frame completion, not just the untrained output noise shrinking.
    target = trainer.encode_inputs(batch)["target"]
    constant = float(masked_l1(target.median(dim=0, keepdim=True).values.expand_as(target), target, trainer.latent_mask))
    print(f"\nlatent L1 inside the mask: {before:.4f} -> {after:.4f} ({before / after:.1f}x); "
          f"one latent for all frames: {constant:.4f}")
    assert after <= before / 10
    assert after <= 0.6 * constant


def test_overfit_pixels_through_the_decoder(batch, trained_vae):
    trainer = make_trainer(
        Stage2LossWeights(rec=1.0, perc=0.0, motion=0.0, adv=0.0, latent=1.0),
        vae=trained_vae, lr=2e-3, warmup_steps=5, total_steps=150,
    )
    with torch.no_grad():  # what the decoder itself can reproduce: E then D of the true frames
        floor = float(masked_l1(trained_vae.decode(trained_vae.encode(batch["target"])), batch["target"], trainer.mask))
    before = trainer.evaluate(batch)["pixel_l1_mask"]
    for step in range(150):
        out = trainer.step(batch, step)
    assert set(out) == {"loss", "rec", "latent", "lr"}
    after = trainer.evaluate(batch)["pixel_l1_mask"]
    print(f"\npixel L1 inside the mask: {before:.4f} -> {after:.4f} ({before / after:.1f}x); "
          f"VAE reconstruction floor {floor:.4f}")
    # Not tenfold: the pixel error cannot fall below the decoder's own reconstruction error, and
    # a tiny VAE trained for seconds (40 steps) reproduces the hole only to ~0.13 L1, against
    # ~0.16 at init (the hole runs to the crop's lower edge, MouthMask, so much of it is easy).
    # Measured: 0.161 -> 0.1295 in 150 steps with floor 0.1286 (50 steps did not move it).
    # So the test asserts what is reachable: most of the way from init to the decoder's floor.
    assert after <= floor + 0.25 * (before - floor)
    assert after <= 1.15 * floor


def test_output_follows_motion_and_reference_only_once_alphas_open(batch):
    trainer = make_trainer(LATENT_ONLY)
    trainer.unet.eval()
    other_motion = dict(batch, motion=batch["motion"] + 0.05)
    other_reference = dict(batch, reference=batch["reference"].flip(0))
    with torch.no_grad():
        base = trainer.complete(batch)
        assert (trainer.complete(other_motion) - base).abs().max() > 1e-3
        assert torch.equal(trainer.complete(other_reference), base)  # every alpha is 0
        for alpha in trainer.unet.rsca_alphas():
            alpha.fill_(0.5)
        opened = trainer.complete(batch)
        assert (trainer.complete(other_reference) - opened).abs().max() > 1e-3


def parameters_of(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def test_gan_switches_on_at_gan_start_step(batch):
    weights = Stage2LossWeights(rec=1.0, perc=0.0, motion=0.0, adv=0.01)
    trainer = make_trainer(weights, discriminator=True, gan_start_step=2)
    small = {k: v[:2] for k, v in batch.items()}
    d_before = parameters_of(trainer.discriminator)
    for step in range(2):
        out = trainer.step(small, step)
        assert "d_loss" not in out and "adv" not in out
    assert all(torch.equal(a, b) for a, b in zip(d_before, parameters_of(trainer.discriminator)))
    assert all(p.grad is None for p in trainer.discriminator.parameters())
    out = trainer.step(small, 2)
    assert {"d_loss", "adv", "rec"} <= set(out) and out["d_loss"] > 0
    assert out["loss"] == pytest.approx(out["rec"] + 0.01 * out["adv"], rel=1e-5)
    assert any(not torch.equal(a, b) for a, b in zip(d_before, parameters_of(trainer.discriminator)))
    assert all(p.requires_grad for p in trainer.discriminator.parameters())  # unfrozen for its own step


def test_alpha_parameter_group_and_frozen_critics():
    trainer = make_trainer(LATENT_ONLY, lr=1e-4, alpha_lr=1e-3, weight_decay=0.01)
    groups = trainer.optimizer.param_groups
    alpha_ids = {id(a) for a in trainer.unet.rsca_alphas()}
    alpha_groups = [g for g in groups if {id(p) for p in g["params"]} & alpha_ids]
    assert len(alpha_groups) == 1 and {id(p) for p in alpha_groups[0]["params"]} == alpha_ids
    assert alpha_groups[0]["weight_decay"] == 0.0 and alpha_groups[0]["initial_lr"] == 1e-3
    (other,) = [g for g in groups if g is not alpha_groups[0]]
    assert other["weight_decay"] == 0.01 and other["initial_lr"] == 1e-4
    assert sum(len(g["params"]) for g in groups) == len(list(trainer.unet.parameters()))
    assert not any(p.requires_grad for p in trainer.vae.parameters())
    # a weight whose module is missing is switched off, not an error
    default = make_trainer(Stage2LossWeights())  # perc, motion, adv > 0 but no VGG, extractor or D
    assert (default.weights.perc, default.weights.motion, default.weights.adv) == (0.0, 0.0, 0.0)
    assert default.weights.rec == 1.0
    assert not trainer.unet.gradient_checkpointing
    assert make_trainer(LATENT_ONLY, gradient_checkpointing=True).unet.gradient_checkpointing


def test_motion_noise_touches_only_the_driven_keypoints_and_is_drawn_from_the_step():
    from stages.motion.audio2motion import DRIVEN_KEYPOINTS

    motion = torch.randn(4, 21, 3)
    trainer = make_trainer(LATENT_ONLY, motion_noise=0.03, noise_seed=5)
    noisy = trainer.noisy_motion(motion, 7)
    driven = list(DRIVEN_KEYPOINTS)
    others = [k for k in range(21) if k not in driven]
    assert torch.equal(noisy[:, others], motion[:, others])
    delta = noisy[:, driven] - motion[:, driven]
    assert 0.02 < float(delta.std()) < 0.04
    assert torch.equal(trainer.noisy_motion(motion, 7), noisy)  # the step's draw, again
    assert not torch.equal(trainer.noisy_motion(motion, 8), noisy)
    assert torch.equal(make_trainer(LATENT_ONLY).noisy_motion(motion, 7), motion)  # off by default
    audio = torch.randn(4, 10, 32)  # an audio-conditioned UNet's rows: never noised
    assert torch.equal(trainer.noisy_motion(audio, 7), audio)


def test_resume_gives_the_same_next_step(batch):
    weights = Stage2LossWeights(rec=1.0, perc=0.0, motion=0.0, adv=0.01, latent=0.5)
    small = {k: v[:2] for k, v in batch.items()}
    vae = LatentVAE.from_config(tiny_vae_config())  # frozen, not part of the trainer's state: shared
    first = make_trainer(weights, seed=0, vae=vae, discriminator=True, gan_start_step=1, motion_noise=0.03)
    for step in range(2):
        first.step(small, step)
    snapshot = copy.deepcopy(first.state_dict())
    expected = first.step(small, 2)

    resumed = make_trainer(weights, seed=7, vae=vae, discriminator=True, gan_start_step=1, motion_noise=0.03)
    assert resumed.step(small, 0)["loss"] != expected["loss"]  # another history: the load must matter
    resumed.load_state_dict(snapshot)
    got = resumed.step(small, 2)
    assert got == expected  # exactly: loss, every part, lr and d_loss
    for a, b in zip(first.unet.parameters(), resumed.unet.parameters()):
        assert torch.equal(a, b)


def test_latent_term_in_stage2_loss():
    loss = Stage2Loss(LATENT_ONLY, None, None, None)
    completed = torch.zeros(2, 4, 8, 8, requires_grad=True)
    target = torch.ones(2, 4, 8, 8)
    target[:, :, :4] = 3.0  # off by 3 in the top half, by 1 in the bottom half
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 4:, :] = 1.0  # only the bottom half counts
    total, parts = loss(None, None, None, None, completed_latent=completed, target_latent=target, latent_mask=mask)
    assert set(parts) == {"latent"} and total.item() == pytest.approx(1.0)
    total.backward()
    assert completed.grad[..., :4, :].abs().sum() == 0 and completed.grad[..., 4:, :].abs().sum() > 0
    with pytest.raises(ValueError, match="completed_latent"):
        loss(None, None, None, None)
    with pytest.raises(ValueError, match="latent"):
        Stage2Loss(Stage2LossWeights(rec=1.0, perc=0.0, motion=0.0, adv=0.0, latent=-1.0), None, None, None)


def test_train_config_json_round_trip():
    config = Stage2TrainConfig(lr=3e-4, betas=[0.9, 0.99], loss=Stage2LossWeights(latent=0.5))
    again = Stage2TrainConfig.from_json(config.to_json())
    assert again == config and again.betas == (0.9, 0.99) and again.loss.latent == 0.5


class RecordingWrapper(torch.nn.Module):
    """Stands in for DDP: holds the net in .module and counts the forwards that go through it."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module
        self.calls = 0

    def forward(self, *args):
        self.calls += 1
        return self.module(*args)


def test_full_objective_step_with_frozen_critics_and_separate_wrappers(batch):
    from stages.completion.vgg import VGG19
    from stages.motion.extractor import MotionExtractor, MotionExtractorConfig

    torch.manual_seed(0)
    wrapped = []
    extractor = MotionExtractor(MotionExtractorConfig.tiny())
    vgg = VGG19(include_classifier=False, width_div=16)
    weights = Stage2LossWeights(rec=1.0, perc=0.01, motion=1.0, adv=0.01, lambda_c=0.1)
    trainer = Stage2Trainer(
        IMCUNet(IMCUNetConfig.tiny()), LatentVAE.from_config(tiny_vae_config()), MouthMask(dsize=S).array(),
        Stage2TrainConfig(warmup_steps=1, gan_start_step=0, loss=weights),
        extractor=extractor, vgg=vgg, discriminator=PatchDiscriminator(PatchDiscriminatorConfig.tiny()),
        wrap=lambda m: wrapped.append(RecordingWrapper(m)) or wrapped[-1],
    )
    # Only the UNet and the discriminator are wrapped, each on its own.
    assert [type(w.module).__name__ for w in wrapped] == ["IMCUNet", "PatchDiscriminator"]
    unet_wrapper, d_wrapper = wrapped
    frozen = list(extractor.parameters()) + list(vgg.parameters()) + list(trainer.vae.parameters())
    frozen_before = [p.detach().clone() for p in frozen]
    unet_before = parameters_of(trainer.unet)

    out = trainer.step({k: v[:2] for k, v in batch.items()}, 0)
    assert {"rec", "perc", "motion", "adv", "d_loss", "loss", "lr"} == set(out)
    assert all(np.isfinite(v) for v in out.values())
    # G step through the UNet wrapper once; D wrapper only in the D step (target + fake), the
    # frozen D of the G step runs unwrapped, so a DDP reducer never waits on it.
    assert unet_wrapper.calls == 1 and d_wrapper.calls == 2
    assert all(not p.requires_grad and p.grad is None for p in frozen)
    assert all(torch.equal(a, b) for a, b in zip(frozen, frozen_before))
    assert not extractor.training and not vgg.training
    changed = [not torch.equal(a, b) for a, b in zip(unet_before, parameters_of(trainer.unet))]
    assert sum(changed) > 0.9 * len(changed)  # nearly every UNet tensor moved in one step
    # and the motion term alone reaches the UNet through the decoder and the extractor
    motion_only = Stage2Trainer(
        IMCUNet(IMCUNetConfig.tiny()), LatentVAE.from_config(tiny_vae_config()), MouthMask(dsize=S).array(),
        Stage2TrainConfig(warmup_steps=1, loss=Stage2LossWeights(rec=0.0, perc=0.0, motion=1.0, adv=0.0)),
        extractor=extractor,
    )
    motion_only.step({k: v[:2] for k, v in batch.items()}, 0)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in motion_only.unet.motion_tokens.parameters())


def test_evaluate_metrics_by_hand_and_bfloat16_autocast(batch):
    trainer = make_trainer(Stage2LossWeights(rec=1.0, perc=0.0, motion=0.0, adv=0.0, latent=1.0))
    small = {k: v[:2] for k, v in batch.items()}
    metrics = trainer.evaluate(small)
    assert trainer.unet.training  # evaluate restores the training mode
    with torch.no_grad():
        trainer.unet.eval()
        latents = trainer.encode_inputs(small)
        completed = trainer.complete(small, latents)
        generated = trainer.vae.decode(completed)
        trainer.unet.train()
    inside = trainer.mask.expand_as(generated).bool()
    error = (generated - small["target"])[inside]
    assert metrics["pixel_l1_mask"] == pytest.approx(error.abs().mean().item(), rel=1e-5)
    assert metrics["psnr_mask"] == pytest.approx(10 * np.log10(1 / error.square().mean().item()), rel=1e-5)
    assert metrics["rec"] == pytest.approx((generated - small["target"]).abs().mean().item(), rel=1e-5)
    latent_inside = trainer.latent_mask.expand_as(completed).bool()
    latent_error = (completed - latents["target"])[latent_inside].abs().mean().item()
    assert metrics["latent_l1_mask"] == pytest.approx(latent_error, rel=1e-5)
    assert 0 < trainer.latent_mask.sum() < trainer.latent_mask.numel()

    torch.manual_seed(0)
    bf16 = Stage2Trainer(
        IMCUNet(IMCUNetConfig.tiny()), LatentVAE.from_config(tiny_vae_config()), MouthMask(dsize=S).array(),
        Stage2TrainConfig(warmup_steps=1, loss=Stage2LossWeights(rec=1.0, perc=0.0, motion=0.0, adv=0.0, latent=1.0)),
        autocast_dtype=torch.bfloat16,
    )
    out = bf16.step(small, 0)
    assert np.isfinite(out["loss"]) and all(p.dtype == torch.float32 for p in bf16.unet.parameters())
    with pytest.raises(ValueError, match="bfloat16"):
        Stage2Trainer(
            IMCUNet(IMCUNetConfig.tiny()), LatentVAE.from_config(tiny_vae_config()), MouthMask(dsize=S).array(),
            Stage2TrainConfig(loss=LATENT_ONLY), autocast_dtype=torch.float16,
        )


# ----------------------------------------------------------------------------- audio-conditioned ablation


def test_audio_window_rows_in_time_order_with_edge_clamping():
    from stages.completion.training import audio_window

    n, dim = 5, 3
    audio = np.zeros((n, 2, dim), np.float32)
    for i in range(n):
        for j in range(2):
            audio[i, j] = 10 * i + j + np.arange(dim) * 0.1  # row (i, j) is recognisable
    row = lambda i, j: 10 * i + j + np.arange(dim) * 0.1  # noqa: E731
    expect = lambda frames: np.stack([row(i, j) for i in frames for j in (0, 1)]).astype(np.float32)  # noqa: E731
    np.testing.assert_array_equal(audio_window(audio, 2, 2), expect([0, 1, 2, 3, 4]))
    np.testing.assert_array_equal(audio_window(audio, 0, 2), expect([0, 0, 0, 1, 2]))
    np.testing.assert_array_equal(audio_window(audio, 4, 2), expect([2, 3, 4, 4, 4]))
    np.testing.assert_array_equal(audio_window(audio, 1, 0), expect([1]))
    assert audio_window(audio, 3, 1).dtype == np.float32 and audio_window(audio, 3, 1).shape == (6, dim)


def test_sample_pairs_audio_condition():
    chunk, video = make_chunk()
    n = len(chunk["has_face"])
    chunk["audio"] = np.random.default_rng(5).normal(size=(n, 2, 7)).astype(np.float16)
    plain = sample_pairs(chunk, video, np.random.default_rng(1), pairs=1000, max_pose_deg=1e9)
    pairs = sample_pairs(chunk, video, np.random.default_rng(1), pairs=1000, max_pose_deg=1e9, audio_window_frames=2)
    assert all("audio_condition" not in p for p in plain)
    # the same pairs as without audio: the rng is not consumed differently
    assert [p["target_index"] for p in pairs] == [p["target_index"] for p in plain]
    targets = {p["target_index"] for p in pairs}
    assert {0, 1, 58, 59} <= targets  # edges of the chunk are covered
    for p in pairs:
        t = p["target_index"]
        frames = np.clip(np.arange(t - 2, t + 3), 0, n - 1)
        expected = np.concatenate([chunk["audio"][f] for f in frames]).astype(np.float32)
        assert p["audio_condition"].dtype == np.float32 and p["audio_condition"].shape == (10, 7)
        np.testing.assert_array_equal(p["audio_condition"], expected)
    first = next(p for p in pairs if p["target_index"] == 0)["audio_condition"]
    np.testing.assert_array_equal(first[:6], np.tile(chunk["audio"][0].astype(np.float32), (3, 1)))
    with pytest.raises(ValueError, match="audio"):
        sample_pairs(dict(chunk, audio=chunk["audio"][:-1]), video, np.random.default_rng(1), pairs=3,
                     audio_window_frames=2)


def audio_batch(batch: dict, tokens: int, dim: int) -> dict:
    """The overfit batch with each frame's condition replaced by an audio window that encodes
    its mouth opening (a fixed random direction scaled by it)."""
    g = torch.Generator().manual_seed(11)
    direction = torch.randn(tokens, dim, generator=g)
    opening = batch["motion"][:, DRIVEN_KEYPOINTS[0], 1]  # (B,) mouth_open * 0.3
    return dict(batch, motion=(opening[:, None, None] * 30.0) * direction + 0.1 * torch.randn(tokens, dim, generator=g))


def test_audio_conditioned_trainer_overfits_and_trains_the_audio_tokens(batch, trained_vae):
    from stages.motion.extractor import MotionExtractor, MotionExtractorConfig

    config = IMCUNetConfig.tiny(condition="audio", audio_dim=16, audio_window_frames=1)
    audio = audio_batch(batch, config.audio_tokens, config.audio_dim)
    torch.manual_seed(0)
    # L_motion in audio mode: it needs only target_exp / target_x_c and the extractor
    weights = Stage2LossWeights(rec=0.0, perc=0.0, motion=0.1, adv=0.0, latent=1.0)
    trainer = Stage2Trainer(
        IMCUNet(config), trained_vae, MouthMask(dsize=S).array(),
        Stage2TrainConfig(lr=2e-3, alpha_lr=1e-2, warmup_steps=3, total_steps=30, loss=weights),
        extractor=MotionExtractor(MotionExtractorConfig.tiny()),
    )
    before = trainer.evaluate(audio)["latent_l1_mask"]
    project = trainer.unet.audio_tokens.project.weight
    first = trainer.step(audio, 0)
    assert set(first) == {"loss", "latent", "motion", "lr"} and np.isfinite(first["motion"])
    assert project.grad is not None and project.grad.abs().sum() > 0
    losses = [first["loss"]]
    for step in range(1, 30):
        losses.append(trainer.step(audio, step)["loss"])
    after = trainer.evaluate(audio)["latent_l1_mask"]
    print(f"\naudio-conditioned: loss {losses[0]:.4f} -> {losses[-1]:.4f}, latent L1 in mask {before:.4f} -> {after:.4f}")
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:3])
    assert after < 0.5 * before


def test_stage2_task_audio_mode_and_source_swap_reach_the_samples(tmp_path, monkeypatch):
    from transformers import HubertConfig

    import pipeline.train.tasks as tasks
    from pipeline.train.config import TrainConfig

    IMCUNet(IMCUNetConfig.tiny()).save_pretrained(str(tmp_path / "stage2"))
    HubertConfig(hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(
        str(tmp_path / "hubert"))

    class Bundle:
        size = "tiny"

        def path(self, component):
            return str(tmp_path / component)

    card = {"statistics": {"exp": {"mean": np.zeros((21, 3)).tolist(), "std": np.ones((21, 3)).tolist()}}}
    motion_task = tasks.Stage2Task(TrainConfig(), card)
    assert motion_task.model_config(Bundle()).condition == "motion"
    cfg = TrainConfig(stage2={"condition": "audio", "audio_window_frames": 1, "pairs_per_chunk": 4})
    task = tasks.Stage2Task(cfg, card)
    config = task.model_config(Bundle())
    assert (config.condition, config.audio_dim, config.audio_window_frames, config.audio_tokens) == ("audio", 24, 1, 6)
    assert config.use_rsca and config.motion_mean is None

    chunk, video = make_chunk()
    chunk["audio"] = np.random.default_rng(0).normal(size=(len(chunk["has_face"]), 2, 24)).astype(np.float32)
    monkeypatch.setattr(tasks, "decode_chunk", lambda row, crops=False: chunk)
    row = {"video_id": "v", "chunk_idx": 0}
    samples = task.sampler({"v": video}, 0, config)(row)
    assert len(samples) == 4
    for s in samples:
        assert set(s) == {"target", "reference", "motion", "target_exp", "target_x_c"}
        assert s["motion"].shape == (6, 24)  # the audio window, under the key the trainer feeds the UNet
        t = int(np.flatnonzero([np.array_equal(c, s["target"]) for c in chunk["crops"]])[0])
        frames = np.clip(np.arange(t - 1, t + 2), 0, len(chunk["has_face"]) - 1)
        np.testing.assert_array_equal(s["motion"], chunk["audio"][frames].reshape(6, 24))
        np.testing.assert_array_equal(s["target_exp"], chunk["exp"][t])
    motion_samples = motion_task.sampler({"v": video}, 0, motion_task.model_config(Bundle()))(row)
    assert all(s["motion"].shape == (21, 3) for s in motion_samples)

    # stage2.source_swap reaches the pairs, with the trainer's own hole (MouthMask() at the 256 crop)
    crops256 = chunk["crops"].repeat(4, axis=1).repeat(4, axis=2)
    monkeypatch.setattr(tasks, "decode_chunk", lambda row, crops=False: dict(chunk, crops=crops256))
    swap_task = tasks.Stage2Task(TrainConfig(stage2={"source_swap": 1.0, "pairs_per_chunk": 4}), card)
    swapped = swap_task.sampler({"v": video}, 0, swap_task.model_config(Bundle()))(row)
    hole = MouthMask().array().astype(bool)
    assert len(swapped) == 4
    for s in swapped:
        whole = [i for i, c in enumerate(crops256) if np.array_equal(c[hole], s["target"][hole])]
        seen = [i for i, c in enumerate(crops256) if np.array_equal(c[~hole], s["target"][~hole])]
        assert len(whole) == 1 and len(seen) == 1 and whole != seen
        np.testing.assert_array_equal(s["target_exp"], chunk["exp"][whole[0]])
    # validation pairs are never swapped: a val figure means the same with and without the option
    val = swap_task.sampler({"v": video}, 0, swap_task.model_config(Bundle()), split="val")(row)
    assert len(val) == 4 and all(any(np.array_equal(c, s["target"]) for c in crops256) for s in val)
    with pytest.raises(ValueError, match="source_swap"):
        TrainConfig(stage2={"source_swap": 1.5})


def test_stage1_task_sizes_a_fresh_stage1_from_options_or_the_base_bundle(tmp_path):
    import pipeline.train.tasks as tasks
    from pipeline.train.config import TrainConfig
    from pipeline.train.job import TrainError
    from stages.common.checkpoint import save_config
    from stages.motion.audio2motion import Audio2Motion, Audio2MotionConfig

    save_config(Audio2MotionConfig.tiny(), str(tmp_path / "stage1"), "Audio2Motion")

    class Bundle:
        def path(self, component):
            return str(tmp_path / component)

    def stats(shape):
        return {"mean": np.zeros(shape).tolist(), "std": np.ones(shape).tolist()}

    card = {"statistics": {"offset": stats((21, 3)), "exp": stats((21, 3)), "x_c": stats((21, 3))}}
    tiny = Audio2MotionConfig.tiny()
    kept = tasks.Stage1Task(TrainConfig(), card).model_config(Bundle())
    assert (kept.d_model, kept.n_layers, kept.n_heads) == (tiny.d_model, tiny.n_layers, tiny.n_heads)
    assert kept.max_frames == TrainConfig().stage1.clip_frames  # longer sequences are decoded in windows of it
    wider = tasks.Stage1Task(TrainConfig(stage1={"d_model": 48, "n_layers": 3, "n_heads": 4}), card).model_config(Bundle())
    assert (wider.d_model, wider.n_layers, wider.n_heads, wider.audio_dim) == (48, 3, 4, tiny.audio_dim)
    model = Audio2Motion(wider)
    assert len(model.layers) == 3 and sum(p.numel() for p in model.parameters()) > \
        sum(p.numel() for p in Audio2Motion(kept).parameters())
    with pytest.raises(TrainError, match="multiple of n_heads"):
        tasks.Stage1Task(TrainConfig(stage1={"d_model": 50, "n_heads": 4}), card).model_config(Bundle())


def test_init_from_bundle_starts_both_stages_from_the_bundles_networks(tiny_bundle):
    """A fine-tune starts from the bundle's trained weights with the bundle's own statistics
    (the corpus card's would re-scale what the weights learned); options that would change the
    network are refused; a fresh start differs, so the check can fail."""
    import dataclasses

    import pipeline.train.tasks as tasks
    from pipeline.train.config import TrainConfig
    from pipeline.train.job import TrainError
    from pipeline.weights import read_bundle_info
    from stages.motion.audio2motion import Audio2Motion

    info = read_bundle_info(tiny_bundle)

    def stats(shape, value):
        return {"mean": np.full(shape, value).tolist(), "std": np.full(shape, 2.0).tolist()}

    card = {"statistics": {name: stats((21, 3), 0.5) for name in ("offset", "exp", "x_c")}}
    saved = {"stage1": Audio2Motion.from_pretrained(info.path("stage1")),
             "stage2": IMCUNet.from_pretrained(info.path("stage2"))}
    for stage, task_class, network in (("stage1", tasks.Stage1Task, "model"), ("stage2", tasks.Stage2Task, "unet")):
        tuned = task_class(TrainConfig(init_from_bundle=True, stage1={"dropout": 0.0}), card)
        fresh = task_class(TrainConfig(), card)
        config = tuned.model_config(info)
        if stage == "stage1":
            assert config == dataclasses.replace(saved[stage].cfg, dropout=0.0, max_frames=TrainConfig().stage1.clip_frames)
        else:
            assert config == saved[stage].config
        assert fresh.model_config(info) != config  # the card's statistics
        trainers = []
        for task in (tuned, fresh):
            torch.manual_seed(123)  # not the bundle's seed
            trainers.append(task.build_trainer(info, task.model_config(info), lambda m: m, "cpu", None, seed=0))
        want = saved[stage].state_dict()
        got = getattr(trainers[0], network).state_dict()
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
        other = getattr(trainers[1], network).state_dict()
        assert any(not torch.equal(other[k], want[k]) for k in want)
        assert tuned.fine_tunes_base and not fresh.fine_tunes_base  # the bundle keeps the base's record
    with pytest.raises(TrainError, match="audio_window_after"):  # given, not the default
        tasks.Stage1Task(TrainConfig(init_from_bundle=True, stage1={"audio_window_after": 3}), card).model_config(info)
    with pytest.raises(TrainError, match="d_model"):
        tasks.Stage1Task(TrainConfig(init_from_bundle=True, stage1={"d_model": 48, "n_heads": 4}), card).model_config(info)
    with pytest.raises(TrainError, match="use_rsca"):
        tasks.Stage2Task(TrainConfig(init_from_bundle=True, stage2={"use_rsca": False}), card).model_config(info)


def test_free_running_sampling_is_refused_under_fsdp(tiny_bundle):
    """generate() reads the unwrapped Stage 1, whose weights FSDP shards: refused before training."""
    import pipeline.train.tasks as tasks
    from pipeline.train.config import TrainConfig
    from pipeline.train.job import TrainError
    from pipeline.weights import read_bundle_info

    info = read_bundle_info(tiny_bundle)
    card = {"statistics": {name: {"mean": np.zeros((21, 3)).tolist(), "std": np.ones((21, 3)).tolist()}
                           for name in ("offset", "exp", "x_c")}}
    for strategy, refused in (("fsdp", True), ("ddp", False)):
        task = tasks.Stage1Task(TrainConfig(num_workers=2, strategy=strategy, stage1={"sampling_source": "free_running"}),
                                card)
        if refused:
            with pytest.raises(TrainError, match="free_running needs strategy ddp"):
                task.build_trainer(info, task.model_config(info), lambda m: m, "cpu", None, seed=0)
        else:
            trainer = task.build_trainer(info, task.model_config(info), lambda m: m, "cpu", None, seed=0)
            assert trainer.cfg.sampling_source == "free_running"
