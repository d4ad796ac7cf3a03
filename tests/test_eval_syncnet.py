"""SyncNet v2 (stages/eval/syncnet.py): checkpoint layout, strict loading, front-end windows,
offset search and its sign, face-crop geometry, the scorer. No real weights (none ship):
the model is randomly initialised; the scoring maths is checked on stand-in embeddings."""
import numpy as np
import pytest
import python_speech_features
import torch
import torch.nn.functional as F

from stages.common.checkpoint import CheckpointError

from stages.eval.syncnet import (
    SyncNet,
    SyncNetScorer,
    face_boxes_from_landmarks,
    mfcc_16k,
    num_sync_windows,
    offset_search,
    scores_from_mean_dists,
    smooth_boxes,
    sync_windows,
    syncnet_face_crops,
    wave_to_int16,
)

# syncnet_python @6efbb1c SyncNetModel.S: conv/BN at Sequential indices 0/1, 4/5, 8/9, 11/12,
# 14/15, 18/19 (ReLU / MaxPool hold nothing); FC heads Linear(0) BN1d(1) ReLU(2) Linear(3).
_AUD_CONV = {0: (64, 1, 3, 3), 4: (192, 64, 3, 3), 8: (384, 192, 3, 3), 11: (256, 384, 3, 3),
             14: (256, 256, 3, 3), 18: (512, 256, 5, 4)}
_LIP_CONV = {0: (96, 3, 5, 7, 7), 4: (256, 96, 1, 5, 5), 8: (256, 256, 1, 3, 3),
             11: (256, 256, 1, 3, 3), 14: (256, 256, 1, 3, 3), 18: (512, 256, 1, 6, 6)}


def _expected_layout():
    out = {}
    for branch, convs in (("netcnnaud", _AUD_CONV), ("netcnnlip", _LIP_CONV)):
        for i, shape in convs.items():
            out[f"{branch}.{i}.weight"] = shape
            out[f"{branch}.{i}.bias"] = (shape[0],)
            for name in ("weight", "bias", "running_mean", "running_var"):
                out[f"{branch}.{i + 1}.{name}"] = (shape[0],)
    for head in ("netfcaud", "netfclip"):
        out[f"{head}.0.weight"] = (512, 512)
        out[f"{head}.0.bias"] = (512,)
        for name in ("weight", "bias", "running_mean", "running_var"):
            out[f"{head}.1.{name}"] = (512,)
        out[f"{head}.3.weight"] = (1024, 512)
        out[f"{head}.3.bias"] = (1024,)
    return out


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(1)
    net = SyncNet()
    with torch.no_grad():  # non-trivial BN statistics, so a lost buffer would show
        for mod in net.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.1, 0.1)
    return net.eval()


def test_state_dict_layout_matches_syncnet_v2():
    state = SyncNet().state_dict()
    got = {k: tuple(v.shape) for k, v in state.items() if not k.endswith("num_batches_tracked")}
    assert got == _expected_layout()
    assert len(got) == 2 * (6 * 2 + 6 * 4) + 2 * (4 + 4)
    tracked = {k for k in state if k.endswith("num_batches_tracked")}
    assert len(tracked) == 14  # 12 conv BNs + 2 FC BNs


def test_forward_shapes_real_size(model):
    with torch.no_grad():
        assert model.forward_aud(torch.randn(2, 1, 13, 20)).shape == (2, 1024)
        assert model.forward_lip(torch.rand(2, 3, 5, 224, 224) * 255).shape == (2, 1024)


