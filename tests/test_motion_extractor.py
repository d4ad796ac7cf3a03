import math
import os
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stages.common.checkpoint import CheckpointError
from stages.motion.extractor import (
    CONFIG_NAME,
    LIP_KEYPOINTS,
    NUM_BINS,
    NUM_KEYPOINTS,
    WEIGHTS_NAME,
    MotionExtractor,
    MotionExtractorConfig,
    bins_to_degrees,
    driven_keypoints,
    extract_motion,
    motion_info,
    rotation_matrix,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMITTED_TSV = os.path.join(REPO_ROOT, "stages", "motion", "motion_extractor_keys.tsv")
SHARED_TSV = os.path.join(REPO_ROOT, "..", "shared", "reference", "motion_extractor_keys.tsv")
RAW_SHAPES = {"pitch": (66,), "yaw": (66,), "roll": (66,), "t": (3,), "exp": (63,), "scale": (1,), "kp": (63,)}


def read_tsv(path):
    with open(path) as f:
        lines = f.read().splitlines()
    assert lines[0] == "key\tshape"
    rows = [line.split("\t") for line in lines[1:] if line]
    return [(key, tuple(int(d) for d in shape.split("x"))) for key, shape in rows]


def random_layout_state(config, seed=0):
    """A checkpoint as LivePortrait ships it: a flat OrderedDict of fp32 tensors with `detector.` keys."""
    g = torch.Generator().manual_seed(seed)
    shapes = {k: v.shape for k, v in MotionExtractor(config).state_dict().items()}
    state = OrderedDict()
    for key, shape in shapes.items():
        # 1-D weights are LayerNorm scales: keep them near 1. GRN params are non-zero, so GRN acts.
        base = 1.0 if key.endswith("weight") and len(shape) == 1 else 0.0
        state[key] = base + 0.2 * torch.randn(shape, generator=g)
    return state


def tiny_model(seed=0):
    model = MotionExtractor(MotionExtractorConfig.tiny())
    model.load_state_dict(random_layout_state(MotionExtractorConfig.tiny(), seed))
    return model.eval()


def image(batch=2, seed=1):
    return torch.rand(batch, 3, 256, 256, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- layout


def test_constants():
    assert NUM_KEYPOINTS == 21 and NUM_BINS == 66
    assert LIP_KEYPOINTS == (6, 12, 14, 17, 19, 20)


def test_committed_tsv_matches_shared_reference_when_present():
    committed = read_tsv(COMMITTED_TSV)
    assert len(committed) == 212
    assert sum(math.prod(shape) for _, shape in committed) == 28_118_728
    if os.path.exists(SHARED_TSV):  # CI has ../shared only sometimes; the committed copy is what we test against
        assert read_tsv(SHARED_TSV) == committed


def test_paper_model_state_dict_matches_liveportrait_keys_and_forward_shapes():
    model = MotionExtractor().eval()
    state = model.state_dict()
    assert [(k, tuple(v.shape)) for k, v in state.items()] == read_tsv(COMMITTED_TSV)
    assert len(state) == 212
    assert sum(p.numel() for p in model.parameters()) == 28_118_728
    assert all(v.dtype == torch.float32 for v in state.values())

    spatial = []
    hooks = [s.register_forward_hook(lambda m, i, o: spatial.append(tuple(o.shape[1:]))) for s in model.detector.stages]
    with torch.no_grad():
        raw = model(image(batch=1))
    for h in hooks:
        h.remove()
    assert spatial == [(96, 64, 64), (192, 32, 32), (384, 16, 16), (768, 8, 8)]
    assert {k: tuple(v.shape) for k, v in raw.items()} == {k: (1,) + s for k, s in RAW_SHAPES.items()}
    assert all(torch.isfinite(v).all() for v in raw.values())


# ----------------------------------------------------------------------------- numerics of the network


def reference_forward(state, x, eps=1e-6):
    """The forward written out functionally from the LivePortrait description, independent of the module code."""
    p = {k[len("detector."):]: v for k, v in state.items()}

    def ln_channels_first(x, w, b):
        u = x.mean(1, keepdim=True)
        s = ((x - u) ** 2).mean(1, keepdim=True)
        return w[:, None, None] * ((x - u) / torch.sqrt(s + eps)) + b[:, None, None]

    num_stages = 1 + max(int(k.split(".")[1]) for k in p if k.startswith("stages."))
    for i in range(num_stages):
        d = f"downsample_layers.{i}"
        if i == 0:
            x = F.conv2d(x, p[f"{d}.0.weight"], p[f"{d}.0.bias"], stride=4)
            x = ln_channels_first(x, p[f"{d}.1.weight"], p[f"{d}.1.bias"])
        else:
            x = ln_channels_first(x, p[f"{d}.0.weight"], p[f"{d}.0.bias"])
            x = F.conv2d(x, p[f"{d}.1.weight"], p[f"{d}.1.bias"], stride=2)
        j = 0
        while f"stages.{i}.{j}.dwconv.weight" in p:
            b = f"stages.{i}.{j}"
            c = x.shape[1]
            y = F.conv2d(x, p[f"{b}.dwconv.weight"], p[f"{b}.dwconv.bias"], padding=3, groups=c).permute(0, 2, 3, 1)
            y = F.layer_norm(y, (c,), p[f"{b}.norm.weight"], p[f"{b}.norm.bias"], eps)
            y = F.gelu(F.linear(y, p[f"{b}.pwconv1.weight"], p[f"{b}.pwconv1.bias"]))
            gx = torch.sqrt((y**2).sum(dim=(1, 2), keepdim=True))
            nx = gx / (gx.mean(-1, keepdim=True) + eps)
            y = p[f"{b}.grn.gamma"] * (y * nx) + p[f"{b}.grn.beta"] + y
            y = F.linear(y, p[f"{b}.pwconv2.weight"], p[f"{b}.pwconv2.bias"])
            x = x + y.permute(0, 3, 1, 2)
            j += 1
    feat = F.layer_norm(x.mean((2, 3)), (x.shape[1],), p["norm.weight"], p["norm.bias"], eps)
    return {k: F.linear(feat, p[f"fc_{k}.weight"], p[f"fc_{k}.bias"]) for k in RAW_SHAPES}


def test_forward_matches_functional_reference_and_grn_is_active():
    config = MotionExtractorConfig.tiny()
    state = random_layout_state(config)
    model = MotionExtractor(config)
    model.load_state_dict(state)
    x = image()
    with torch.no_grad():
        raw = model(x)
        expected = reference_forward(state, x)
        # GRN must matter, or the comparison above would not test it.
        no_grn = {k: (torch.zeros_like(v) if ".grn." in k else v) for k, v in state.items()}
        without_grn = reference_forward(no_grn, x)
    assert {k: tuple(v.shape) for k, v in raw.items()} == {k: (2,) + s for k, s in RAW_SHAPES.items()}
    for key in RAW_SHAPES:
        torch.testing.assert_close(raw[key], expected[key], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(raw["kp"], without_grn["kp"], atol=1e-3)


def test_gelu_is_exact_erf_form():
    model = MotionExtractor(MotionExtractorConfig.tiny())
    assert model.detector.stages[0][0].act.approximate == "none"


# ----------------------------------------------------------------------------- checkpoints


def test_liveportrait_layout_pth_loads_strictly_with_identical_outputs(tmp_path):
    config = MotionExtractorConfig.tiny()
    state = random_layout_state(config, seed=3)
    path = str(tmp_path / "motion_extractor.pth")
    torch.save(state, path)

    loaded = MotionExtractor.from_pretrained(path, config=config)
    assert not loaded.training
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, state[key]), key
    x = image()
    with torch.no_grad():
        got = loaded(x)
        expected = reference_forward(state, x)
    for key in RAW_SHAPES:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-5)


def test_save_pretrained_round_trip_is_identical_and_records_non_paper_config(tmp_path):
    model = tiny_model(seed=4)
    folder = str(tmp_path / "me")
    model.save_pretrained(folder)
    assert sorted(os.listdir(folder)) == sorted([WEIGHTS_NAME, CONFIG_NAME])

    saved = torch.load(os.path.join(folder, WEIGHTS_NAME), weights_only=True)
    assert isinstance(saved, dict)
    assert list(saved) == list(model.state_dict())
    assert all(k.startswith("detector.") for k in saved)

    loaded = MotionExtractor.from_pretrained(folder)  # config comes from the folder
    assert loaded.config == MotionExtractorConfig.tiny()
    x = image()
    with torch.no_grad():
        a, b = model(x), loaded(x)
    for key in RAW_SHAPES:
        assert torch.equal(a[key], b[key]), key


def test_paper_config_writes_no_config_file_and_removes_a_stale_one(tmp_path, monkeypatch):
    import stages.motion.extractor as extractor

    # Stand tiny in for the paper size to exercise that branch without a 112 MB write.
    monkeypatch.setattr(extractor, "PAPER_CONFIG", MotionExtractorConfig.tiny())
    folder = tmp_path / "me"
    folder.mkdir()
    (folder / CONFIG_NAME).write_text('{"depths": [9, 9, 9, 9]}')
    tiny_model().save_pretrained(str(folder))
    assert os.listdir(folder) == [WEIGHTS_NAME]


def test_wrong_shape_names_file_and_tensor(tmp_path):
    config = MotionExtractorConfig.tiny()
    state = random_layout_state(config)
    state["detector.fc_exp.weight"] = torch.zeros(60, 64)
    path = str(tmp_path / "bad_shape.pth")
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        MotionExtractor.from_pretrained(path, config=config)
    assert path in str(err.value) and "detector.fc_exp.weight" in str(err.value)


def test_missing_key_names_file_and_tensor(tmp_path):
    config = MotionExtractorConfig.tiny()
    state = random_layout_state(config)
    del state["detector.stages.2.0.grn.gamma"]
    path = str(tmp_path / "missing.pth")
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        MotionExtractor.from_pretrained(path, config=config)
    assert path in str(err.value) and "detector.stages.2.0.grn.gamma" in str(err.value)


def test_paper_default_rejects_tiny_checkpoint(tmp_path):
    path = str(tmp_path / "tiny.pth")
    torch.save(random_layout_state(MotionExtractorConfig.tiny()), path)
    with pytest.raises(CheckpointError) as err:
        MotionExtractor.from_pretrained(path)
    assert path in str(err.value) and "detector.stages.0.1.dwconv.weight" in str(err.value)  # first missing block


def test_truncated_corrupt_or_non_dict_file_names_the_file(tmp_path):
    config = MotionExtractorConfig.tiny()
    good = tmp_path / "good.pth"
    torch.save(random_layout_state(config), str(good))
    data = good.read_bytes()

    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all" * 10)
    a_list = tmp_path / "list.pth"
    torch.save([torch.zeros(3)], str(a_list))
    for path in (truncated, garbage, a_list, tmp_path / "absent.pth", tmp_path):
        with pytest.raises(CheckpointError) as err:
            MotionExtractor.from_pretrained(str(path), config=config)
        assert str(path) in str(err.value)


# ----------------------------------------------------------------------------- post-processing


@pytest.mark.parametrize("index", [0, 1, 32, 33, 65])
def test_bins_to_degrees_one_hot_is_exact(index):
    logits = torch.zeros(2, 66)
    logits[:, index] = 1e4
    assert torch.equal(bins_to_degrees(logits), torch.full((2,), index * 3 - 97.5))


def test_bins_to_degrees_uniform_is_zero_and_range_is_bounded():
    assert torch.allclose(bins_to_degrees(torch.zeros(3, 66)), torch.zeros(3), atol=1e-5)
    degrees = bins_to_degrees(10 * torch.randn(100, 66))
    assert degrees.shape == (100,) and (degrees.abs() <= 97.5).all()


def test_rotation_matrix_is_a_rotation():
    angles = (torch.rand(3, 64) - 0.5) * 190
    R = rotation_matrix(*angles)
    assert R.shape == (64, 3, 3)
    torch.testing.assert_close(R @ R.transpose(1, 2), torch.eye(3).expand(64, 3, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.linalg.det(R), torch.ones(64), atol=1e-5, rtol=0)


def test_rotation_matrix_closed_forms():
    zero, ninety = torch.zeros(1), torch.full((1,), 90.0)
    # (Rz Ry Rx)^T with a single non-zero angle is the transpose of that axis' matrix.
    yaw90 = torch.tensor([[0.0, 0, -1], [0, 1, 0], [1, 0, 0]])  # Ry(90)^T
    pitch90 = torch.tensor([[1.0, 0, 0], [0, 0, 1], [0, -1, 0]])  # Rx(90)^T
    roll90 = torch.tensor([[0.0, 1, 0], [-1, 0, 0], [0, 0, 1]])  # Rz(90)^T
    torch.testing.assert_close(rotation_matrix(zero, ninety, zero)[0], yaw90, atol=1e-6, rtol=0)
    torch.testing.assert_close(rotation_matrix(ninety, zero, zero)[0], pitch90, atol=1e-6, rtol=0)
    torch.testing.assert_close(rotation_matrix(zero, zero, ninety)[0], roll90, atol=1e-6, rtol=0)

    # Composition order: (Rz Ry Rx)^T = Rx^T Ry^T Rz^T.
    p, y, r = torch.tensor([20.0]), torch.tensor([-35.0]), torch.tensor([50.0])
    composed = rotation_matrix(p, zero, zero) @ rotation_matrix(zero, y, zero) @ rotation_matrix(zero, zero, r)
    torch.testing.assert_close(rotation_matrix(p, y, r), composed, atol=1e-6, rtol=0)
    a = math.radians(30.0)
    ry = torch.tensor([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])
    torch.testing.assert_close(rotation_matrix(zero, torch.tensor([30.0]), zero)[0], ry.T, atol=1e-6, rtol=0)


def test_driven_keypoints_by_hand_and_ignores_tz():
    x_c = torch.tensor([[[1.0, 2.0, 3.0], [-1.0, 0.5, 0.0]]])
    exp = torch.tensor([[[0.1, 0.0, -0.2], [0.0, 0.3, 0.0]]])
    R = torch.tensor([[[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]])
    scale = torch.tensor([[2.0]])
    t = torch.tensor([[0.5, -1.0, 7.0]])
    expected = []
    for k in range(2):
        row = [sum(x_c[0, k, i].item() * R[0, i, j].item() for i in range(3)) + exp[0, k, j].item() for j in range(3)]
        expected.append([2.0 * row[0] + 0.5, 2.0 * row[1] - 1.0, 2.0 * row[2]])
    got = driven_keypoints(x_c, R, exp, scale, t)
    torch.testing.assert_close(got, torch.tensor([expected]))
    # kp0: x_c@R = (-2, 1, 3); +exp = (-1.9, 1, 2.8); *2 + (0.5,-1,0) = (-3.3, 1, 5.6)
    torch.testing.assert_close(got[0, 0], torch.tensor([-3.3, 1.0, 5.6]))
    t_other_z = t.clone()
    t_other_z[0, 2] = -100.0
    assert torch.equal(driven_keypoints(x_c, R, exp, scale, t_other_z), got)


def test_motion_info_reshapes_row_major_and_applies_eq1():
    model = tiny_model()
    with torch.no_grad():
        raw = model(image())
    info = motion_info(raw)
    shapes = {"x_c": (2, 21, 3), "exp": (2, 21, 3), "pitch": (2,), "yaw": (2,), "roll": (2,), "R": (2, 3, 3),
              "t": (2, 3), "scale": (2, 1), "x_d": (2, 21, 3)}
    assert {k: tuple(v.shape) for k, v in info.items()} == shapes
    assert torch.equal(info["x_c"][:, 5], raw["kp"][:, 15:18])
    assert torch.equal(info["exp"][:, 20], raw["exp"][:, 60:63])
    assert torch.equal(info["yaw"], bins_to_degrees(raw["yaw"]))
    torch.testing.assert_close(info["R"], rotation_matrix(info["pitch"], info["yaw"], info["roll"]))
    torch.testing.assert_close(
        info["x_d"], driven_keypoints(info["x_c"], info["R"], info["exp"], raw["scale"], raw["t"])
    )


def test_gradient_flows_from_every_motion_output_to_the_image():
    model = tiny_model()
    x = image(batch=1).requires_grad_(True)
    info = motion_info(model(x))
    for key in ("x_d", "x_c", "exp", "R", "pitch", "t", "scale"):
        (grad,) = torch.autograd.grad(info[key].square().sum(), x, retain_graph=True)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, key
    info["x_d"].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_extract_motion_converts_like_liveportrait_and_batches_consistently():
    model = tiny_model()
    crops = np.random.default_rng(0).integers(0, 256, size=(3, 256, 256, 3), dtype=np.uint8)
    out = extract_motion(model, crops, batch_size=2)
    x = torch.from_numpy(crops.astype(np.float32) / 255.0).permute(0, 3, 1, 2)
    with torch.no_grad():
        expected = motion_info(model(x))
    assert set(out) == set(expected)
    for key, value in out.items():
        assert value.dtype == np.float32 and value.shape == tuple(expected[key].shape)
        np.testing.assert_allclose(value, expected[key].numpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"\(2, 128, 128, 3\)"):
        extract_motion(model, crops[:2, :128, :128])
