"""Stage 2 networks: the SD-VAE wrapper (LatentVAE) and the IMC-UNet (motion cross-attention + RSCA)."""
import copy
import json
import os

import pytest
import torch
from diffusers import AutoencoderKL

from stages.common.checkpoint import CheckpointError
from stages.completion.imc_unet import (
    IMCUNet,
    IMCUNetConfig,
    ReferenceSpatialCrossAttention,
    grid_position_code,
)
from stages.completion.vae import LatentVAE, sd_vae_config, tiny_vae_config


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------- LatentVAE


@pytest.fixture
def raw_tiny_vae():
    return AutoencoderKL.from_config(tiny_vae_config()).eval()


def test_vae_configs_share_structure():
    sd, tiny = sd_vae_config(), tiny_vae_config()
    assert sd["block_out_channels"] == [128, 256, 512, 512]
    assert sd["scaling_factor"] == 0.18215 and sd["latent_channels"] == 4
    assert {k for k in sd if sd[k] != tiny[k]} <= {"block_out_channels", "layers_per_block", "norm_num_groups", "sample_size"}
    assert LatentVAE.from_config(tiny).downsample == 8


def test_vae_encode_is_the_scaled_posterior_mode(raw_tiny_vae):
    vae = LatentVAE(copy.deepcopy(raw_tiny_vae))
    images = torch.rand(2, 3, 64, 48)
    with torch.no_grad():
        first, second = vae.encode(images), vae.encode(images)
        posterior = raw_tiny_vae.encode(images * 2 - 1).latent_dist
        expected = posterior.mean * 0.18215
        sampled = posterior.sample() * 0.18215
    assert first.shape == (2, 4, 8, 6)
    assert torch.equal(first, second)
    torch.testing.assert_close(first, expected, rtol=0, atol=1e-6)
    # A sample would differ: the determinism above is a property of the wrapper, not of the VAE.
    assert (sampled - expected).abs().max() > 1e-3


def test_vae_decode_inverts_scaling_and_maps_to_unit_range(raw_tiny_vae):
    vae = LatentVAE(copy.deepcopy(raw_tiny_vae))
    latents = torch.randn(2, 4, 8, 8) * 5  # large, so the raw decoder leaves [-1, 1]
    with torch.no_grad():
        images = vae.decode(latents)
        raw = raw_tiny_vae.decode(latents / 0.18215).sample
    assert images.shape == (2, 3, 64, 64)
    assert images.min() >= 0 and images.max() <= 1
    torch.testing.assert_close(images, ((raw + 1) / 2).clamp(0, 1), rtol=0, atol=1e-6)


def test_vae_decode_window_over_the_whole_latent_is_decode_and_takes_the_first_frames_statistics():
    torch.manual_seed(0)
    vae = LatentVAE.from_config(tiny_vae_config())
    with torch.no_grad():
        z = vae.encode(torch.rand(2, 3, 256, 256))
        full = vae.decode(z)
        # The whole grid with the frame's own statistics (a batch of one, or of one frame twice) is decode().
        torch.testing.assert_close(vae.decode_window(z[:1], (0, 32), (0, 32)), full[:1], rtol=0, atol=1e-4)
        torch.testing.assert_close(vae.decode_window(z[[1, 1]], (0, 32), (0, 32)), full[[1, 1]], rtol=0, atol=1e-4)
        window = vae.decode_window(z, (15, 32), (4, 28))
        assert window.shape == (2, 3, 8 * 17, 8 * 24)
        # Frame 1's pixels follow frame 0's GroupNorm statistics, and its own latent.
        alone = vae.decode_window(z[[1]], (15, 32), (4, 28))
        assert (window[1] - alone[0]).abs().max() > 1e-2
        torch.testing.assert_close(vae.decode_window(z[[0, 1]], (15, 32), (4, 28))[0], vae.decode_window(z[:1], (15, 32), (4, 28))[0])
        # Another frame's statistics, passed in, replace the batch's first frame's.
        first = vae.window_statistics(z[:1], (15, 32), (4, 28))
        torch.testing.assert_close(vae.decode_window(z[[1]], (15, 32), (4, 28), first)[0], window[1], rtol=0, atol=1e-5)
        with pytest.raises(ValueError, match="decode_window"):
            vae.decode_window(z[:, :3], (15, 32), (4, 28))
        with pytest.raises(ValueError, match="empty or outside"):
            vae.decode_window(z, (15, 40), (4, 28))


