"""`imgtalk train stage1|stage2`: train one stage on Ray Train (TorchTrainer, Train V2) from
the shards of `imgtalk prepare`, then write a weights bundle that `imgtalk dub` uses as is.

    driver: card.json + videos.parquet → per-rank datasets of training samples (Ray Data:
            read_parquet(shard files) → flat_map(sample clips / pairs)) → TorchTrainer.fit()
            (workers: pipeline/train/loop.py) → latest checkpoint → <output bundle>

Rerunning the same command (same `name` and `storage_path`) resumes from the last
checkpoint; a worker that dies mid-run restarts the group from it (`max_failures`).
"""
from __future__ import annotations

import io
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

import pyarrow.parquet as pq

from pipeline.arrays import unpack
from pipeline.storage import Storage, is_remote, join_uri, strip_file_scheme
from pipeline.train.config import TrainConfig

log = logging.getLogger("imgtalk.train")


class TrainError(RuntimeError):
    """Training could not start or did not finish; the message says why."""


@dataclass
class TrainResult:
    stage: str
    bundle_uri: str
    steps: int
    metrics: dict
    run_dir: str
    seconds: float


def run_dir_of(config: TrainConfig) -> str:
    return join_uri(_absolute(config.storage_path), config.name, "imgtalk")


def _absolute(uri: str) -> str:
    return uri if is_remote(uri) else os.path.abspath(strip_file_scheme(uri))


def _read_parquet_rows(storage: Storage, uri: str) -> list[dict]:
    return pq.read_table(io.BytesIO(storage.read_bytes(uri))).to_pylist()


def load_corpus(storage: Storage, shards_uri: str) -> tuple[dict, dict, dict[str, list[str]]]:
    """(card, videos by id with their neutral state, shard files per split) of a prepared corpus."""
    try:
        card = json.loads(storage.read_bytes(join_uri(shards_uri, "card.json")))
        rows = _read_parquet_rows(storage, join_uri(shards_uri, "videos.parquet"))
    except FileNotFoundError as e:
        raise TrainError(f"{shards_uri}: not a prepared corpus (card.json / videos.parquet missing; run imgtalk prepare)") from e
    videos = {r["video_id"]: {"neutral_x_c": unpack(r["neutral_x_c"]), "neutral_exp": unpack(r["neutral_exp"])} for r in rows}
    files: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for r in sorted(rows, key=lambda r: r["video_id"]):
        files[r["split"]].extend(r["chunk_uris"])
    return card, videos, files


def _filesystem(storage: Storage, uris: list[str]):
    """(pyarrow-usable filesystem or None, paths) for ray.data.read_parquet."""
    if uris and is_remote(uris[0]):
        fs, _ = storage.fs_for(uris[0])
        return fs, [u.split("://", 1)[1] for u in uris]
    return None, [strip_file_scheme(u) for u in uris]