@pytest.mark.parametrize("with_tracked", [True, False])
def test_file_round_trip_is_exact(tmp_path, model, with_tracked):
    # The real file's layout: a plain name -> tensor dict, written by torch.save.
    state = {k: v.clone() for k, v in model.state_dict().items()
             if with_tracked or not k.endswith("num_batches_tracked")}
    path = tmp_path / "syncnet_v2.model"
    torch.save(state, path)
    assert isinstance(torch.load(path, weights_only=True), dict)
    loaded = SyncNet.from_file(path)
    assert not loaded.training
    for k, v in model.state_dict().items():
        if with_tracked or not k.endswith("num_batches_tracked"):
            assert torch.equal(loaded.state_dict()[k], v), k

    aud = torch.randn(2, 1, 13, 20)
    lip = torch.rand(2, 3, 5, 224, 224) * 255
    with torch.no_grad():
        ref_a, ref_l = model.forward_aud(aud), model.forward_lip(lip)
        assert torch.equal(loaded.forward_aud(aud), ref_a)
        assert torch.equal(loaded.forward_lip(lip), ref_l)

    # save_file writes the same plain layout; loading it again is exact.
    path2 = tmp_path / "again.model"
    loaded.save_file(path2)
    saved = torch.load(path2, weights_only=True)
    assert set(saved) == set(model.state_dict())
    again = SyncNet.from_file(path2)
    with torch.no_grad():
        assert torch.equal(again.forward_aud(aud), ref_a)


def _write(path, state):
    torch.save(state, path)
    return path


def test_loading_errors_name_file_and_key(tmp_path):
    state = {k: v for k, v in SyncNet().state_dict().items() if not k.endswith("num_batches_tracked")}

    missing = dict(state)
    del missing["netfcaud.3.bias"]
    p = _write(tmp_path / "missing.model", missing)
    with pytest.raises(CheckpointError, match=r"missing\.model.*netfcaud\.3\.bias"):
        SyncNet.from_file(p)

    extra = dict(state, **{"__S__.netfcaud.3.bias": state["netfcaud.3.bias"]})
    p = _write(tmp_path / "extra.model", extra)
    with pytest.raises(CheckpointError, match=r"extra\.model.*__S__\.netfcaud\.3\.bias"):
        SyncNet.from_file(p)

    wrong = dict(state, **{"netcnnlip.0.weight": torch.zeros(96, 3, 5, 5, 5)})
    p = _write(tmp_path / "wrong.model", wrong)
    with pytest.raises(CheckpointError, match=r"wrong\.model.*netcnnlip\.0\.weight.*\(96, 3, 5, 5, 5\)"):
        SyncNet.from_file(p)

    p = _write(tmp_path / "list.model", [1, 2])
    with pytest.raises(CheckpointError, match=r"list\.model.*dict"):
        SyncNet.from_file(p)

    with pytest.raises(CheckpointError, match=r"nope\.model"):
        SyncNet.from_file(tmp_path / "nope.model")


# ---------------------------------------------------------------------------- front-end

def test_mfcc_matches_python_speech_features_on_int16():
    rng = np.random.default_rng(0)
    t = np.arange(16000) / 16000
    wave = (0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(16000)).astype(np.float32)
    m = mfcc_16k(wave)
    assert m.shape == (13, 99)  # 1 + ceil((16000 - 400) / 160)
    pcm = wave_to_int16(wave)
    assert pcm.dtype == np.int16
    np.testing.assert_array_equal(m, python_speech_features.mfcc(pcm, 16000).T)
    np.testing.assert_array_equal(wave_to_int16(np.array([0.5, -1.0, 1.0, -0.25])),
                                  [16384, -32768, 32767, -8192])


def test_sync_windows_counts_and_alignment():
    n, h, w = 12, 8, 6
    frames = np.zeros((n, h, w, 3), dtype=np.float32)
    for i in range(n):
        for c in range(3):
            frames[i, :, :, c] = 10 * i + c
    n_samples = 640 * 10 + 300  # floor(n / 640) = 10 < 12 frames -> min_length 10
    t_cols = 1 + int(np.ceil((n_samples - 400) / 160))
    mfcc = np.add.outer(np.arange(13), 100 * np.arange(t_cols)).astype(np.float64)

    lip, aud = sync_windows(frames, mfcc, n_samples)
    assert num_sync_windows(n, n_samples) == 5
    assert lip.shape == (5, 3, 5, h, w) and aud.shape == (5, 1, 13, 20)
    for i in range(5):
        for f in range(5):
            for c in range(3):
                assert np.all(lip[i, c, f] == 10 * (i + f) + c)  # frames i..i+4, channels kept
        np.testing.assert_array_equal(aud[i, 0], mfcc[:, 4 * i:4 * i + 20])  # columns 4i..4i+19

    lip2, aud2 = sync_windows(frames, mfcc, n_samples, start=3, stop=99)
    np.testing.assert_array_equal(lip2, lip[3:])
    np.testing.assert_array_equal(aud2, aud[3:])
    assert num_sync_windows(5, 10**6) == 0 and num_sync_windows(100, 640 * 6) == 1
    with pytest.raises(ValueError, match="MFCC has"):
        sync_windows(frames, mfcc[:, :30], n_samples)