def test_vae_decode_window_refuses_statistics_of_another_vae_and_leaves_decode_as_it_was():
    torch.manual_seed(0)
    vae, other = LatentVAE.from_config(tiny_vae_config()), LatentVAE.from_config(tiny_vae_config())
    with torch.no_grad():
        z = vae.encode(torch.rand(1, 3, 256, 256))
        full = vae.decode(z)
        with pytest.raises(ValueError, match="no outside-window statistics"):
            vae.decode_window(z, (15, 32), (4, 28), other.window_statistics(z, (15, 32), (4, 28)))
        torch.testing.assert_close(vae.decode(z), full, rtol=0, atol=0)  # no GroupNorm left patched


def test_vae_decode_window_keeps_channels_last_activations_channels_last():
    torch.manual_seed(0)
    vae = LatentVAE.from_config(tiny_vae_config())
    with torch.no_grad():
        z = vae.encode(torch.rand(2, 3, 256, 256))
        plain = vae.decode_window(z, (15, 32), (4, 28))
        vae.vae.to(memory_format=torch.channels_last)
        formats = []
        hook = vae.vae.decoder.conv_out.register_forward_pre_hook(
            lambda module, args: formats.append(args[0].is_contiguous(memory_format=torch.channels_last)))
        last = vae.decode_window(z.contiguous(memory_format=torch.channels_last), (15, 32), (4, 28))
        hook.remove()
    assert formats == [True, True]  # the statistics' full frame, then the window: never turned back to NCHW
    torch.testing.assert_close(last, plain, rtol=0, atol=1e-5)


def test_vae_is_frozen_but_passes_gradients_to_latents():
    vae = LatentVAE.from_config(tiny_vae_config())
    assert not any(p.requires_grad for p in vae.parameters())
    latents = torch.randn(1, 4, 4, 4, requires_grad=True)
    vae.decode(latents * 0.1).sum().backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0


def test_vae_rejects_bad_shapes():
    vae = LatentVAE.from_config(tiny_vae_config())
    with pytest.raises(ValueError, match="multiple of 8"):
        vae.encode(torch.rand(1, 3, 60, 64))
    with pytest.raises(ValueError, match="RGB"):
        vae.encode(torch.rand(1, 1, 64, 64))
    with pytest.raises(ValueError, match="latents"):
        vae.decode(torch.rand(1, 3, 8, 8))


def test_vae_save_and_load_round_trip(tmp_path):
    vae = LatentVAE.from_config(tiny_vae_config())
    vae.save_pretrained(str(tmp_path))
    assert os.path.isfile(tmp_path / "diffusion_pytorch_model.safetensors")
    loaded = LatentVAE.from_pretrained(str(tmp_path))
    images = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(vae.encode(images), loaded.encode(images))
        latents = vae.encode(images)
        assert torch.equal(vae.decode(latents), loaded.decode(latents))
    assert loaded.scaling_factor == 0.18215


def test_vae_loads_a_plain_diffusers_folder(tmp_path, raw_tiny_vae):
    raw_tiny_vae.save_pretrained(str(tmp_path))
    vae = LatentVAE.from_pretrained(str(tmp_path))
    images = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        expected = raw_tiny_vae.encode(images * 2 - 1).latent_dist.mode() * 0.18215
        torch.testing.assert_close(vae.encode(images), expected, rtol=0, atol=0)


def test_vae_missing_folder_names_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        LatentVAE.from_pretrained(str(tmp_path / "nowhere"))


# ----------------------------------------------------------------------------- IMC-UNet


def unet_inputs(batch=2, height=32, width=32, num_kp=21, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, 4, height, width, generator=g),
        torch.randn(batch, num_kp, 3, generator=g),
        torch.randn(batch, 4, height, width, generator=g),
    )


def set_alphas(model: IMCUNet, value: float) -> None:
    with torch.no_grad():
        for alpha in model.rsca_alphas():
            alpha.fill_(value)


