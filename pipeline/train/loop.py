"""The Ray Train worker loop shared by Stage 1 and Stage 2 (TorchTrainer, Train V2).

Each rank reads its own dataset of training samples through `get_dataset_shard`
("train_<rank>"; the driver deals the shard files out round-robin, so a rank's order is
deterministic and a resumed run can skip exactly the batches it already took), wraps the
network with `prepare_model` (DDP, or FSDP on GPUs), and steps the Ray-free trainer.

Equal steps on every rank: before each step the ranks agree (all-reduce MIN) that every one
of them has a batch; when any rank runs dry the epoch ends for all, so DDP never waits on
a rank that has stopped (Ray issue #66085). A rank waits at most `data_timeout_s` for its next
batch: a read that never finishes, on every rank at once, would otherwise hang the job with
no collective to time out, and it ends as a failure the group restarts from instead.

Checkpoints (every `checkpoint_every` steps and at the end) hold the trainer (model,
optimisers, schedulers, the trainer's generator), the global RNG states and the data
position (epoch, batches taken in the epoch). `ray.train.get_checkpoint()` hands the latest
one back after a worker-group restart (FailureConfig) or when the same run is started again.
Rank 0 writes the per-step curve to <storage_path>/<name>/imgtalk/curves/ and a progress
file the driver's progress bar follows.
"""
from __future__ import annotations

import json
import os
import random
import tempfile
import threading
import time

import numpy as np

from pipeline.storage import Storage, join_uri

CHECKPOINT_STATE = "trainer.pt"
CHECKPOINT_META = "meta.json"


def _all_have(has: bool, device) -> bool:
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return has
    flag = torch.tensor([1 if has else 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def next_within(batches, timeout_s: float, waiting_for: str):
    """next(batches, None), read in a helper thread so that a read that never returns raises
    TimeoutError after timeout_s instead of blocking the rank for good. The helper is a
    daemon: one left blocked dies with the worker when the group is torn down."""
    result: dict = {}

    def read() -> None:
        try:
            result["batch"] = next(batches, None)
        except BaseException as error:  # handed to the rank's own thread below
            result["error"] = error

    reader = threading.Thread(target=read, name="imgtalk-next-batch", daemon=True)
    reader.start()
    reader.join(timeout_s)
    if reader.is_alive():
        raise TimeoutError(f"{waiting_for}: no batch within data_timeout_s={timeout_s:g} s; the data read is stuck "
                           "(the group restarts from its last checkpoint)")
    if "error" in result:
        raise result["error"]
    return result["batch"]


def _stalled_reads():
    threading.Event().wait()  # until the group is torn down
    yield


def _rng_state() -> dict:
    import torch

    name, keys, pos, has_gauss, gauss = np.random.get_state()
    # Plain lists and a tensor only, so the file loads with torch.load(weights_only=True).
    return {"python": list(random.getstate()), "numpy": [name, keys.tolist(), pos, has_gauss, gauss],
            "torch": torch.get_rng_state()}


def _set_rng_state(state: dict) -> None:
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])