def _storage_filesystem(config: TrainConfig):
    """Ray Train's storage on an S3-compatible endpoint: a pyarrow filesystem (path prefix
    stripped, as RunConfig expects)."""
    if not is_remote(config.storage_path) or not config.storage_path.startswith("s3://"):
        return None, config.storage_path
    endpoint = config.storage.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint:
        return None, config.storage_path
    import pyarrow.fs

    scheme = "http" if endpoint.startswith("http://") else "https"
    fs = pyarrow.fs.S3FileSystem(endpoint_override=endpoint.split("://", 1)[1], scheme=scheme,
                                 region=config.storage.region or os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
    return fs, config.storage_path[len("s3://"):]


def _progress(storage: Storage, uri: str, total: int, stop: threading.Event, stream) -> None:
    """Follow rank 0's progress file with a tqdm bar (steps, loss, ETA) until `stop`."""
    from tqdm import tqdm

    with tqdm(total=total, unit="step", file=stream, dynamic_ncols=True) as bar:
        while not stop.wait(1.0):
            try:
                p = json.loads(storage.read_bytes(uri))
            except (FileNotFoundError, ValueError):
                continue
            bar.update(max(0, int(p["step"]) - bar.n))
            shown = {k: f"{p[k]:.4g}" for k in ("loss", "val_rec") if isinstance(p.get(k), float)}
            bar.set_postfix(shown)


def write_bundle(base_root: str, out_uri: str, stage: str, network, card: dict, steps: int, run: str,
                 storage: Storage, component: str | None = None, fine_tune: bool = False) -> str:
    """The base bundle with `stage`'s folder replaced by the trained network; bundle.json
    records each trained stage's corpus card and steps, and `trained` once both are.
    fine_tune: the network continued the base's (e.g. a VAE's decoder alone), so the base's
    record of that stage is kept inside the new one, under "fine_tunes"."""
    with tempfile.TemporaryDirectory(prefix="imgtalk-bundle-") as tmp:
        root = tmp if is_remote(out_uri) else strip_file_scheme(out_uri)
        if os.path.abspath(root) != os.path.abspath(base_root):
            if os.path.exists(root):
                shutil.rmtree(root)
            shutil.copytree(base_root, root, ignore=shutil.ignore_patterns(".complete"))
        with open(os.path.join(root, "bundle.json")) as f:
            meta = json.load(f)
        target = os.path.join(root, meta.get("components", {}).get(component or stage, component or stage))
        if target.endswith(".pth"):  # LivePortrait's file: its network saves the folder around it
            target = os.path.dirname(target)
        staged = target + ".new"
        shutil.rmtree(staged, ignore_errors=True)
        network.save_pretrained(staged)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staged, target)
        training = meta.get("training", {})
        entry = {"corpus": card["id"], "steps": int(steps), "run": run,
                 "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if fine_tune and stage in training:
            entry["fine_tunes"] = training[stage]
        training[stage] = entry
        meta["training"] = training
        meta["trained"] = all(s in training for s in ("stage1", "stage2"))
        meta["note"] = ("trained by imgtalk train" if meta["trained"] else
                        f"{', '.join(sorted(training))} trained; the other stage is still untrained")
        with open(os.path.join(root, "bundle.json"), "w") as f:
            json.dump(meta, f, indent=2)
        if is_remote(out_uri):
            from pipeline.weights import upload_folder

            upload_folder(storage, root, out_uri)
    return out_uri


def run_train(stage: str, shards_uri: str, weights_uri: str, output_uri: str, config: TrainConfig | None = None,
              address: str | None = None, progress: bool | None = None, fault: dict | None = None) -> TrainResult:
    """fault (tests of restarts): {"step": N, "marker": uri} makes every rank fail once before
    step N; with "stall_rank": r that rank hangs there instead, without dying, and the others
    go on into the step's all-reduce; with "data_stall": true every rank's read of that
    step's batch hangs instead."""
    import ray
    import ray.data
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.dub.job import _init_ray
    from pipeline.train.loop import CHECKPOINT_STATE, train_loop
    from pipeline.train.tasks import TASKS
    from pipeline.weights import localize_bundle, read_bundle_info

    config = config or TrainConfig()
    if stage not in TASKS:
        raise TrainError(f"unknown stage {stage!r}; choose one of {sorted(TASKS)}")
    storage = Storage(config.storage.options())
    started = time.perf_counter()
    card, videos, files = load_corpus(storage, shards_uri)
    if len(files["train"]) < config.num_workers:
        raise TrainError(f"{shards_uri}: {len(files['train'])} training shard files for {config.num_workers} workers; "
                         "prepare more data or use fewer workers")
    base_root = localize_bundle(weights_uri, storage)
    info = read_bundle_info(base_root)
    task = TASKS[stage](config, card)
    if config.init_from_bundle and stage not in ("stage1", "stage2"):
        raise TrainError(f"init_from_bundle starts stage1 or stage2 from the bundle's network, not {stage}"
                         + (" (vae.decoder_only fine-tunes the VAE's decoder)" if stage == "vae" else ""))
    model_config = task.model_config(info)

    started_ray = _init_ray(address)
    try:
        def samples(uris: list[str], split: str):
            fs, paths = _filesystem(storage, uris)
            sampler = task.sampler(videos, config.seed, model_config, split)
            dataset = ray.data.read_parquet(paths, filesystem=fs).flat_map(sampler)
            # Samples are drawn from a chunk by a seed of its own (tasks.chunk_rng), so every
            # epoch reads the same samples: materialising them once changes nothing but the time.
            return dataset.materialize() if config.cache_samples else dataset

        world = config.num_workers
        datasets = {f"train_{r}": samples(files["train"][r::world], "train") for r in range(world)}
        if files["val"]:
            datasets["val"] = samples(files["val"], "val")
        storage_fs, storage_path = _storage_filesystem(config)
        run_config = RunConfig(
            name=config.name,
            storage_path=storage_path if storage_fs is not None else _absolute(storage_path),
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=config.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=config.num_to_keep),
        )
        run_dir = run_dir_of(config)
        trainer = TorchTrainer(
            train_loop,
            torch_config=TorchConfig(timeout_s=config.collective_timeout_s),  # backend: nccl on GPUs, gloo on CPUs
            train_loop_config={"stage": stage, "train": config.model_dump(mode="json"), "card": card,
                               "bundle": _absolute(weights_uri),  # the workers' working folder may not be ours
                               "run_dir": run_dir, "has_val": bool(files["val"]), "fault": fault},
            scaling_config=ScalingConfig(num_workers=world, use_gpu=config.use_gpu,
                                         resources_per_worker={"CPU": config.cpus_per_worker, **({"GPU": 1} if config.use_gpu else {})}),
            run_config=run_config,
            datasets=datasets,
            # Each rank reads its own dataset, in order: a resumed run skips exactly the batches it took.
            dataset_config=DataConfig(datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True)),
        )
        show = sys.stderr.isatty() if progress is None else progress
        stop = threading.Event()
        watcher = None
        if show:
            watcher = threading.Thread(target=_progress, args=(storage, join_uri(run_dir, f"progress-{stage}.json"),
                                                               config.steps, stop, sys.stderr), daemon=True)
            watcher.start()
        try:
            result = trainer.fit()
        except Exception as e:  # noqa: BLE001 - Ray wraps the worker's error; say it plainly
            raise TrainError(f"training {stage} failed: {type(e).__name__}: {e}") from e
        finally:
            stop.set()
            if watcher is not None:
                watcher.join(timeout=5)
        if result.error is not None:
            raise TrainError(f"training {stage} failed: {result.error}")
        if result.checkpoint is None:
            raise TrainError(f"training {stage} ended without a checkpoint")
        import torch

        with result.checkpoint.as_directory() as folder:
            state = torch.load(os.path.join(folder, CHECKPOINT_STATE), map_location="cpu", weights_only=True)
            with open(os.path.join(folder, "meta.json")) as f:
                steps = int(json.load(f)["position"]["step"])
        network = task.load_network(model_config, state)
        write_bundle(base_root, output_uri, stage, network, card, steps, config.name, storage,
                     component=getattr(task, "component", stage), fine_tune=getattr(task, "fine_tunes_base", False))
        return TrainResult(stage, output_uri, steps, dict(result.metrics or {}), run_dir, time.perf_counter() - started)
    finally:
        if started_ray:
            ray.shutdown()


def read_curve(storage: Storage, run_dir: str, stage: str) -> list[dict]:
    """Every row rank 0 wrote for `stage` (steps, validations, resumes), in order."""
    folder = join_uri(run_dir, "curves", stage)
    rows = []
    for uri in storage.listdir(folder):
        path = uri if "://" in uri or uri.startswith("/") else join_uri(folder, uri)
        if is_remote(folder) and "://" not in path:
            path = folder.split("://", 1)[0] + "://" + path
        rows.extend(json.loads(line) for line in storage.read_bytes(path).decode().splitlines() if line)
    return rows