def expected_attention_layers(config: IMCUNetConfig) -> int:
    levels = len(config.block_out_channels)
    return levels * config.layers_per_block + 1 + levels * (config.layers_per_block + 1)


@pytest.fixture
def tiny_unet():
    return IMCUNet(IMCUNetConfig.tiny()).eval()


@pytest.mark.parametrize("height,width", [(32, 32), (32, 24), (31, 23)])
def test_unet_output_shape(tiny_unet, height, width):
    masked, motion, reference = unet_inputs(height=height, width=width)
    with torch.no_grad():
        out = tiny_unet(masked, motion, reference)
    assert out.shape == (2, 4, height, width)
    assert torch.isfinite(out).all()


def test_unet_rejects_mismatched_inputs(tiny_unet):
    masked, motion, reference = unet_inputs()
    with pytest.raises(ValueError, match="motion"):
        tiny_unet(masked, motion[:, :20], reference)
    with pytest.raises(ValueError, match="reference_latent"):
        tiny_unet(masked, motion, reference[..., :16])
    with pytest.raises(ValueError, match="masked_latent"):
        tiny_unet(masked[:, :3], motion, reference)


def test_rsca_alphas_start_at_zero_and_then_the_reference_is_ignored(tiny_unet):
    masked, motion, reference = unet_inputs()
    other_reference = torch.randn_like(reference)
    assert all(a.detach().item() == 0.0 for a in tiny_unet.rsca_alphas())
    with torch.no_grad():
        assert torch.equal(tiny_unet(masked, motion, reference), tiny_unet(masked, motion, other_reference))
        set_alphas(tiny_unet, 0.5)
        opened = tiny_unet(masked, motion, reference) - tiny_unet(masked, motion, other_reference)
    assert opened.abs().max() > 1e-3


def test_rsca_alpha_per_layer_covers_down_mid_and_up(tiny_unet):
    alphas = tiny_unet.rsca_alphas()
    layers = tiny_unet.transformer_layers()
    assert len(alphas) == len(layers) == expected_attention_layers(tiny_unet.config) == 7
    assert len({id(a) for a in alphas}) == len(alphas)
    names = [n for n, _ in tiny_unet.named_parameters() if n.endswith("rsca.alpha")]
    assert len(names) == len(alphas)
    assert {n.split(".")[0] for n in names} == {"down_levels", "mid", "up_levels"}
    # Each layer projects the reference with its own K/V (Eq. 10).
    assert len({id(layer.rsca.attention.to_k.weight) for layer in layers}) == len(layers)


def test_every_alpha_gets_a_gradient_at_initialisation(tiny_unet):
    tiny_unet.train()
    masked, motion, reference = unet_inputs()
    tiny_unet(masked, motion, reference).square().mean().backward()
    grads = [a.grad for a in tiny_unet.rsca_alphas()]
    assert all(g is not None and g.abs() > 0 for g in grads)


def test_concat_ablation_has_no_rsca_and_uses_the_reference():
    model = IMCUNet(IMCUNetConfig.tiny(use_rsca=False)).eval()
    assert model.rsca_alphas() == []
    assert not any("rsca" in name for name, _ in model.named_parameters())
    assert model.conv_in.in_channels == 8
    masked, motion, reference = unet_inputs()
    with torch.no_grad():
        diff = model(masked, motion, reference) - model(masked, motion, torch.randn_like(reference))
    assert diff.abs().max() > 1e-3


def test_unet_output_depends_on_motion(tiny_unet):
    masked, motion, reference = unet_inputs()
    with torch.no_grad():
        diff = tiny_unet(masked, motion, reference) - tiny_unet(masked, torch.randn_like(motion), reference)
    assert diff.abs().max() > 1e-3


def test_keypoint_order_matters_through_the_positional_encoding(tiny_unet):
    masked, motion, reference = unet_inputs()
    permuted = motion.roll(1, dims=1)  # every keypoint moves to another slot
    with torch.no_grad():
        diff = tiny_unet(masked, motion, reference) - tiny_unet(masked, permuted, reference)
        assert diff.abs().max() > 1e-3
        # Without the positional encoding the K tokens are an unordered set to every
        # cross-attention, so the same permutation changes nothing: the check above is
        # measuring the PE, not an accident of the motion values.
        tiny_unet.motion_tokens.positional_encoding.zero_()
        torch.testing.assert_close(
            tiny_unet(masked, motion, reference), tiny_unet(masked, permuted, reference), rtol=1e-5, atol=1e-5
        )
    assert tiny_unet.motion_tokens.positional_encoding.shape == (21, 32)


