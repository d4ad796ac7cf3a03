"""FID: the Fréchet distance, the FID Inception-v3 (pytorch-fid layout) and its stage.

No real weights can be downloaded here, so the network runs with a fixed random init
(torch.manual_seed): enough to check shapes, key layouts, loading and that FID reacts to
image degradation the way it should.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from skimage import data
from skimage.transform import resize

from stages.common.checkpoint import CheckpointError
from stages.eval.fid import InceptionFeatures, feature_stats, fid_from_features, frechet_distance
from stages.eval.inception import FIDInceptionA, FIDInceptionE, FIDInceptionV3, weight_file_layout


# ----------------------------------------------------------------- the Fréchet distance

def _random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_distance_diagonal_gaussians_closed_form():
    rng = np.random.default_rng(0)
    d = 16
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    got = frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    assert got == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(mu1, np.diag(s1), mu1, np.diag(s1)) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_full_covariances_match_eigendecomposition():
    # Tr((S1 S2)^1/2) = Tr((S1^1/2 S2 S1^1/2)^1/2): a symmetric PSD matrix, so eigvalsh.
    rng = np.random.default_rng(1)
    d = 12
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    w, v = np.linalg.eigh(s1)
    s1_half = (v * np.sqrt(w)) @ v.T
    tr_sqrt = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(s1_half @ s2 @ s1_half), 0, None)))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    got = frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(expected, rel=1e-9)
    assert got == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-9)  # symmetric
    with pytest.raises(ValueError, match="shape mismatch"):
        frechet_distance(mu1, s1, mu2[:-1], s2[:-1, :-1])


def test_feature_stats_and_fid_of_samples():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((500, 8)).astype(np.float32)
    mu, sigma = feature_stats(a)
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    assert sigma.shape == (8, 8)
    np.testing.assert_allclose(sigma, np.cov(a.astype(np.float64), rowvar=False))
    assert fid_from_features(a, a) == pytest.approx(0.0, abs=1e-9)
    # Fewer samples than dimensions (singular covariances) still gives a finite ~0 self-FID
    # (sqrtm of a singular product is accurate to ~1e-6 here, against a trace of ~30).
    few = rng.standard_normal((6, 32))
    assert abs(fid_from_features(few, few)) < 1e-4
    # A shift of the mean by 1 in every dimension adds d to the FID.
    assert fid_from_features(a, a + 1.0) == pytest.approx(8.0, rel=1e-6)
    with pytest.raises(ValueError):
        feature_stats(a[:1])


def test_fid_with_fewer_frames_than_dimensions_equals_the_d_by_d_route():
    # N < D: fid_from_features takes Tr((S1 S2)^1/2) from the frames' N x N matrix; it must
    # equal the D x D symmetric form Tr((S1^1/2 S2 S1^1/2)^1/2), with no eps added.
    rng = np.random.default_rng(5)
    a = rng.standard_normal((15, 40))
    b = rng.standard_normal((11, 40)) * 1.3 + 0.2
    mu1, s1 = feature_stats(a)
    mu2, s2 = feature_stats(b)
    w, v = np.linalg.eigh(s1)
    s1_half = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    tr_sqrt = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(s1_half @ s2 @ s1_half), 0, None)))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    # (the reference's square roots of rank-deficient matrices round at ~1e-8)
    assert fid_from_features(a, b) == pytest.approx(expected, rel=1e-7)
    assert fid_from_features(b, a) == pytest.approx(expected, rel=1e-7)


# ------------------------------------------------------------------- the network's keys

def _conv(name: str, out_ch: int, in_ch: int, kh: int, kw: int) -> list[tuple[str, tuple]]:
    c = (out_ch,)
    return [
        (f"{name}.conv.weight", (out_ch, in_ch, kh, kw)),
        (f"{name}.bn.weight", c), (f"{name}.bn.bias", c),
        (f"{name}.bn.running_mean", c), (f"{name}.bn.running_var", c),
        (f"{name}.bn.num_batches_tracked", ()),
    ]


def _expected_pytorch_fid_keys() -> list[tuple[str, tuple]]:
    """torchvision Inception3(num_classes=1008, aux_logits=False), written out block by block."""
    keys = []
    keys += _conv("Conv2d_1a_3x3", 32, 3, 3, 3) + _conv("Conv2d_2a_3x3", 32, 32, 3, 3)
    keys += _conv("Conv2d_2b_3x3", 64, 32, 3, 3) + _conv("Conv2d_3b_1x1", 80, 64, 1, 1)
    keys += _conv("Conv2d_4a_3x3", 192, 80, 3, 3)
    for name, cin, pool in (("Mixed_5b", 192, 32), ("Mixed_5c", 256, 64), ("Mixed_5d", 288, 64)):
        keys += _conv(f"{name}.branch1x1", 64, cin, 1, 1)
        keys += _conv(f"{name}.branch5x5_1", 48, cin, 1, 1) + _conv(f"{name}.branch5x5_2", 64, 48, 5, 5)
        keys += _conv(f"{name}.branch3x3dbl_1", 64, cin, 1, 1) + _conv(f"{name}.branch3x3dbl_2", 96, 64, 3, 3)
        keys += _conv(f"{name}.branch3x3dbl_3", 96, 96, 3, 3) + _conv(f"{name}.branch_pool", pool, cin, 1, 1)
    keys += _conv("Mixed_6a.branch3x3", 384, 288, 3, 3) + _conv("Mixed_6a.branch3x3dbl_1", 64, 288, 1, 1)
    keys += _conv("Mixed_6a.branch3x3dbl_2", 96, 64, 3, 3) + _conv("Mixed_6a.branch3x3dbl_3", 96, 96, 3, 3)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
        keys += _conv(f"{name}.branch1x1", 192, 768, 1, 1)
        keys += _conv(f"{name}.branch7x7_1", c7, 768, 1, 1) + _conv(f"{name}.branch7x7_2", c7, c7, 1, 7)
        keys += _conv(f"{name}.branch7x7_3", 192, c7, 7, 1)
        keys += _conv(f"{name}.branch7x7dbl_1", c7, 768, 1, 1) + _conv(f"{name}.branch7x7dbl_2", c7, c7, 7, 1)
        keys += _conv(f"{name}.branch7x7dbl_3", c7, c7, 1, 7) + _conv(f"{name}.branch7x7dbl_4", c7, c7, 7, 1)
        keys += _conv(f"{name}.branch7x7dbl_5", 192, c7, 1, 7) + _conv(f"{name}.branch_pool", 192, 768, 1, 1)
    keys += _conv("Mixed_7a.branch3x3_1", 192, 768, 1, 1) + _conv("Mixed_7a.branch3x3_2", 320, 192, 3, 3)
    keys += _conv("Mixed_7a.branch7x7x3_1", 192, 768, 1, 1) + _conv("Mixed_7a.branch7x7x3_2", 192, 192, 1, 7)
    keys += _conv("Mixed_7a.branch7x7x3_3", 192, 192, 7, 1) + _conv("Mixed_7a.branch7x7x3_4", 192, 192, 3, 3)
    for name, cin in (("Mixed_7b", 1280), ("Mixed_7c", 2048)):
        keys += _conv(f"{name}.branch1x1", 320, cin, 1, 1)
        keys += _conv(f"{name}.branch3x3_1", 384, cin, 1, 1) + _conv(f"{name}.branch3x3_2a", 384, 384, 1, 3)
        keys += _conv(f"{name}.branch3x3_2b", 384, 384, 3, 1)
        keys += _conv(f"{name}.branch3x3dbl_1", 448, cin, 1, 1) + _conv(f"{name}.branch3x3dbl_2", 384, 448, 3, 3)
        keys += _conv(f"{name}.branch3x3dbl_3a", 384, 384, 1, 3) + _conv(f"{name}.branch3x3dbl_3b", 384, 384, 3, 1)
        keys += _conv(f"{name}.branch_pool", 192, cin, 1, 1)
    keys += [("fc.weight", (1008, 2048)), ("fc.bias", (1008,))]
    return keys


# One seeded model, its pytorch-fid-layout file and its output on two 256x256 frames,
# shared by the tests below (each forward pass of the real-size network costs ~1 s here).
@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    torch.manual_seed(0)
    model = FIDInceptionV3()
    path = str(tmp_path_factory.mktemp("fid") / "pt_inception-2015-12-05-6726825d.pth")
    model.save_file(path)
    rng = np.random.default_rng(3)
    frames = rng.integers(0, 256, (2, 256, 256, 3), dtype=np.uint8)
    images = torch.from_numpy(frames).permute(0, 3, 1, 2).to(torch.float32) / 255.0
    with torch.inference_mode():
        out = model(images)
    return {"model": model, "path": path, "frames": frames, "images": images, "out": out}


def test_state_dict_matches_pytorch_fid_layout(seeded):
    model = seeded["model"]
    got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    expected = _expected_pytorch_fid_keys()
    assert len(expected) == 94 * 6 + 2  # 94 BasicConv2d + fc
    assert got == expected  # names, shapes and order
    shapes = dict(got)
    assert shapes["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
    assert shapes["Mixed_7c.branch_pool.conv.weight"] == (192, 2048, 1, 1)
    assert shapes["Mixed_6e.branch7x7dbl_5.conv.weight"] == (192, 192, 1, 7)
    assert shapes["fc.weight"] == (1008, 2048)
    assert not any(k.startswith("AuxLogits") for k in shapes)
    # torchvision's inception_v3 has 27,161,264 parameters; less AuxLogits (3,326,696)
    # plus 8 more classes in fc (8 * 2048 + 8) gives the FID network's count.
    assert sum(p.numel() for p in model.parameters()) == 27_161_264 - 3_326_696 + 8 * 2049
    assert all(m.eps == 0.001 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    # pytorch-fid's patched blocks: FIDInceptionE_1 (average pool) then FIDInceptionE_2 (max pool).
    assert (model.Mixed_7b.pool, model.Mixed_7c.pool) == ("avg", "max")
    assert [type(getattr(model, f"Mixed_5{c}")) for c in "bcd"] == [FIDInceptionA] * 3


def test_real_size_forward(seeded):
    out = seeded["out"]
    assert out.shape == (2, 2048) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert (out >= 0).all() and out.std() > 0  # average of ReLU outputs, not constant
    assert not torch.allclose(out[0], out[1])


def test_pool_branches_follow_the_tf_graph():
    """The FID patches: A/C/E_1 average without counting the zero padding; E_2 max-pools."""
    bn_scale = 1.0 / np.sqrt(1.0 + 0.001)  # a fresh BatchNorm in eval mode: x / sqrt(1 + eps)
    a = FIDInceptionA(4, pool_features=4, eps=0.001).eval()
    with torch.no_grad():
        a.branch_pool.conv.weight.copy_(torch.eye(4).view(4, 4, 1, 1))
        pooled = a(torch.ones(1, 4, 5, 5))[:, -4:]  # the pool branch is last
    # Counting the padding would give 4/9 in the corners and 6/9 on the edges.
    torch.testing.assert_close(pooled, torch.full_like(pooled, bn_scale))

    spike = torch.zeros(1, 4, 5, 5)
    spike[0, 0, 2, 2] = 1.0
    for pool, centre_value in (("max", 1.0), ("avg", 1.0 / 9)):
        e = FIDInceptionE(4, eps=0.001, pool=pool).eval()
        with torch.no_grad():
            e.branch_pool.conv.weight.zero_()
            e.branch_pool.conv.weight[0, 0] = 1.0
            out = e(spike)[0, -192]  # channel 0 of the pool branch
        expected = torch.zeros(5, 5)
        expected[1:4, 1:4] = centre_value * bn_scale
        torch.testing.assert_close(out, expected)


# ------------------------------------------------------------------------- weight files

def test_pytorch_fid_file_round_trip(seeded, tmp_path):
    state = torch.load(seeded["path"], weights_only=True)
    assert type(state) is dict and weight_file_layout(state) == "pytorch-fid"
    assert [(k, tuple(v.shape)) for k, v in state.items()] == _expected_pytorch_fid_keys()
    loaded = FIDInceptionV3.from_file(seeded["path"])
    assert not loaded.training
    with torch.inference_mode():
        assert torch.equal(loaded(seeded["images"]), seeded["out"])
    again = str(tmp_path / "again.pth")
    loaded.save_file(again)
    state2 = torch.load(again, weights_only=True)
    assert list(state2) == list(state)
    assert all(torch.equal(state[k], state2[k]) for k in state)


def test_bad_files_raise_naming_file_and_key(seeded, tmp_path):
    state = torch.load(seeded["path"], weights_only=True)

    missing = dict(state)
    del missing["Mixed_6c.branch7x7_2.conv.weight"]
    p = str(tmp_path / "missing.pth")
    torch.save(missing, p)
    with pytest.raises(CheckpointError, match=r"missing\.pth.*Mixed_6c\.branch7x7_2\.conv\.weight"):
        FIDInceptionV3.from_file(p)

    wrong = dict(state)
    wrong["fc.weight"] = torch.zeros(1000, 2048)
    p = str(tmp_path / "wrong.pth")
    torch.save(wrong, p)
    with pytest.raises(CheckpointError, match=r"wrong\.pth.*fc\.weight.*\(1000, 2048\)"):
        FIDInceptionV3.from_file(p)

    extra = dict(state)
    extra["AuxLogits.fc.weight"] = torch.zeros(1008, 768)
    p = str(tmp_path / "extra.pth")
    torch.save(extra, p)
    with pytest.raises(CheckpointError, match=r"extra\.pth.*AuxLogits\.fc\.weight"):
        FIDInceptionV3.from_file(p)

    with pytest.raises(CheckpointError, match="not found"):
        FIDInceptionV3.from_file(str(tmp_path / "absent.pth"))


def test_torch_fidelity_layout_loads_and_matches(seeded, tmp_path):
    # torch-fidelity's converter writes the same names without num_batches_tracked.
    state = torch.load(seeded["path"], weights_only=True)
    fidelity = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    assert len(fidelity) == 94 * 5 + 2
    p = str(tmp_path / "weights-inception-2015-12-05-6726825d.pth")
    torch.save(fidelity, p)
    assert weight_file_layout(fidelity) == "torch-fidelity"
    loaded = FIDInceptionV3.from_file(p)
    with torch.inference_mode():
        assert torch.equal(loaded(seeded["images"]), seeded["out"])
    # Strict there too: a missing tensor is named.
    del fidelity["Mixed_5b.branch_pool.bn.running_var"]
    torch.save(fidelity, p)
    with pytest.raises(CheckpointError, match=r"torch-fidelity.*Mixed_5b\.branch_pool\.bn\.running_var"):
        FIDInceptionV3.from_file(p)


# ----------------------------------------------------------------------------- the stage

def test_inception_features_stage_matches_module(seeded):
    stage = InceptionFeatures(seeded["path"], device="cpu", batch_size=1)  # two chunks
    out = stage({"frames": seeded["frames"]})
    feats = out["features"]
    assert set(out) == {"features"}
    assert feats.shape == (2, 2048) and feats.dtype == np.float32
    np.testing.assert_allclose(feats, seeded["out"].numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        stage({"frames": seeded["frames"].astype(np.float32)})


# --------------------------------------------------------------- FID reacts to blurring

def test_fid_grows_with_blur(seeded):
    """Random 64-128 px crops of the astronaut, resized to 96 px, against the same crops
    blurred with a growing Gaussian sigma, on all 2048 dimensions (8 images: the covariances
    have rank 7, so fid_from_features takes the exact frames-sized route)."""
    model = seeded["model"]
    rng = np.random.default_rng(4)
    img = data.astronaut().astype(np.float64) / 255.0
    crops = []
    for _ in range(8):
        s = int(rng.integers(64, 129))
        y, x = (int(v) for v in rng.integers(0, 512 - s, 2))
        crops.append(resize(img[y : y + s, x : x + s], (96, 96), anti_aliasing=True))
    sigmas = (0.0, 1.0, 2.0, 4.0)
    batch = np.stack([c if sg == 0 else gaussian_filter(c, (sg, sg, 0)) for sg in sigmas for c in crops])
    with torch.inference_mode():
        feats = model(torch.from_numpy(batch).permute(0, 3, 1, 2).to(torch.float32)).numpy()
    feats = feats.reshape(len(sigmas), len(crops), -1)
    ref = feats[0]
    fids = [fid_from_features(ref, f) for f in feats]
    assert abs(fids[0]) < 1e-4  # a set against itself
    assert all(a < b for a, b in zip(fids, fids[1:])), fids
    assert fids[1] > 1e-3