# ---------------------------------------------------------------------------- scoring

def _reference_mean_dists(lip, aud, vshift):
    """calc_pdist + mean, spelled out as the reference's loop."""
    lip, aud = torch.as_tensor(lip).float(), torch.as_tensor(aud).float()
    win = 2 * vshift + 1
    padded = torch.cat([torch.zeros(vshift, aud.shape[1]), aud, torch.zeros(vshift, aud.shape[1])])
    rows = [F.pairwise_distance(lip[i:i + 1].repeat(win, 1), padded[i:i + win]) for i in range(len(lip))]
    return torch.stack(rows, 1).mean(1).numpy()


@pytest.mark.parametrize("k", [-5, 0, 3, 7])
def test_offset_search_recovers_shift(k):
    # Sign convention: a video that lags the audio by k frames (the mouth shows at frame i
    # what was heard at frame i - k) gives offset = +k; a video that leads gives -k.
    rng = np.random.default_rng(10 + k)
    n, d = 60, 32
    aud = rng.standard_normal((n, d)).astype(np.float32)
    lip = rng.standard_normal((n, d)).astype(np.float32)  # unmatched windows stay random
    for i in range(n):
        if 0 <= i - k < n:
            lip[i] = aud[i - k] + 0.01 * rng.standard_normal(d)
    s = offset_search(lip, aud, vshift=15)
    assert s.offset == k
    assert s.mean_dists.shape == (31,)
    np.testing.assert_allclose(s.mean_dists, _reference_mean_dists(lip, aud, 15), rtol=1e-5, atol=1e-6)
    assert s.min_dist == pytest.approx(float(s.mean_dists[15 - k]))
    assert s.min_dist == pytest.approx(float(s.mean_dists.min()))
    assert s.conf == pytest.approx(float(np.median(s.mean_dists) - s.mean_dists.min()), abs=1e-6)
    assert s.conf > 3  # a clear match
    assert s.lse_d == s.min_dist and s.lse_c == s.conf
    d_ = s.to_dict()
    assert d_["offset"] == k and len(d_["mean_dists"]) == 31


def test_scores_from_hand_built_mean_dists():
    mdist = np.array([9.0, 8.0, 2.0, 7.0, 6.0])  # vshift 2: offsets 2, 1, 0, -1, -2
    s = scores_from_mean_dists(mdist, vshift=2)
    assert s.offset == 0 and s.min_dist == 2.0
    assert s.conf == 7.0 - 2.0  # median of {2, 6, 7, 8, 9} minus min
    s = scores_from_mean_dists(np.array([1.0, 8.0, 3.0, 7.0, 6.0]), vshift=2)
    assert s.offset == 2 and s.min_dist == 1.0 and s.conf == 6.0 - 1.0
    with pytest.raises(ValueError, match="5 mean distances"):
        scores_from_mean_dists(np.zeros(4), vshift=2)


# ---------------------------------------------------------------------------- face crops

def _reference_crop(frame_rgb, box, cs=0.4):
    """run_pipeline.py crop_video for one frame, literally: pad the BGR frame, slice, resize."""
    import cv2
    image = frame_rgb[:, :, ::-1]
    bs = max(box[3] - box[1], box[2] - box[0]) / 2
    cy, cx = (box[1] + box[3]) / 2, (box[0] + box[2]) / 2
    bsi = int(bs * (1 + 2 * cs))
    padded = np.pad(image, ((bsi, bsi), (bsi, bsi), (0, 0)), "constant", constant_values=(110, 110))
    my, mx = cy + bsi, cx + bsi
    face = padded[int(my - bs):int(my + bs * (1 + 2 * cs)), int(mx - bs * (1 + cs)):int(mx + bs * (1 + cs))]
    return cv2.resize(face, (224, 224))