def test_motion_positional_encoding_is_not_zero_at_init(tiny_unet):
    pe = tiny_unet.motion_tokens.positional_encoding
    assert 0.01 < pe.std() < 0.04


def test_rsca_position_code_lets_queries_tell_reference_locations_apart():
    config = IMCUNetConfig.tiny()
    rsca = ReferenceSpatialCrossAttention(32, 4 + config.position_dim, config.position_dim, heads=2).eval()
    with torch.no_grad():
        rsca.alpha.fill_(1.0)
    tokens = torch.randn(1, 16, 32)  # a 4x4 feature map
    query_code = grid_position_code(4, 4, config.reference_position_frequencies)
    latent = torch.randn(1, 64, 4)  # an 8x8 reference, flattened
    shuffle = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    with_code = torch.cat([latent, grid_position_code(8, 8, config.reference_position_frequencies)[None]], -1)
    without_code = torch.cat([latent, torch.zeros(1, 64, config.position_dim)], -1)
    with torch.no_grad():
        # Moving the reference's content around changes the answer only when tokens carry position.
        moved = torch.cat([latent[:, shuffle], with_code[..., 4:]], -1)
        assert (rsca(tokens, query_code, with_code) - rsca(tokens, query_code, moved)).abs().max() > 1e-4
        torch.testing.assert_close(
            rsca(tokens, query_code, without_code), rsca(tokens, query_code, without_code[:, shuffle]),
            rtol=1e-5, atol=1e-5,
        )


def test_unet_sees_where_reference_content_sits(tiny_unet):
    # The reference enters only through RSCA; attention over position-free tokens would not
    # notice a spatial shuffle of the reference, the position code makes the network notice.
    masked, motion, reference = unet_inputs()
    set_alphas(tiny_unet, 1.0)
    shuffled = reference.flatten(2)[..., torch.randperm(32 * 32)].reshape(reference.shape)
    with torch.no_grad():
        diff = tiny_unet(masked, motion, reference) - tiny_unet(masked, motion, shuffled)
    assert diff.abs().max() > 1e-4


def test_grid_position_code_is_tied_to_image_location_not_resolution():
    # One cell, one frequency: centre (0.5, 0.5) -> [sin(pi/2), cos(pi/2)] per axis.
    torch.testing.assert_close(grid_position_code(1, 1, 1), torch.tensor([[1.0, 0.0, 1.0, 0.0]]), rtol=0, atol=1e-6)
    # The same image point gets the same code at any resolution: the 1x1 centre is the 3x3
    # middle cell, the 2x2 top-left centre (0.25, 0.25) is cell (1, 1) of a 6x6 grid.
    torch.testing.assert_close(grid_position_code(1, 1, 6)[0], grid_position_code(3, 3, 6).reshape(3, 3, -1)[1, 1])
    torch.testing.assert_close(grid_position_code(2, 2, 6)[0], grid_position_code(6, 6, 6).reshape(6, 6, -1)[1, 1])
    # Every cell of a 32x32 latent has its own code.
    assert torch.unique(grid_position_code(32, 32, 6), dim=0).shape == (1024, 24)


def test_unet_save_and_load_round_trip(tmp_path):
    model = IMCUNet(IMCUNetConfig.tiny()).eval()
    with torch.no_grad():
        for i, alpha in enumerate(model.rsca_alphas()):
            alpha.fill_(0.1 * (i + 1))
    model.save_pretrained(str(tmp_path))
    loaded = IMCUNet.from_pretrained(str(tmp_path))
    assert loaded.config == model.config
    masked, motion, reference = unet_inputs()
    with torch.no_grad():
        assert torch.equal(model(masked, motion, reference), loaded(masked, motion, reference))
    assert torch.equal(torch.stack(loaded.rsca_alphas()), torch.stack(model.rsca_alphas()))


