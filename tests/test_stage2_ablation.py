"""benchmarks/stage2_ablation.py's pure pieces, on hand-made arrays (running its main needs a
prepared corpus, whose `imgtalk prepare` is a Ray job: too slow for a unit test)."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import types

import numpy as np
import pytest
import torch

from stages.motion.audio2motion import DRIVEN_KEYPOINTS

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "stage2_ablation.py")
_spec = importlib.util.spec_from_file_location("stage2_ablation", _PATH)
ablation = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ablation)


def test_rows_are_the_issue_table_and_valid_stage2_options():
    from pipeline.train.config import TrainConfig

    assert list(ablation.ROWS) == ["full model", "w/o RSCA (concatenation)", "w/o L_motion", "audio-conditioned IMC-UNet"]
    configs = {row: TrainConfig(stage2=options).stage2 for row, options in ablation.ROWS.items()}
    full = configs["full model"]
    assert full.use_rsca and full.motion > 0 and full.condition == "motion"
    assert not configs["w/o RSCA (concatenation)"].use_rsca
    assert configs["w/o L_motion"].motion == 0 and configs["w/o L_motion"].use_rsca
    assert configs["audio-conditioned IMC-UNet"].condition == "audio" and configs["audio-conditioned IMC-UNet"].motion > 0


def test_row_configs_start_from_the_given_recipe_and_change_only_their_switch():
    from pipeline.train.config import load_train_config

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    recipe = load_train_config(os.path.join(root, "deploy", "demo", "stage2.more.yaml"))
    configs = {row: ablation.row_config(recipe, row, steps=600, batch=8, warmup=30, seed=2) for row in ablation.ROWS}
    for row, cfg in configs.items():
        assert (cfg.steps, cfg.batch_size, cfg.warmup_steps, cfg.seed) == (600, 8, 30, 2)
        changed = {k for k, v in cfg.stage2.model_dump().items() if v != recipe.stage2.model_dump()[k]}
        assert changed == set(ablation.ROWS[row]), row
        # the recipe's own choices survive in every row (they differ from the defaults)
        assert (cfg.stage2.lr, cfg.stage2.gan_start_step, cfg.stage2.motion_noise) == (5e-4, 400, 0.03)
    assert recipe.steps == 1200 and recipe.stage2.use_rsca  # the recipe itself is not modified
    default = ablation.row_config(None, "w/o L_motion", steps=10, batch=2, warmup=1, seed=0)
    assert default.stage2.motion == 0 and default.stage2.lr == 1e-4


def test_motion_conditions_are_neutral_plus_stage1_offsets_on_the_driven_keypoints():
    rng = np.random.default_rng(0)
    neutral = rng.normal(0, 0.01, (21, 3)).astype(np.float32)
    offsets = rng.normal(0, 0.01, (5, len(DRIVEN_KEYPOINTS), 3)).astype(np.float32)
    conditions = ablation.frame_conditions("motion", neutral, offsets=offsets)
    assert conditions.shape == (5, 21, 3) and conditions.dtype == np.float32
    driven = list(DRIVEN_KEYPOINTS)
    others = [k for k in range(21) if k not in driven]
    np.testing.assert_allclose(conditions[:, driven], neutral[driven] + offsets, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(conditions[:, others], np.broadcast_to(neutral[others], (5, len(others), 3)))
    # another driven set is honoured
    custom = ablation.frame_conditions("motion", neutral, offsets=offsets[:, :2], driven=(0, 20))
    np.testing.assert_allclose(custom[:, [0, 20]], neutral[[0, 20]] + offsets[:, :2], rtol=0, atol=1e-7)
    np.testing.assert_array_equal(custom[:, 1:20], np.broadcast_to(neutral[1:20], (5, 19, 3)))


def test_audio_conditions_are_each_frames_window_with_edge_clamping():
    audio = np.arange(4 * 2 * 3, dtype=np.float32).reshape(4, 2, 3)  # (n=4, 2 rows, A=3)
    conditions = ablation.frame_conditions("audio", np.zeros((21, 3)), audio=audio, window_frames=1)
    assert conditions.shape == (4, 6, 3)
    np.testing.assert_array_equal(conditions[0], audio[[0, 0, 1]].reshape(6, 3))
    np.testing.assert_array_equal(conditions[2], audio[[1, 2, 3]].reshape(6, 3))
    np.testing.assert_array_equal(conditions[3], audio[[2, 3, 3]].reshape(6, 3))
    with pytest.raises(ValueError, match="kind"):
        ablation.frame_conditions("text", np.zeros((21, 3)))


def test_pearson_is_nan_safe():
    x = np.array([0.1, 0.2, 0.3, 0.4, np.nan, 0.6])
    assert ablation.pearson(x, 2 * x + 1) == pytest.approx(1.0)
    assert ablation.pearson(x, -x) == pytest.approx(-1.0)
    y = np.array([0.1, np.nan, 0.3, 0.2, 0.5, 0.6])
    ok = np.isfinite(x) & np.isfinite(y)
    assert ablation.pearson(x, y) == pytest.approx(np.corrcoef(x[ok], y[ok])[0, 1])
    assert math.isnan(ablation.pearson(x, np.full(6, 0.3)))  # constant series
    assert math.isnan(ablation.pearson([1.0, 2.0, np.nan], [1.0, 3.0, 2.0]))  # under 3 finite pairs
    assert math.isnan(ablation.pearson([], []))


def test_masked_psnr():
    assert ablation.masked_psnr(0.01 * 50, 50) == pytest.approx(20.0)
    assert ablation.masked_psnr(0.0, 10) == pytest.approx(120.0)  # floored at MSE 1e-12
    assert math.isnan(ablation.masked_psnr(0.0, 0))


def test_summary_and_markdown_table():
    results = {
        "full model": [{"psnr_mouth": 20.0, "lip_r": 0.5}, {"psnr_mouth": 22.0, "lip_r": float("nan")}],
        "w/o L_motion": [{"psnr_mouth": 18.0, "lip_r": 0.1}, {"psnr_mouth": 18.0, "lip_r": 0.3}],
    }
    summary = ablation.summarise(results)
    assert summary["full model"]["seeds"] == 2
    assert summary["full model"]["psnr_mouth"] == {"mean": 21.0, "std": 1.0, "finite_seeds": 2}
    assert summary["full model"]["lip_r"]["mean"] == 0.5 and summary["full model"]["lip_r"]["finite_seeds"] == 1
    assert summary["w/o L_motion"]["lip_r"]["mean"] == pytest.approx(0.2)
    assert summary["w/o L_motion"]["lip_r"]["std"] == pytest.approx(0.1)
    # runs from before the true-keypoint metrics lack them: not counted, "n/a"
    assert summary["full model"]["lip_r_true_motion"]["finite_seeds"] == 0
    table = ablation.format_table(summary).splitlines()
    assert table[0] == "| row | PSNR mouth (dB) | lip r | seeds | PSNR mouth, true keypoints | lip r, true keypoints |"
    assert table[2] == "| full model | 21.00 ± 1.00 | 0.500 ± 0.000 | 2 | n/a | n/a |"
    assert table[3] == "| w/o L_motion | 18.00 ± 0.00 | 0.200 ± 0.100 | 2 | n/a | n/a |"
    nan_row = ablation.format_table(ablation.summarise({"x": [{"psnr_mouth": float("nan"), "lip_r": float("nan")}]}))
    assert nan_row.splitlines()[2] == "| x | n/a | n/a | 1 | n/a | n/a |"
    # true-keypoint columns carry their own count of seeds: one old run, two new
    mixed = {"w/o RSCA (concatenation)": [
        {"psnr_mouth": 15.0, "lip_r": 0.3},
        {"psnr_mouth": 16.0, "lip_r": 0.2, "psnr_mouth_true_motion": 17.0, "lip_r_true_motion": 0.4},
        {"psnr_mouth": 17.0, "lip_r": 0.4, "psnr_mouth_true_motion": 19.0, "lip_r_true_motion": 0.6}]}
    row = ablation.format_table(ablation.summarise(mixed)).splitlines()[2]
    assert row == "| w/o RSCA (concatenation) | 16.00 ± 0.82 | 0.300 ± 0.082 | 3 | 18.00 ± 1.00 (2) | 0.500 ± 0.100 (2) |"


def test_true_motion_conditions_are_the_training_condition():
    rng = np.random.default_rng(1)
    exp = rng.normal(size=(4, 21, 3)).astype(np.float32)
    neutral = rng.normal(size=(21, 3)).astype(np.float32)
    driven = (14, 17, 19, 20)
    out = ablation.true_motion_conditions(exp, neutral, driven)
    assert out.shape == (4, 21, 3) and out.dtype == np.float32
    others = [k for k in range(21) if k not in driven]
    np.testing.assert_array_equal(out[:, list(driven)], exp[:, list(driven)])  # the real frame's δ where driven
    np.testing.assert_array_equal(out[:, others], np.broadcast_to(neutral[others], (4, len(others), 3)))


class _FakeTracker:
    """Landmarks whose opening |mesh13 - mesh14| / |mesh10 - mesh152| is the crop's mean red
    value / 255; 'no face' for an all-black crop."""

    def __call__(self, frames):
        landmarks = np.zeros((len(frames), 478, 2), np.float32)
        landmarks[:, 152, 1] = 1.0
        landmarks[:, 14, 1] = [f[..., 0].mean() / 255.0 for f in frames]
        has_face = np.array([f.max() > 0 for f in frames])
        landmarks[~has_face] = np.nan
        return types.SimpleNamespace(landmarks=landmarks, has_face=has_face)


def test_evaluate_row_pools_mouth_psnr_and_aligns_openings_to_face_frames():
    size, n = 16, 7
    rng = np.random.default_rng(0)
    crops = np.zeros((n, size, size, 3), np.uint8)
    has_face = np.array([True, True, False, True, True, True, True])
    levels = rng.uniform(20, 200, n)
    crops[has_face] = (levels[has_face, None, None, None] + rng.uniform(0, 20, (has_face.sum(), size, size, 3))).astype(np.uint8)
    mask = torch.zeros(1, 1, size, size)
    mask[..., 8:, 4:12] = 1.0

    class Trainer:  # complete = the target brightened by 0.1, decode = identity
        def __init__(self):
            self.mask, self.unet = mask, torch.nn.Identity()
            self.vae = types.SimpleNamespace(decode=lambda z: z)
            self.seen = []

        def complete(self, inputs, model=None):
            self.seen.append({k: v.clone() for k, v in inputs.items()})
            return inputs["target"] + 0.1

    video = {"video_id": "v", "crops": crops, "has_face": has_face,
             "neutral_crop": np.full((size, size, 3), 77, np.uint8)}
    conditions = {"v": np.arange(n, dtype=np.float32)[:, None, None] * np.ones((n, 2, 3), np.float32)}
    tracker = _FakeTracker()
    real = {"v": ablation.mouth_openings(tracker, crops[has_face])}
    trainer = Trainer()
    metrics = ablation.evaluate_row(trainer, [video], conditions, tracker, real, batch=4)

    # every face frame once, with its own condition and the neutral crop as reference
    motion = torch.cat([s["motion"] for s in trainer.seen])
    np.testing.assert_array_equal(motion[:, 0, 0].numpy(), np.flatnonzero(has_face))
    assert all(torch.all(s["reference"] == 77 / 255.0) for s in trainer.seen)
    # PSNR from the pooled squared error inside the mask (0.1 everywhere unless clipped at 1)
    target = torch.from_numpy(crops[has_face]).permute(0, 3, 1, 2).float() / 255.0
    error = ((target + 0.1).clamp(0, 1) - target) ** 2
    expected = 10 * math.log10(1.0 / float(error[mask.expand_as(error).bool()].mean()))
    assert metrics["psnr_mouth"] == pytest.approx(expected, rel=1e-5)
    # generated openings follow the real ones frame by frame: r = 1
    assert metrics["lip_r"] == pytest.approx(1.0, abs=1e-3) and metrics["videos_with_r"] == 1


def test_collate_stacks_samples():
    samples = [{"a": np.full((2, 3), i, np.float32), "b": np.zeros((4, 4, 3), np.uint8)} for i in range(3)]
    batch = ablation.collate(samples)
    assert batch["a"].shape == (3, 2, 3) and batch["b"].dtype == torch.uint8
    assert torch.equal(batch["a"][:, 0, 0], torch.tensor([0.0, 1.0, 2.0]))


def _report(per_seed: dict, **settings) -> dict:
    base = {"steps": 600, "batch": 8, "warmup_steps": 30, "config": "c.yaml", "stage2": {"lr": 5e-4},
            "shards": "s", "heldout_shards": "h", "weights": "w", "heldout_videos": 24}
    return {"per_seed": per_seed, "settings": base | settings}


def test_merge_joins_runs_split_by_row_and_seed_in_row_order(tmp_path):
    full, rsca, motion = "full model", "w/o RSCA (concatenation)", "w/o L_motion"

    def m(seed, psnr, r):
        return {"seed": seed, "psnr_mouth": psnr, "lip_r": r}

    seed0 = _report({full: [m(0, 19.0, 0.7)], rsca: [m(0, 16.0, 0.3)], motion: [m(0, 19.5, 0.6)]}, seeds=[0])
    full12 = _report({full: [m(2, 21.0, 0.5), m(1, 20.0, 0.6)]}, seeds=[1, 2])
    motion12 = _report({motion: [m(1, 18.5, 0.8)]}, seeds=[1])
    merged = ablation.merge_reports([motion12, seed0, full12])
    assert list(merged) == [full, rsca, motion]
    assert [x["seed"] for x in merged[full]] == [0, 1, 2] and [x["seed"] for x in merged[motion]] == [0, 1]
    summary = ablation.summarise(merged)
    assert summary[full]["seeds"] == 3 and summary[full]["psnr_mouth"]["mean"] == pytest.approx(20.0)
    assert summary[motion]["lip_r"]["mean"] == pytest.approx(0.7)

    # the command line writes the same table from the files
    paths = []
    for i, report in enumerate([seed0, full12, motion12]):
        paths.append(str(tmp_path / f"r{i}.json"))
        with open(paths[-1], "w") as f:
            json.dump(report, f)
    out = ablation.main(["--merge", ",".join(paths), "--out", str(tmp_path / "t.json")])
    assert out["table"] == ablation.format_table(summary)
    with open(tmp_path / "t.json") as f:
        assert json.load(f)["summary"][full]["seeds"] == 3

    with pytest.raises(ValueError, match="steps"):
        ablation.merge_reports([seed0, _report({full: [m(1, 1.0, 0.1)]}, steps=300)])
    with pytest.raises(ValueError, match="seed 0"):
        ablation.merge_reports([seed0, _report({full: [m(0, 1.0, 0.1)]})])
