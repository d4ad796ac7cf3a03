"""`imgtalk` command line: exit codes and the messages users see, in process (every `dub`
there fails before Ray is started; tests/test_e2e.py runs the job itself). One small `dub`
runs as a subprocess, to see its terminal as a user does: Ray's and mediapipe's own log
lines stay out of it and in the job's log file (pipeline/logs.py)."""
import json
import os
import re
import subprocess
import sys
import wave
from fractions import Fraction

import numpy as np
import pytest
import torch

from pipeline.cli import main
from pipeline.weights import load_stage1, load_stage2, read_bundle_info


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("weights") / "tiny")
    assert main(["weights", "init", "--size", "tiny", out]) == 0
    return out


def test_weights_init_writes_a_loadable_untrained_bundle(tmp_path, capsys):
    out = str(tmp_path / "bundle")
    assert main(["weights", "init", "--size", "tiny", "--seed", "3", out]) == 0
    assert out in capsys.readouterr().out

    info = read_bundle_info(out)
    assert info.size == "tiny" and info.trained is False
    with open(os.path.join(out, "bundle.json")) as f:
        meta = json.load(f)
    assert meta["trained"] is False and meta["size"] == "tiny" and meta["seed"] == 3
    stage1, stage2 = load_stage1(info), load_stage2(info)
    # Untrained means Stage 1 predicts no offset (zero-initialised head) and RSCA is off.
    assert not stage1.head.weight.any() and not stage1.head.bias.any()
    assert all(a.item() == 0.0 for a in stage2.rsca_alphas())

    # The seed is what makes a bundle: same seed, same weights; another seed, others.
    again = str(tmp_path / "again")
    other = str(tmp_path / "other")
    assert main(["weights", "init", "--size", "tiny", "--seed", "3", again]) == 0
    assert main(["weights", "init", "--size", "tiny", "--seed", "4", other]) == 0
    weights = lambda root: load_stage2(read_bundle_info(root)).conv_in.weight  # noqa: E731
    assert torch.equal(weights(out), weights(again))
    assert not torch.equal(weights(out), weights(other))


def test_dub_with_a_missing_manifest_names_it(bundle, tmp_path, capsys):
    manifest = str(tmp_path / "nowhere" / "manifest.parquet")
    report = str(tmp_path / "report.parquet")
    code = main(["dub", "--manifest", manifest, "--weights", bundle, "--output-report", report])
    assert code == 2
    err = capsys.readouterr().err
    assert manifest in err and "not found" in err
    assert not os.path.exists(report)


def test_dub_with_a_manifest_that_is_not_parquet_names_it(bundle, tmp_path, capsys):
    manifest = tmp_path / "manifest.parquet"
    manifest.write_text("video_uri,audio_uri,output_uri\n")
    code = main(["dub", "--manifest", str(manifest), "--weights", bundle, "--output-report", str(tmp_path / "r.parquet")])
    assert code == 2
    err = capsys.readouterr().err
    assert str(manifest) in err and "Parquet" in err


def test_dub_with_weights_that_are_not_a_bundle_names_bundle_json(tmp_path, capsys):
    not_a_bundle = tmp_path / "weights"
    not_a_bundle.mkdir()
    (not_a_bundle / "model.safetensors").write_bytes(b"\0" * 16)
    args = ["dub", "--manifest", str(tmp_path / "m.parquet"), "--output-report", str(tmp_path / "r.parquet")]
    assert main(args + ["--weights", str(not_a_bundle)]) == 2
    err = capsys.readouterr().err
    assert os.path.join(str(not_a_bundle), "bundle.json") in err

    missing = str(tmp_path / "no-such-weights")
    assert main(args + ["--weights", missing]) == 2
    assert missing in capsys.readouterr().err


def test_dub_with_a_damaged_bundle_names_the_missing_component(bundle, tmp_path, capsys):
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    with open(os.path.join(bundle, "bundle.json")) as f:
        (damaged / "bundle.json").write_text(f.read())
    code = main(["dub", "--manifest", str(tmp_path / "m.parquet"), "--weights", str(damaged),
                 "--output-report", str(tmp_path / "r.parquet")])
    assert code == 2
    err = capsys.readouterr().err
    assert str(damaged) in err and "missing" in err


@pytest.mark.parametrize(
    "yaml_text, key",
    [
        ("segment_seconds: -3\n", "segment_seconds"),
        ("batch:\n  complete_frames: 0\n", "batch.complete_frames"),
        ("output:\n  crf: 99\n", "output.crf"),
        ("device: tpu\n", "device"),
        ("pools:\n  complete:\n    size: 2\n    gpus: 1\n", "pools.complete.gpus"),
    ],
)
def test_dub_with_an_invalid_config_names_the_file_and_key(bundle, tmp_path, capsys, yaml_text, key):
    config = tmp_path / "job.yaml"
    config.write_text(yaml_text)
    code = main(["dub", "--manifest", str(tmp_path / "m.parquet"), "--weights", bundle,
                 "--output-report", str(tmp_path / "r.parquet"), "--config", str(config)])
    assert code == 2
    err = capsys.readouterr().err
    assert str(config) in err and key in err