def test_unet_load_into_the_wrong_config_names_the_file(tmp_path):
    IMCUNet(IMCUNetConfig.tiny()).save_pretrained(str(tmp_path))
    config_path = tmp_path / "config.json"
    data = json.loads(config_path.read_text())
    data["use_rsca"] = False
    config_path.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        IMCUNet.from_pretrained(str(tmp_path))


def test_unet_config_rejects_inconsistent_levels():
    with pytest.raises(ValueError, match="self_attention"):
        IMCUNetConfig(block_out_channels=(32, 64), self_attention=(True,))
    with pytest.raises(ValueError, match="divisible"):
        IMCUNetConfig.tiny(num_attention_heads=3)


# ----------------------------------------------------------------------------- paper size


def test_paper_size_vae_and_unet_run_once_on_cpu():
    with torch.no_grad():
        vae = LatentVAE.from_config(sd_vae_config())
        # The SD 1.x VAE (sd-vae-ft-mse) has 83,653,863 parameters.
        assert parameter_count(vae) == 83_653_863
        latents = vae.encode(torch.rand(1, 3, 256, 256))
        assert latents.shape == (1, 4, 32, 32)
        images = vae.decode(latents)
        assert images.shape == (1, 3, 256, 256)
        del vae

        unet = IMCUNet(IMCUNetConfig()).eval()
        layers = unet.transformer_layers()
        assert len(layers) == len(unet.rsca_alphas()) == expected_attention_layers(unet.config) == 21
        out = unet(latents, torch.randn(1, 21, 3) * 0.05, latents.flip(-1))
        assert out.shape == (1, 4, 32, 32) and torch.isfinite(out).all()
        print(
            f"\nparameters: SD VAE {83_653_863:,}; IMC-UNet {parameter_count(unet):,} "
            f"(RSCA {sum(parameter_count(l.rsca) for l in layers):,}, "
            f"motion cross-attention {sum(parameter_count(l.motion_attention) for l in layers):,})"
        )


# ----------------------------------------------------------------------------- motion statistics


