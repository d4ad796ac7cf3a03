"""Stage 2 losses: VGG-19 layout and loading, perceptual/L1/motion/adversarial terms, Eq. 15."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from stages.common.checkpoint import CheckpointError
from stages.completion.discriminator import PatchDiscriminator, PatchDiscriminatorConfig
from stages.completion.losses import (
    MotionLoss,
    PerceptualLoss,
    Stage2Loss,
    Stage2LossWeights,
    adversarial_generator_loss,
    discriminator_loss,
    reconstruction_loss,
)
from stages.completion.vgg import VGG19, VGG19_PERCEPTUAL_LAYERS
from stages.motion.extractor import MotionExtractor, MotionExtractorConfig, motion_info

# torchvision vgg19, written out from the architecture: (features index, in, out) per 3x3 conv,
# then the three classifier linears. Pools sit at 4, 9, 18, 27, 36.
VGG19_CONVS = [
    (0, 3, 64), (2, 64, 64),
    (5, 64, 128), (7, 128, 128),
    (10, 128, 256), (12, 256, 256), (14, 256, 256), (16, 256, 256),
    (19, 256, 512), (21, 512, 512), (23, 512, 512), (25, 512, 512),
    (28, 512, 512), (30, 512, 512), (32, 512, 512), (34, 512, 512),
]  # fmt: skip
VGG19_POOLS = (4, 9, 18, 27, 36)


def vgg19_layout(div: int = 1, include_classifier: bool = True) -> list[tuple[str, tuple[int, ...]]]:
    layout = []
    for idx, cin, cout in VGG19_CONVS:
        cin = cin if idx == 0 else cin // div
        layout += [(f"features.{idx}.weight", (cout // div, cin, 3, 3)), (f"features.{idx}.bias", (cout // div,))]
    if include_classifier:
        hidden = 4096 // div
        for idx, (cout, cin) in zip((0, 3, 6), ((hidden, 512 // div * 49), (hidden, hidden), (1000, hidden))):
            layout += [(f"classifier.{idx}.weight", (cout, cin)), (f"classifier.{idx}.bias", (cout,))]
    return layout


def random_torchvision_file(path, div: int, include_classifier: bool = True) -> dict[str, torch.Tensor]:
    state = {k: torch.randn(shape) * 0.1 for k, shape in vgg19_layout(div, include_classifier)}
    torch.save(state, path)
    return state


def reference_vgg_features(state: dict[str, torch.Tensor], x: torch.Tensor, upto: int) -> dict[int, torch.Tensor]:
    """Independent VGG-19 forward from a torchvision-layout dict: index -> activation after it."""
    out = {}
    convs = {idx for idx, _, _ in VGG19_CONVS}
    for i in range(upto + 1):
        if i in convs:
            x = F.conv2d(x, state[f"features.{i}.weight"], state[f"features.{i}.bias"], padding=1)
        elif i in VGG19_POOLS:
            x = F.max_pool2d(x, 2)
        else:  # ReLU after each conv
            x = F.relu(x)
        out[i] = x
    return out


def count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.fixture
def tiny_extractor():
    return MotionExtractor(MotionExtractorConfig.tiny())


# ----------------------------------------------------------------------------- VGG-19


def test_vgg19_full_size_matches_torchvision_layout():
    with torch.device("meta"):  # no memory, no init cost
        full = VGG19()
        headless = VGG19(include_classifier=False)
    got = [(k, tuple(v.shape)) for k, v in full.state_dict().items()]
    assert got == vgg19_layout()
    assert len(got) == 38
    assert sum(p.numel() for p in full.parameters()) == 143_667_240
    assert [(k, tuple(v.shape)) for k, v in headless.state_dict().items()] == vgg19_layout(include_classifier=False)
    assert [i for i, m in enumerate(full.features) if isinstance(m, torch.nn.MaxPool2d)] == list(VGG19_POOLS)
    # the perceptual layers are the ReLUs closing each block: conv at i-1, pool (or end) at i+1
    for i in VGG19_PERCEPTUAL_LAYERS:
        assert isinstance(full.features[i], torch.nn.ReLU)
        assert i + 1 in VGG19_POOLS


def test_vgg19_torchvision_file_loads_strictly_and_matches_reference(tmp_path):
    path = tmp_path / "vgg19-tiny.pth"
    state = random_torchvision_file(path, div=16)
    x = torch.rand(2, 3, 32, 32)

    vgg = VGG19.from_pretrained(str(path), include_classifier=False, width_div=16)
    assert vgg.classifier is None  # classifier keys in the file ignored on purpose
    ref = reference_vgg_features(state, x, upto=36)
    feats = vgg.feature_maps(x, VGG19_PERCEPTUAL_LAYERS)
    for i, f in zip(VGG19_PERCEPTUAL_LAYERS, feats):
        torch.testing.assert_close(f, ref[i], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(vgg(x), ref[36], rtol=1e-5, atol=1e-6)

    with_head = VGG19.from_pretrained(str(path), include_classifier=True, width_div=16)
    pooled = torch.flatten(F.adaptive_avg_pool2d(ref[36], 7), 1)
    h = F.relu(F.linear(pooled, state["classifier.0.weight"], state["classifier.0.bias"]))
    h = F.relu(F.linear(h, state["classifier.3.weight"], state["classifier.3.bias"]))
    logits = F.linear(h, state["classifier.6.weight"], state["classifier.6.bias"])
    torch.testing.assert_close(with_head(x), logits, rtol=1e-5, atol=1e-6)

    # save_pretrained writes the same flat layout back, and it reloads to identical outputs
    out = tmp_path / "saved" / "vgg19.pth"
    with_head.save_pretrained(str(out))
    saved = torch.load(out, weights_only=True)
    assert list(saved) == [k for k, _ in vgg19_layout(16)]
    assert all(torch.equal(saved[k], state[k]) for k in state)
    again = VGG19.from_pretrained(str(out), include_classifier=True, width_div=16)
    assert torch.equal(again(x), with_head(x))


def test_vgg19_wrong_shape_names_file_and_tensor(tmp_path):
    path = tmp_path / "bad.pth"
    state = random_torchvision_file(path, div=16)
    state["features.21.weight"] = torch.randn(32, 16, 3, 3)  # the network expects (512/16, 512/16, 3, 3)
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"bad\.pth.*features\.21\.weight"):
        VGG19.from_pretrained(str(path), width_div=16)
    # a full-size model pointed at a tiny file fails on the very first tensor
    good = tmp_path / "tiny.pth"
    random_torchvision_file(good, div=16)
    with pytest.raises(CheckpointError, match=r"tiny\.pth.*features\.0\.weight"):
        VGG19.from_pretrained(str(good))
    with pytest.raises(CheckpointError, match="missing.pth"):
        VGG19.from_pretrained(str(tmp_path / "missing.pth"))


def test_vgg19_classifier_keys_ignored_only_without_classifier(tmp_path):
    headless = tmp_path / "features_only.pth"
    random_torchvision_file(headless, div=16, include_classifier=False)
    VGG19.from_pretrained(str(headless), include_classifier=False, width_div=16)  # loads
    with pytest.raises(CheckpointError, match=r"features_only\.pth.*classifier\.0\.weight"):
        VGG19.from_pretrained(str(headless), include_classifier=True, width_div=16)
    # only classifier.* is forgiven: any other stray key is still an error
    stray = tmp_path / "stray.pth"
    state = random_torchvision_file(stray, div=16)
    state["features.99.weight"] = torch.zeros(1)
    torch.save(state, stray)
    with pytest.raises(CheckpointError, match=r"stray\.pth.*features\.99\.weight"):
        VGG19.from_pretrained(str(stray), include_classifier=False, width_div=16)


def test_feature_maps_follow_requested_order():
    vgg = VGG19(include_classifier=False, width_div=16)
    x = torch.rand(1, 3, 32, 32)
    a, b = vgg.feature_maps(x, (8, 3))
    assert a.shape == (1, 128 // 16, 16, 16) and b.shape == (1, 64 // 16, 32, 32)
    with pytest.raises(ValueError, match="37"):
        vgg.feature_maps(x, (37,))


# ----------------------------------------------------------------------------- L1 / perceptual


def test_reconstruction_loss_is_mean_l1():
    target = torch.rand(2, 3, 16, 16)
    assert reconstruction_loss(target, target.clone()).item() == 0.0
    pred = target.clone()
    pred[:, :, :8] += 0.25  # half the pixels off by 0.25
    assert reconstruction_loss(pred, target).item() == pytest.approx(0.125, rel=1e-5)


def test_perceptual_loss_value_gradient_and_frozen_vgg():
    vgg = VGG19(include_classifier=False, width_div=16)
    loss_fn = PerceptualLoss(vgg)
    target = torch.rand(2, 3, 32, 32)
    assert loss_fn(target, target.clone()).item() == 0.0

    pred = (target + 0.1 * torch.randn_like(target)).clamp(0, 1).requires_grad_(True)
    loss = loss_fn(pred, target)
    # Eq. 12 by hand: ImageNet-normalised inputs, mean squared error per layer, summed
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        fp = vgg.feature_maps((pred - mean) / std, VGG19_PERCEPTUAL_LAYERS)
        ft = vgg.feature_maps((target - mean) / std, VGG19_PERCEPTUAL_LAYERS)
        expected = sum(((a - b) ** 2).mean() for a, b in zip(fp, ft))
    assert loss.item() > 0
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)

    loss.backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in vgg.parameters())
    loss_fn.train()
    assert not vgg.training  # frozen network stays in eval mode
    # ImageNet mean/std are not saved: the loss's state is exactly the VGG's
    assert list(loss_fn.state_dict()) == ["vgg." + k for k in vgg.state_dict()]


# ----------------------------------------------------------------------------- motion


def test_motion_loss_gradients_reach_generated_image(tiny_extractor):
    loss_fn = MotionLoss(tiny_extractor, lambda_c=0.1)
    generated = torch.rand(2, 3, 256, 256, requires_grad=True)
    target_exp = torch.randn(2, 21, 3) * 0.02
    target_x_c = torch.randn(2, 21, 3) * 0.2
    loss = loss_fn(generated, target_exp, target_x_c)
    assert loss.item() > 0
    loss.backward()
    assert generated.grad is not None and generated.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny_extractor.parameters())


def test_motion_loss_zero_on_own_outputs(tiny_extractor):
    image = torch.rand(2, 3, 256, 256)
    with torch.no_grad():
        info = motion_info(tiny_extractor(image))
    loss = MotionLoss(tiny_extractor, lambda_c=0.5)(image, info["exp"], info["x_c"])
    assert loss.item() == 0.0


def test_lambda_c_scales_only_the_x_c_term(tiny_extractor):
    image = torch.rand(1, 3, 256, 256)
    target_exp = torch.randn(1, 21, 3) * 0.02
    target_x_c = torch.randn(1, 21, 3) * 0.2
    with torch.no_grad():
        info = motion_info(tiny_extractor(image))
        exp_term = (info["exp"] - target_exp).abs().mean()
        x_c_term = (info["x_c"] - target_x_c).abs().mean()
        for lambda_c in (0.1, 2.0):
            loss = MotionLoss(tiny_extractor, lambda_c=lambda_c)(image, target_exp, target_x_c)
            assert loss.item() == pytest.approx((exp_term + lambda_c * x_c_term).item(), rel=1e-5)
        # and the x_c target only matters through λ_c
        zero_c = MotionLoss(tiny_extractor, lambda_c=0.0)
        assert zero_c(image, target_exp, target_x_c).item() == pytest.approx(exp_term.item(), rel=1e-6)
        assert zero_c(image, target_exp, target_x_c + 5.0).item() == zero_c(image, target_exp, target_x_c).item()


def test_motion_loss_keypoint_subset(tiny_extractor):
    image = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        info = motion_info(tiny_extractor(image))
        lips = (6, 12, 14, 17, 19, 20)
        loss_fn = MotionLoss(tiny_extractor, lambda_c=0.0, keypoints=lips)
        off_lip = info["exp"].clone()
        off_lip[:, 0] += 1.0  # keypoint 0 is not a lip keypoint
        assert loss_fn(image, off_lip, info["x_c"]).item() == 0.0
        on_lip = info["exp"].clone()
        on_lip[:, 19] += 1.0
        # one of 6 keypoints off by 1 in all 3 coordinates -> mean |Δ| = 3 / 18
        assert loss_fn(image, on_lip, info["x_c"]).item() == pytest.approx(3 / 18, rel=1e-5)


# ----------------------------------------------------------------------------- discriminator / GAN


def conv_out(size: int, stride: int) -> int:
    return (size + 2 - 4) // stride + 1  # 4x4 kernel, padding 1


@pytest.mark.parametrize("config", [PatchDiscriminatorConfig(), PatchDiscriminatorConfig.tiny()], ids=["paper", "tiny"])
def test_discriminator_patch_map_shape(config):
    size = 256
    size = conv_out(size, 2)
    for n in range(1, config.n_layers + 1):
        size = conv_out(size, 2 if n < config.n_layers else 1)
    size = conv_out(size, 1)
    out = PatchDiscriminator(config)(torch.rand(2, 3, 256, 256))
    assert out.shape == (2, 1, size, size) and size > 1
    if config == PatchDiscriminatorConfig():
        assert size == 30  # pix2pix's 70x70 PatchGAN at 256²


def test_discriminator_loss_prefers_correct_predictions():
    confident_real = torch.full((2, 1, 4, 4), 3.0)
    confident_fake = torch.full((2, 1, 4, 4), -3.0)
    correct = discriminator_loss(confident_real, confident_fake)
    swapped = discriminator_loss(confident_fake, confident_real)
    assert correct.item() < swapped.item()
    expected = 0.5 * (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(-1.0)))  # real 2, fake -1
    assert discriminator_loss(torch.full((1, 1, 3, 3), 2.0), torch.full((1, 1, 3, 3), -1.0)).item() == pytest.approx(
        expected, rel=1e-6
    )


def test_generator_loss_is_negative_log_sigmoid():
    logits = torch.tensor([[[[0.7, -1.3], [2.0, 0.0]]]])
    expected = -torch.log(torch.sigmoid(logits)).mean()
    assert adversarial_generator_loss(logits).item() == pytest.approx(expected.item(), rel=1e-6)
    assert adversarial_generator_loss(torch.zeros(1, 1, 2, 2)).item() == pytest.approx(math.log(2), rel=1e-6)
    # non-saturating: a confident D still gives a finite, large loss and gradient
    far = torch.full((1, 1, 1, 1), -100.0, requires_grad=True)
    adversarial_generator_loss(far).backward()
    assert adversarial_generator_loss(far).item() == pytest.approx(100.0, rel=1e-6)
    assert far.grad.item() == pytest.approx(-1.0, rel=1e-6)


def test_discriminator_save_load_round_trip(tmp_path):
    disc = PatchDiscriminator(PatchDiscriminatorConfig.tiny())
    x = torch.rand(2, 3, 64, 64)
    disc.save_pretrained(str(tmp_path / "d"))
    loaded = PatchDiscriminator.from_pretrained(str(tmp_path / "d"))
    assert loaded.config == disc.config
    assert torch.equal(loaded(x), disc(x))
    with pytest.raises(CheckpointError, match="config.json"):
        PatchDiscriminator.from_pretrained(str(tmp_path / "nowhere"))


# ----------------------------------------------------------------------------- Eq. 15


def build_stage2_loss(weights: Stage2LossWeights, extractor):
    vgg = VGG19(include_classifier=False, width_div=16)
    disc = PatchDiscriminator(PatchDiscriminatorConfig.tiny())
    # feature_maps runs the layers itself, so count calls of VGG's first conv
    calls = {"perc": count_calls(vgg.features[0]), "motion": count_calls(extractor), "adv": count_calls(disc)}
    loss = Stage2Loss(weights, PerceptualLoss(vgg), MotionLoss(extractor, lambda_c=weights.lambda_c), disc)
    return loss, calls


def stage2_inputs():
    generated = torch.rand(1, 3, 256, 256, requires_grad=True)
    target = torch.rand(1, 3, 256, 256)
    return generated, target, torch.randn(1, 21, 3) * 0.02, torch.randn(1, 21, 3) * 0.2


def test_stage2_total_is_weighted_sum_of_parts(tiny_extractor):
    weights = Stage2LossWeights(rec=1.0, perc=0.5, motion=2.0, adv=0.3, lambda_c=0.1)
    loss_fn, calls = build_stage2_loss(weights, tiny_extractor)
    generated, target, exp, x_c = stage2_inputs()
    total, parts = loss_fn(generated, target, exp, x_c)
    assert set(parts) == {"rec", "perc", "motion", "adv"}
    assert all(v.item() > 0 for v in parts.values())
    expected = 1.0 * parts["rec"] + 0.5 * parts["perc"] + 2.0 * parts["motion"] + 0.3 * parts["adv"]
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    # each part equals its stand-alone function
    assert parts["rec"].item() == reconstruction_loss(generated, target).item()
    assert parts["adv"].item() == pytest.approx(adversarial_generator_loss(loss_fn.discriminator(generated)).item())
    assert {k: c[0] for k, c in calls.items()} == {"perc": 2, "motion": 1, "adv": 2}  # perc: pred + target
    total.backward()
    assert generated.grad.abs().sum() > 0


def test_stage2_zero_weights_skip_terms(tiny_extractor):
    weights = Stage2LossWeights(rec=1.0, perc=0.0, motion=0.0, adv=0.0)
    loss_fn, calls = build_stage2_loss(weights, tiny_extractor)
    generated, target, exp, x_c = stage2_inputs()
    total, parts = loss_fn(generated, target, exp, x_c)
    assert set(parts) == {"rec"}
    assert {k: c[0] for k, c in calls.items()} == {"perc": 0, "motion": 0, "adv": 0}
    assert total.item() == reconstruction_loss(generated, target).item()

    # the skipped modules may then be absent altogether
    only_motion = Stage2Loss(Stage2LossWeights(rec=0.0, perc=0.0, adv=0.0), None, MotionLoss(tiny_extractor), None)
    calls_motion = count_calls(tiny_extractor)
    total, parts = only_motion(generated, target, exp, x_c)
    assert set(parts) == {"motion"} and calls_motion[0] == 1
    assert total.item() == parts["motion"].item()
    total.backward()  # the motion term alone still trains the generator
    assert generated.grad.abs().sum() > 0


def test_stage2_rejects_inconsistent_configuration(tiny_extractor):
    with pytest.raises(ValueError, match="perc"):
        Stage2Loss(Stage2LossWeights(), None, MotionLoss(tiny_extractor), PatchDiscriminator(PatchDiscriminatorConfig.tiny()))
    with pytest.raises(ValueError, match="lambda_c"):
        Stage2Loss(Stage2LossWeights(rec=1.0, perc=0.0, adv=0.0, lambda_c=0.1), None, MotionLoss(tiny_extractor, lambda_c=0.5), None)
    with pytest.raises(ValueError, match="all Stage 2 loss weights are 0"):
        Stage2Loss(Stage2LossWeights(rec=0.0, perc=0.0, motion=0.0, adv=0.0), None, None, None)