def test_dub_with_unparseable_or_missing_config(bundle, tmp_path, capsys):
    args = ["dub", "--manifest", str(tmp_path / "m.parquet"), "--weights", bundle, "--output-report", str(tmp_path / "r.parquet")]
    broken = tmp_path / "broken.yaml"
    broken.write_text("segment_seconds: [1, 2\n")
    assert main(args + ["--config", str(broken)]) == 2
    assert str(broken) in capsys.readouterr().err
    missing = str(tmp_path / "absent.yaml")
    assert main(args + ["--config", missing]) == 2
    assert missing in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["dub", "--weights", "w", "--output-report", "r"], "--manifest"),
        (["dub", "--manifest", "m", "--output-report", "r"], "--weights"),
        (["weights", "init", "--size", "huge", "out"], "huge"),
        (["weights", "init"], "out"),
        ([], "command"),
    ],
)
def test_usage_errors_exit_2(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err



def test_prepare_and_train_name_what_is_wrong_before_any_work(bundle, tmp_path, capsys):
    empty = tmp_path / "no-videos"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a video")
    assert main(["prepare", "--corpus", str(empty), "--weights", bundle, "--output", str(tmp_path / "shards")]) == 2
    assert f"{empty}: no video files" in capsys.readouterr().err
    shards = tmp_path / "not-prepared"
    shards.mkdir()
    code = main(["train", "stage1", "--shards", str(shards), "--weights", bundle, "--output-bundle", str(tmp_path / "b")])
    assert code == 2
    assert f"{shards}: not a prepared corpus" in capsys.readouterr().err
    (tmp_path / "train.yaml").write_text("steps: 0\n")
    code = main(["train", "stage2", "--shards", str(shards), "--weights", bundle, "--output-bundle", str(tmp_path / "b"),
                 "--config", str(tmp_path / "train.yaml")])
    assert code == 2 and "steps" in capsys.readouterr().err


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_dub_keeps_library_log_lines_out_of_the_terminal_and_in_the_job_log(bundle, tmp_path):
    from pipeline.dub.schemas import ManifestRow, write_manifest
    from pipeline.sample_catalogue import SampleVideo, write_video
    from pipeline.storage import Storage

    video, audio, output = str(tmp_path / "v.mp4"), str(tmp_path / "a.wav"), str(tmp_path / "out" / "v.mp4")
    write_video(video, SampleVideo("v", Fraction(25), 1.0, "", size=(320, 240)))
    with wave.open(audio, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes((0.3 * np.sin(2 * np.pi * 220 * np.arange(16000) / 16000) * 32767).astype(np.int16).tobytes())
    row = {"video_uri": video, "audio_uri": audio, "output_uri": output}
    write_manifest([row], str(tmp_path / "m.parquet"), Storage())
    report = str(tmp_path / "report.parquet")
    # A fresh user's environment: no Ray of this test session to join, no log levels preset.
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k not in ("GLOG_minloglevel", "TF_CPP_MIN_LOG_LEVEL")}
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "dub", "--manifest", str(tmp_path / "m.parquet"), "--weights", bundle,
         "--output-report", report],
        cwd=ROOT, env=dict(env, RAY_USAGE_STATS_ENABLED="0"), capture_output=True, text=True, timeout=900,
    )
    terminal = done.stdout + done.stderr
    assert done.returncode == 0, terminal
    # glog/absl lines (mediapipe, TensorFlow Lite), Ray's C++ and Python log lines: none
    assert not re.search(r"^[WIEF]\d{4} ", terminal, re.M), terminal
    assert not re.search(r"^\[?\d{4}-\d\d-\d\d[ ,\d:.]+\s*(WARNING|INFO|[WIE] \d+)", terminal, re.M), terminal
    assert "Token authentication is enabled" not in terminal  # Ray's notice at every ray.init
    log_path = str(tmp_path / "report.log")
    assert f"log: {log_path}" in terminal and f"output: {output}" in terminal
    with open(log_path) as f:
        text = f.read()
    # ... they are kept in the log file, with one line per settled video giving its stage timings
    assert "Token authentication is enabled" in text
    video_id = ManifestRow.model_validate(row).video_id
    line = re.search(rf"INFO imgtalk: video {video_id} row 0 ok: 25 frames; (.*)$", text, re.M)
    assert line, text[-3000:]
    timings = dict(re.findall(r"(\w+) ([\d.]+) s", line.group(1)))
    assert list(timings) == ["plan", "analyse", "audio", "face", "motion", "complete", "compose", "finalize"]
    assert float(timings["complete"]) > 0
    assert "===== Ray worker output:" in text  # the workers' own files, copied from Ray's session folder
