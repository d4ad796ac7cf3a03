"""Symmetric save/load for IMGTalk's own networks: `config.json` + `model.safetensors`.

Every network of ours has a small config dataclass. `save_pretrained` writes the config
as JSON and the state dict as safetensors; `load_pretrained` rebuilds the module from the
config and loads the tensors strictly. Any mismatch names the file and the tensor, so a
user who points us at the wrong folder learns which file and which tensor is wrong.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Type, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

C = TypeVar("C")


class CheckpointError(ValueError):
    """A weights file is missing, corrupt, or does not match the network it is loaded into."""


def config_to_dict(config: Any) -> dict:
    out = dataclasses.asdict(config)
    # Tuples become lists in JSON; from_dict turns them back.
    return out


def config_from_dict(config_cls: Type[C], data: dict, source: str = "<dict>") -> C:
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(data) - set(fields) - {"_class"})
    if unknown:
        raise CheckpointError(f"{source}: unknown config keys {unknown} for {config_cls.__name__}")
    kwargs = {}
    for name, value in data.items():
        if name == "_class":
            continue
        if isinstance(value, list):
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        kwargs[name] = value
    return config_cls(**kwargs)


def save_config(config: Any, folder: str, cls_name: str | None = None) -> str:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, CONFIG_NAME)
    data = config_to_dict(config)
    if cls_name:
        data["_class"] = cls_name
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
    return path


def load_config(config_cls: Type[C], folder: str) -> C:
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: config file not found")
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable config ({e})") from e
    return config_from_dict(config_cls, data, source=path)


def save_state_dict(module: torch.nn.Module, path: str) -> str:
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(state, path)
    return path


def load_state_dict_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict load whose errors name the file and the offending tensor(s)."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing[:5]}{' …' if len(missing) > 5 else ''} ({len(missing)} in all)")
        if unexpected:
            parts.append(
                f"unexpected tensors {unexpected[:5]}{' …' if len(unexpected) > 5 else ''} ({len(unexpected)} in all)"
            )
        raise CheckpointError(f"{source}: " + "; ".join(parts))
    for key, ref in expected.items():
        got = state[key]
        if not isinstance(got, torch.Tensor):
            raise CheckpointError(f"{source}: tensor '{key}' is a {type(got).__name__}, not a tensor")
        if tuple(got.shape) != tuple(ref.shape):
            raise CheckpointError(
                f"{source}: tensor '{key}' has shape {tuple(got.shape)}, the network expects {tuple(ref.shape)}"
            )
        if got.is_floating_point() and not torch.isfinite(got).all():
            raise CheckpointError(f"{source}: tensor '{key}' holds NaN or Inf values")
    module.load_state_dict(state, strict=True)


def load_safetensors(path: str) -> dict[str, torch.Tensor]:
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: weights file not found")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: corrupt or unreadable safetensors file ({e})") from e


def save_pretrained(module: torch.nn.Module, config: Any, folder: str) -> None:
    """Write `config.json` and `model.safetensors` into `folder`."""
    os.makedirs(folder, exist_ok=True)
    save_config(config, folder, cls_name=type(module).__name__)
    save_state_dict(module, os.path.join(folder, WEIGHTS_NAME))


def load_pretrained(
    build: Callable[[Any], torch.nn.Module], config_cls: Type[C], folder: str
) -> torch.nn.Module:
    """Rebuild a module from `folder/config.json` and load `folder/model.safetensors` strictly."""
    config = load_config(config_cls, folder)
    module = build(config)
    path = os.path.join(folder, WEIGHTS_NAME)
    load_state_dict_strict(module, load_safetensors(path), source=path)
    module.eval()
    return module