def motion_token_parts(model: IMCUNet, motion: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(δ-driven part of the tokens (B,K,d_m), the bias part (d_m,)) of MotionTokens at init."""
    tokens = model.motion_tokens
    with torch.no_grad():
        full = tokens(motion)
        bias = tokens.project.bias
        driven = full - bias - tokens.positional_encoding
    return driven, bias


def test_motion_statistics_lift_the_delta_above_the_linear_bias():
    g = torch.Generator().manual_seed(3)
    # LivePortrait-like δ: per-keypoint means and spreads around 1e-2.
    mean = (torch.randn(21, 3, generator=g) * 1e-2).numpy()
    std = (torch.rand(21, 3, generator=g) * 1.5e-2 + 0.5e-2).numpy()
    motion = torch.from_numpy(mean) + torch.randn(256, 21, 3, generator=g) * torch.from_numpy(std)

    torch.manual_seed(0)
    plain = IMCUNet(IMCUNetConfig.tiny())
    torch.manual_seed(0)
    normalised = IMCUNet(IMCUNetConfig.tiny().with_motion_statistics(mean, std))
    ratios = {}
    for name, model in (("plain", plain), ("normalised", normalised)):
        driven, bias = motion_token_parts(model, motion.float())
        spread = driven.std(dim=0).norm(dim=-1).mean()  # std across the batch, norm over d_m, mean over K
        ratios[name] = (spread / bias.norm()).item()
    assert ratios["normalised"] >= 0.3, ratios
    assert ratios["plain"] < 0.05, ratios


def test_motion_statistics_config_round_trip_and_floor(tmp_path):
    import numpy as np

    mean = np.full((21, 3), 0.01)
    std = np.full((21, 3), 0.02)
    std[4, 1] = 0.0  # a coordinate that never moves
    config = IMCUNetConfig.tiny().with_motion_statistics(mean, std)
    assert config.motion_std[4][1] == 1e-6 and config.motion_std[0][0] == 0.02
    assert isinstance(config.motion_mean, tuple) and isinstance(config.motion_mean[0], tuple)
    with pytest.raises(ValueError, match="21, 3"):
        IMCUNetConfig.tiny().with_motion_statistics(mean[:20], std[:20])

    model = IMCUNet(config).eval()
    plain = IMCUNet(IMCUNetConfig.tiny())
    # The statistics are config, not weights: the safetensors key layout is unchanged.
    assert list(model.state_dict()) == list(plain.state_dict())
    model.save_pretrained(str(tmp_path))
    loaded = IMCUNet.from_pretrained(str(tmp_path))
    assert loaded.config == config
    masked, motion, reference = unet_inputs()
    motion = motion * 0.01
    with torch.no_grad():
        assert torch.equal(model(masked, motion, reference), loaded(masked, motion, reference))
        # and they are used: the same weights without them give another answer
        plain.load_state_dict(model.state_dict())
        assert (plain.eval()(masked, motion, reference) - model(masked, motion, reference)).abs().max() > 1e-3


# ----------------------------------------------------------------------------- gradient checkpointing


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    model = IMCUNet(IMCUNetConfig.tiny()).train()
    set_alphas(model, 0.3)  # so the RSCA path is in the gradients too
    masked, motion, reference = unet_inputs(height=16, width=16)

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(masked, motion, reference).square().mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    layer = model.transformer_layers()[0]
    calls = []
    handle = layer.register_forward_pre_hook(lambda *_: calls.append(1))
    plain_loss, plain_grads = loss_and_grads()
    plain_calls = len(calls)
    model.set_gradient_checkpointing(True)
    assert model.gradient_checkpointing
    ckpt_loss, ckpt_grads = loss_and_grads()
    handle.remove()
    # Checkpointing really ran: the layer's forward was recomputed during backward.
    assert plain_calls == 1 and len(calls) - plain_calls == 2
    torch.testing.assert_close(ckpt_loss, plain_loss, rtol=1e-6, atol=1e-7)
    assert ckpt_grads.keys() == plain_grads.keys()
    for name in plain_grads:
        torch.testing.assert_close(ckpt_grads[name], plain_grads[name], rtol=1e-5, atol=1e-7, msg=name)
    # Off again in eval / no-grad: a plain forward.
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(masked, motion, reference), model.train()(masked, motion, reference).detach())


# ----------------------------------------------------------------------------- audio-conditioned ablation


def audio_unet(**overrides) -> IMCUNet:
    torch.manual_seed(0)
    fields = dict(condition="audio", audio_dim=16, audio_window_frames=1)
    fields.update(overrides)
    return IMCUNet(IMCUNetConfig.tiny(**fields)).eval()


def audio_inputs(config: IMCUNetConfig, batch=2, size=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, 4, size, size, generator=g),
        torch.randn(batch, config.audio_tokens, config.audio_dim, generator=g),
        torch.randn(batch, 4, size, size, generator=g),
    )


def test_audio_condition_config_and_shapes():
    assert IMCUNetConfig.tiny().condition == "motion"  # the default is unchanged
    config = IMCUNetConfig.tiny(condition="audio", audio_dim=16, audio_window_frames=1)
    assert config.audio_tokens == 6  # two 50 Hz rows for each of frames t-1, t, t+1
    assert IMCUNetConfig(condition="audio").audio_tokens == 10 and IMCUNetConfig().audio_dim == 1024
    with pytest.raises(ValueError, match="condition"):
        IMCUNetConfig.tiny(condition="text")
    with pytest.raises(ValueError, match="audio_window_frames"):
        IMCUNetConfig.tiny(audio_window_frames=-1)
    model = audio_unet()
    assert not hasattr(model, "motion_tokens")
    assert model.audio_tokens.project.in_features == 16 and model.audio_tokens.project.out_features == 32
    assert model.audio_tokens.positional_encoding.shape == (6, 32)
    assert model.audio_tokens.positional_encoding.abs().max() > 0  # random, not zero
    masked, audio, reference = audio_inputs(model.config)
    with torch.no_grad():
        out = model(masked, audio, reference)
    assert out.shape == (2, 4, 16, 16) and torch.isfinite(out).all()


def test_motion_mode_parameter_names_are_unchanged(tmp_path):
    keys = set(IMCUNet(IMCUNetConfig.tiny()).state_dict())
    assert {"motion_tokens.project.weight", "motion_tokens.project.bias", "motion_tokens.positional_encoding"} <= keys
    assert not any(k.startswith("audio_tokens") for k in keys)
    audio_keys = set(audio_unet().state_dict())
    assert audio_keys - keys == {"audio_tokens.project.weight", "audio_tokens.project.bias",
                                 "audio_tokens.positional_encoding"}
    assert keys - audio_keys == {"motion_tokens.project.weight", "motion_tokens.project.bias",
                                 "motion_tokens.positional_encoding"}
    # a checkpoint written before the audio fields existed still loads, as a motion-mode net
    model = IMCUNet(IMCUNetConfig.tiny()).eval()
    model.save_pretrained(str(tmp_path))
    config_path = tmp_path / "config.json"
    data = json.loads(config_path.read_text())
    for key in ("condition", "audio_dim", "audio_window_frames"):
        del data[key]
    config_path.write_text(json.dumps(data))
    loaded = IMCUNet.from_pretrained(str(tmp_path))
    assert loaded.config.condition == "motion"
    masked, motion, reference = unet_inputs(height=16, width=16)
    with torch.no_grad():
        assert torch.equal(loaded(masked, motion, reference), model(masked, motion, reference))


def test_audio_condition_drives_the_output_and_nothing_else_changes_it():
    model = audio_unet()
    masked, audio, reference = audio_inputs(model.config)
    with torch.no_grad():
        base = model(masked, audio, reference)
        assert torch.equal(model(masked, audio.clone(), reference), base)  # same inputs, same output
        # only sample 1's audio changes: sample 1's output moves, sample 0's does not
        other = audio.clone()
        other[1] = torch.randn(other[1].shape, generator=torch.Generator().manual_seed(7))
        changed = model(masked, other, reference)
        assert (changed[1] - base[1]).abs().max() > 1e-3
        torch.testing.assert_close(changed[0], base[0], rtol=0, atol=1e-6)
        # one token's row alone matters too (the window is read, not just its first row)
        last = audio.clone()
        last[:, -1] += 1.0
        assert (model(masked, last, reference) - base).abs().max() > 1e-4
        # the reference is ignored while every alpha is 0, exactly as in motion mode
        assert torch.equal(model(masked, audio, torch.randn_like(reference)), base)


def test_audio_mode_rejects_wrong_shapes_naming_the_mode():
    model = audio_unet()
    masked, audio, reference = audio_inputs(model.config)
    with pytest.raises(ValueError, match="condition='audio'.*\\(B=2,6,16\\)"):
        model(masked, audio[:, :5], reference)
    with pytest.raises(ValueError, match="condition='audio'"):
        model(masked, torch.randn(2, 21, 3), reference)  # a motion condition given to an audio net
    with pytest.raises(ValueError, match="condition='motion'"):
        IMCUNet(IMCUNetConfig.tiny())(masked, audio, reference)  # and the other way round


def test_audio_unet_save_and_load_round_trip(tmp_path):
    model = audio_unet()
    set_alphas(model, 0.2)
    model.save_pretrained(str(tmp_path))
    loaded = IMCUNet.from_pretrained(str(tmp_path))
    assert loaded.config == model.config and loaded.config.condition == "audio"
    masked, audio, reference = audio_inputs(model.config)
    with torch.no_grad():
        assert torch.equal(model(masked, audio, reference), loaded(masked, audio, reference))


def test_a_motion_coordinate_constant_in_training_does_not_reach_the_tokens():
    # Stage 2 learns on the extractor's keypoints (x, z of the lips constant on the demo's
    # stand-in) and is driven by Stage 1's, which are 1e-5 off there: at the 1e-6 floor that
    # would be 10 standard deviations of input the network never saw.
    import numpy as np

    mean = np.zeros((21, 3))
    std = np.full((21, 3), 0.02)
    std[:, [0, 2]] = 0.0
    tokens = IMCUNet(IMCUNetConfig.tiny().with_motion_statistics(mean, std)).motion_tokens
    motion = torch.randn(4, 21, 3) * 0.02
    motion[..., [0, 2]] = 0.0
    nudged = motion.clone()
    nudged[..., [0, 2]] += 1e-5
    with torch.no_grad():
        torch.testing.assert_close(tokens(nudged), tokens(motion), rtol=0, atol=0)
        moved = motion.clone()
        moved[:, 5, 1] += 0.02
        assert (tokens(moved) - tokens(motion)).abs().max() > 1e-3