def test_face_crop_geometry_and_padding():
    h, w = 200, 300
    frame = np.full((h, w, 3), 50, dtype=np.uint8)
    # box centre (130, 90), half-size 30: crop rows [60, 144), cols [88, 172) (84 x 84).
    box = np.array([100.0, 60.0, 160.0, 120.0])
    frame[60:102, 88:130] = (255, 0, 0)  # RGB red = the crop's top-left quadrant
    edge_box = np.array([-20.0, -25.0, 40.0, 35.0])  # half-size 30 around (10, 5): runs off the frame
    frames = np.stack([frame, frame])
    crops = syncnet_face_crops(frames, np.stack([box, edge_box]))
    assert crops.shape == (2, 224, 224, 3) and crops.dtype == np.uint8

    c = crops[0]
    np.testing.assert_array_equal(c[10:100, 10:100], np.broadcast_to([0, 0, 255], (90, 90, 3)))  # BGR red
    np.testing.assert_array_equal(c[124:214, 124:214], 50)
    np.testing.assert_array_equal(c[124:214, 10:100], 50)
    np.testing.assert_array_equal(c, _reference_crop(frame, box))

    e = crops[1]
    # rows [5 - 30, 5 + 54) = [-25, 59), cols [10 - 42, 10 + 42) = [-32, 52): 25 rows and 32
    # columns of padding (value 110) at the top and left, 224/84 = 2.67 px each.
    np.testing.assert_array_equal(e[:60, :], 110)
    np.testing.assert_array_equal(e[:, :80], 110)
    np.testing.assert_array_equal(e[100:, 100:], 50)
    np.testing.assert_array_equal(e, _reference_crop(frame, edge_box))

    with pytest.raises(ValueError, match="frame 1"):
        syncnet_face_crops(frames, np.stack([box, np.full(4, np.nan)]))


def test_boxes_from_landmarks_and_smoothing():
    rng = np.random.default_rng(0)
    pts = np.column_stack([rng.uniform(100, 160, 478), rng.uniform(50, 130, 478)])
    pts[0], pts[1] = (100, 50), (160, 130)  # extremes: w 60, h 80, centre (130, 90)
    lm = np.stack([pts, np.full_like(pts, np.nan)])
    boxes = face_boxes_from_landmarks(lm)
    np.testing.assert_allclose(boxes[0], [90, 50, 170, 130])
    assert np.isnan(boxes[1]).all()

    track = np.tile([90.0, 50.0, 170.0, 130.0], (20, 1))
    track[10] = [0, 0, 400, 400]  # a one-frame outlier
    np.testing.assert_allclose(smooth_boxes(track), np.tile([90.0, 50.0, 170.0, 130.0], (20, 1)))


# ---------------------------------------------------------------------------- the stage

def test_scorer_matches_manual_pipeline(model):
    rng = np.random.default_rng(3)
    crops = rng.integers(0, 256, (7, 224, 224, 3), dtype=np.uint8)
    wave = (0.2 * rng.standard_normal(7 * 640 + 100)).astype(np.float32)  # 7 usable frames -> 2 windows
    scorer = SyncNetScorer(model=model, batch_size=1)
    s = scorer.score(crops, wave)

    mfcc = mfcc_16k(wave)
    lip, aud = sync_windows(crops, mfcc, len(wave))
    assert len(lip) == 2
    with torch.no_grad():
        want = offset_search(model.forward_lip(torch.from_numpy(lip)), model.forward_aud(torch.from_numpy(aud)))
    assert s.offset == want.offset
    np.testing.assert_allclose(s.mean_dists, want.mean_dists, rtol=1e-4)

    out = scorer({"crops": crops, "wave_16k": wave})
    assert set(out) == {"offset", "min_dist", "conf", "mean_dists"}
    assert out["offset"] == s.offset and out["min_dist"] == pytest.approx(s.min_dist, rel=1e-5)

    with pytest.raises(ValueError, match="25 fps"):
        scorer.score(crops, wave, fps=30.0)
    with pytest.raises(ValueError, match="at least 6"):
        scorer.score(crops[:5], wave)
    with pytest.raises(ValueError, match="at least 6"):
        scorer.score(crops, wave[:5 * 640 + 639])
    with pytest.raises(ValueError, match="weights_path"):
        SyncNetScorer()