def train_loop(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch

    from pipeline import metrics
    from pipeline.train.config import TrainConfig
    from pipeline.train.tasks import TASKS
    from pipeline.weights import localize_bundle, read_bundle_info

    cfg = TrainConfig.model_validate(loop_config["train"])
    task = TASKS[loop_config["stage"]](cfg, loop_config["card"])
    storage = Storage(cfg.storage.options())
    run_dir = loop_config["run_dir"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.torch_threads)
    device = ray.train.torch.get_device()
    autocast = torch.bfloat16 if device.type == "cuda" and cfg.precision == "bf16" else None

    def wrap(module):
        if world == 1:
            return module
        kwargs = {"broadcast_buffers": False} if cfg.strategy == "ddp" else {}
        return ray.train.torch.prepare_model(module, parallel_strategy=cfg.strategy, parallel_strategy_kwargs=kwargs)

    info = read_bundle_info(localize_bundle(loop_config["bundle"], storage))
    model_config = task.model_config(info)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    trainer = task.build_trainer(info, model_config, wrap, device, autocast, seed=cfg.seed * 1000 + rank)

    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0}
    resumed_from = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            trainer.load_state_dict(torch.load(os.path.join(folder, CHECKPOINT_STATE), map_location=device, weights_only=True))
            saved = torch.load(os.path.join(folder, "rng.pt"), weights_only=True)
            with open(os.path.join(folder, CHECKPOINT_META)) as f:
                state = json.load(f)["position"]
        mine = saved[rank] if rank < len(saved) else saved[0]
        _set_rng_state(mine)
        if mine.get("generator") is not None and hasattr(trainer, "generator"):
            # The trainer state above is rank 0's; each rank's own noise stream is its own.
            trainer.generator.set_state(mine["generator"])
        resumed_from = state["step"]

    fault = loop_config.get("fault") or {}
    # Decided by every rank at its start, before any rank can write the marker, so all ranks
    # fail at the same step: one rank failing alone would leave the others blocked in a
    # collective waiting for it until the process group's timeout.
    inject_fault = bool(fault) and not storage.exists(fault["marker"])
    train_data = ray.train.get_dataset_shard(f"train_{rank}")
    val_data = ray.train.get_dataset_shard("val") if rank == 0 and loop_config.get("has_val") else None
    curve: list[dict] = []
    if resumed_from is not None and rank == 0:
        curve.append({"event": "resumed", "step": resumed_from, "time": time.time()})
    steps_here = 0
    started = time.perf_counter()

    def validate() -> dict:
        if val_data is None:
            return {}
        totals: dict[str, float] = {}
        count = 0
        for batch in val_data.iter_torch_batches(batch_size=cfg.batch_size, drop_last=False):
            for key, value in trainer.evaluate(task.to_batch(batch)).items():
                totals[key] = totals.get(key, 0.0) + value
            count += 1
            if count >= cfg.val_batches:
                break
        return {f"val_{k}": v / count for k, v in totals.items()} if count else {}

    def report(final: bool) -> None:
        step = state["step"]
        due_val = final or step % cfg.val_every == 0
        due_ckpt = final or step % cfg.checkpoint_every == 0
        values = validate() if due_val else {}
        last = next((r for r in reversed(curve) if "loss" in r), {})
        metrics_out = {"step": step, **{k: v for k, v in last.items() if isinstance(v, float)}, **values}
        if rank == 0:
            if values:
                curve.append({"event": "validation", "step": step, **values})
            part = join_uri(run_dir, "curves", task.name, f"{step:09d}-{int(time.time() * 1000)}.jsonl")
            storage.write_bytes_atomic("".join(json.dumps(r) + "\n" for r in curve).encode(), part)
            curve.clear()
            progress = {"step": step, "total": cfg.steps, "time": time.time(), **metrics_out}
            storage.write_bytes_atomic(json.dumps(progress).encode(), join_uri(run_dir, f"progress-{task.name}.json"))
        # Every rank's random state (global RNGs and the trainer's own generator), so each
        # rank resumes its own streams; gathered only when a checkpoint is written.
        own = {**_rng_state(), "generator": trainer.generator.get_state() if hasattr(trainer, "generator") else None}
        rng = [own]
        if world > 1 and due_ckpt:
            import torch.distributed as dist

            rng = [None] * world
            dist.all_gather_object(rng, own)
        with tempfile.TemporaryDirectory(prefix="imgtalk-ckpt-") as folder:
            ckpt = None
            if due_ckpt and rank == 0:
                torch.save(trainer.state_dict(), os.path.join(folder, CHECKPOINT_STATE))
                torch.save(rng, os.path.join(folder, "rng.pt"))
                with open(os.path.join(folder, CHECKPOINT_META), "w") as f:
                    json.dump({"position": state, "stage": task.name, "card": loop_config["card"]["id"],
                               "model_config": _jsonable(model_config)}, f)
                ckpt = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(metrics_out, checkpoint=ckpt)

    while state["step"] < cfg.steps:
        batches = iter(train_data.iter_torch_batches(
            batch_size=cfg.batch_size, drop_last=True, local_shuffle_buffer_size=cfg.shuffle_buffer,
            local_shuffle_seed=cfg.seed * 100_003 + state["epoch"] * 1_009 + rank))
        waiting_for = f"rank {rank}, epoch {state['epoch']}"
        for _ in range(state["batch_in_epoch"]):  # the data position of a resumed run
            next_within(batches, cfg.data_timeout_s, waiting_for)
        took = 0
        while state["step"] < cfg.steps:
            if inject_fault and fault.get("data_stall") and fault["step"] == state["step"] + 1:
                if rank == 0:
                    storage.write_bytes_atomic(b"failed once", fault["marker"])
                batches, inject_fault = _stalled_reads(), False  # every rank's read hangs before this step
            batch = next_within(batches, cfg.data_timeout_s, waiting_for)
            if not _all_have(batch is not None, device):
                break
            if inject_fault and fault["step"] == state["step"] + 1:
                if rank == 0:
                    storage.write_bytes_atomic(b"failed once", fault["marker"])
                if "stall_rank" in fault:  # a rank that hangs without dying; the others go on
                    if rank == fault["stall_rank"]:
                        threading.Event().wait()  # until the group is torn down
                    inject_fault = False  # this step's all-reduce waits for the stalled rank
                else:
                    raise RuntimeError(f"injected failure before step {state['step'] + 1}")
            values = trainer.step(task.to_batch(batch), state["step"])
            state["step"] += 1
            state["batch_in_epoch"] += 1
            steps_here += 1
            took += 1
            if rank == 0:
                curve.append({"step": state["step"], "epoch": state["epoch"], "time": time.time(), **values})
                metrics.training_step(task.name, values, samples=cfg.batch_size * world)
            if state["step"] % cfg.val_every == 0 or state["step"] % cfg.checkpoint_every == 0 or state["step"] == cfg.steps:
                report(final=state["step"] == cfg.steps)
        if state["step"] >= cfg.steps:
            break
        if took == 0 and state["batch_in_epoch"] == 0:
            raise RuntimeError(f"rank {rank}: no training batch in epoch {state['epoch']}: the corpus yields fewer "
                               f"than batch_size={cfg.batch_size} samples per rank")
        state["epoch"] += 1
        state["batch_in_epoch"] = 0
    storage.write_bytes_atomic(
        json.dumps({"rank": rank, "steps": steps_here, "final_step": state["step"], "resumed_from": resumed_from,
                    "seconds": time.perf_counter() - started}).encode(),
        join_uri(run_dir, "ranks", task.name, f"rank{rank}.json"))


def _jsonable(config) -> dict:
    from stages.common.checkpoint import config_to_dict

    if hasattr(config, "to_dict"):  # transformers' (HuBERT's): its own dict, dtypes as names
        plain = config.to_dict()
    else:
        plain = dict(config) if isinstance(config, dict) else config_to_dict(config)  # the VAE's is diffusers' dict
    return json.loads(json.dumps(plain, default=list))
