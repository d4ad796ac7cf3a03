"""Symmetric save/load for IMGTalk's own networks: `config.json` + `model.safetensors`.

Every network of ours has a small config dataclass. `save_pretrained` writes the config
as JSON and the state dict as safetensors; `load_pretrained` rebuilds the module from the
config and loads the tensors strictly. Any mismatch names the file and the tensor, so a
user who points us at the wrong folder learns which file and which tensor is wrong.

Loading never initialises parameters in real memory: while `build(config)` runs, every
parameter is moved to the meta device the moment it is registered (a parameter
registration hook, active only in the loading thread), so the init kernels that follow
(`reset_parameters`, `nn.init.*`) run on shapes only and nothing is allocated or filled.
Buffers are built as usual on the CPU, so non-persistent buffers computed from the config
(e.g. normalisation statistics) come out right without any help from the module. The
file's tensors are then checked against the module, read one at a time (cast to the
compute dtype and put on the compute device as they are read) and put in place of the
meta parameters with `load_state_dict(strict=True, assign=True)`. A 1B-parameter network
therefore costs its weights once, in the dtype it runs in, not a random init plus an
fp32 copy.

The rule for modules: everything a module holds must be in the state dict (parameters,
persistent buffers) or computable from the config in `__init__`. A non-persistent
buffer computed from a *parameter* in `__init__` would be left on meta: such a module
defines `reset_buffers()`, which the loader calls once the weights are in (it recomputes
the buffers from them); without it loading fails naming the buffer. A plain tensor
attribute computed from a parameter fails the same way (make it such a buffer).

`config.json` records the class that saved it (`_class`); loading it into another class
is refused, naming the file and both classes. Configs without `_class` load as before.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import threading
from typing import Any, Callable, Iterable, Type, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

C = TypeVar("C")

_building = threading.local()  # .depth > 0 while this thread runs a builder for load_pretrained


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


def _read_config_json(path: str) -> dict:
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: config file not found")
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable config ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: unreadable config (a JSON object expected, got {type(data).__name__})")
    return data


def check_config_class(data: dict, expected: str, source: str) -> None:
    """A config saved by another class (its `_class`) is refused; no `_class` passes."""
    found = data.get("_class")
    if found is not None and found != expected:
        raise CheckpointError(
            f"{source}: this checkpoint was saved by class {found!r}, but it is being loaded as {expected!r}; "
            f"point {expected} at a folder saved by {expected}"
        )


def load_config(config_cls: Type[C], folder: str, expected_class: str | None = None) -> C:
    path = os.path.join(folder, CONFIG_NAME)
    data = _read_config_json(path)
    if expected_class is not None:
        check_config_class(data, expected_class, path)
    return config_from_dict(config_cls, data, source=path)


def save_state_dict(module: torch.nn.Module, path: str) -> str:
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(state, path)
    return path


def _check_keys(expected: Iterable[str], found: Iterable[str], source: str) -> None:
    expected, found = list(expected), list(found)
    expected_set, found_set = set(expected), set(found)
    missing = [k for k in expected if k not in found_set]
    unexpected = [k for k in found if k not in expected_set]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing[:5]}{' …' if len(missing) > 5 else ''} ({len(missing)} in all)")
        if unexpected:
            parts.append(
                f"unexpected tensors {unexpected[:5]}{' …' if len(unexpected) > 5 else ''} ({len(unexpected)} in all)"
            )
        raise CheckpointError(f"{source}: " + "; ".join(parts))


def _check_tensor(key: str, got: Any, ref: torch.Tensor, source: str) -> None:
    if not isinstance(got, torch.Tensor):
        raise CheckpointError(f"{source}: tensor '{key}' is a {type(got).__name__}, not a tensor")
    if tuple(got.shape) != tuple(ref.shape):
        raise CheckpointError(
            f"{source}: tensor '{key}' has shape {tuple(got.shape)}, the network expects {tuple(ref.shape)}"
        )
    if got.is_floating_point() and not torch.isfinite(got).all():
        raise CheckpointError(f"{source}: tensor '{key}' holds NaN or Inf values")


def load_state_dict_strict(
    module: torch.nn.Module, state: dict[str, torch.Tensor], source: str, assign: bool = False
) -> None:
    """Strict load whose errors name the file and the offending tensor(s).

    `assign=True` puts the given tensors into the module instead of copying into its own
    (what a module built on the meta device needs).
    """
    expected = module.state_dict()
    _check_keys(expected, state, source)
    for key, ref in expected.items():
        _check_tensor(key, state[key], ref, source)
    module.load_state_dict(state, strict=True, assign=assign)


def load_torch_state(path: str, what: str) -> dict[str, torch.Tensor]:
    """A third-party network's released file: `torch.save` of a flat name -> tensor dict
    (torchvision's VGG19, pytorch-fid's Inception, syncnet_python's SyncNet), read with
    weights_only=True. Errors name the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: {what} weights file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt or unreadable torch file ({e})") from e
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f"{path}: expected a flat name -> tensor dict ({what} layout), got {type(state).__name__}")
    return dict(state)


def with_batch_counts(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` plus zero BatchNorm `num_batches_tracked` entries where a file omits them
    (eval mode never reads them); every other tensor is still checked strictly."""
    filled = dict(state)
    for key, ref in module.state_dict().items():
        if key.endswith("num_batches_tracked") and key not in filled:
            filled[key] = torch.zeros_like(ref)
    return filled


def save_torch_state(module: torch.nn.Module, path: str) -> None:
    """The inverse of load_torch_state: a flat name -> tensor dict, torch.save'd."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}, path)


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


def _convert(t: torch.Tensor, dtype: torch.dtype | None, device: torch.device) -> torch.Tensor:
    """To the compute device; floating tensors to `dtype` when given, others keep theirs."""
    cast = dtype if dtype is not None and t.is_floating_point() else None
    return t.to(device=device, dtype=cast)


def _unreadable(path: str, e: Exception) -> CheckpointError:
    return CheckpointError(f"{path}: corrupt or unreadable safetensors file ({e})")


def _read_state_streaming(
    path: str, expected: dict[str, torch.Tensor], dtype: torch.dtype | None, device: torch.device
) -> dict[str, torch.Tensor]:
    """Check and read the file's tensors one at a time, each converted as soon as it is
    read, so the peak is the converted weights plus one tensor as stored.

    Floating tensors become `dtype`, or without one the dtype the network was built with
    (as a copying load_state_dict would); other tensors keep their dtype.
    """
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: weights file not found")
    state: dict[str, torch.Tensor] = {}
    try:
        f = safe_open(path, framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _unreadable(path, e) from e
    with f:
        _check_keys(expected, list(f.keys()), path)
        for key, ref in expected.items():
            try:
                got = f.get_tensor(key)
            except (SafetensorError, OSError, ValueError, RuntimeError) as e:
                raise _unreadable(path, e) from e
            _check_tensor(key, got, ref, path)
            target = dtype if dtype is not None else ref.dtype
            converted = _convert(got, target if ref.is_floating_point() else None, device)
            if converted.dtype != got.dtype and converted.is_floating_point() and not torch.isfinite(converted).all():
                raise CheckpointError(f"{path}: tensor '{key}' overflows {converted.dtype} (finite as stored)")
            del got
            state[key] = converted
    return state


def _parameter_to_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter):
    """Parameter registration hook: in a loading thread, the parameter becomes a meta one."""
    if getattr(_building, "depth", 0) <= 0 or param.is_meta:
        return None
    if isinstance(param, torch.nn.parameter.UninitializedParameter) or type(param) is not torch.nn.Parameter:
        return None  # lazy or custom parameter types are left as they are
    return torch.nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)


def build_with_meta_parameters(build: Callable[[Any], torch.nn.Module], config: Any) -> torch.nn.Module:
    """`build(config)` with every parameter on the meta device as it is registered (so no
    init touches memory); buffers are built for real on the CPU."""
    handle = torch.nn.modules.module.register_module_parameter_registration_hook(_parameter_to_meta)
    _building.depth = getattr(_building, "depth", 0) + 1
    try:
        return build(config)
    finally:
        _building.depth -= 1
        handle.remove()


def _full_name(owner_name: str, name: str) -> str:
    return f"{owner_name}.{name}" if owner_name else name


def _materialize_buffers(
    module: torch.nn.Module, source: str, dtype: torch.dtype | None, device: torch.device
) -> None:
    """After assigning the file's tensors: buffers still on meta (computed from meta
    parameters in __init__) are recomputed by their owner's `reset_buffers()`; then every
    buffer goes to `device` (floating ones in `dtype` when given). Anything still on meta
    is an error naming it."""
    for owner_name, owner in module.named_modules():
        meta = [n for n, b in owner._buffers.items() if b is not None and b.is_meta]
        if not meta:
            continue
        reset = getattr(owner, "reset_buffers", None)
        if not callable(reset):
            raise CheckpointError(
                f"{source}: buffer(s) {[_full_name(owner_name, n) for n in meta]} are not in the file "
                f"(non-persistent) and were computed from parameters before the weights were loaded; "
                f"{type(owner).__name__} has no reset_buffers() to recompute them"
            )
        reset()
    for owner_name, owner in module.named_modules():
        for name, buf in owner._buffers.items():
            if buf is None:
                continue
            if buf.is_meta:
                raise CheckpointError(
                    f"{source}: buffer '{_full_name(owner_name, name)}' is still unset after "
                    f"{type(owner).__name__}.reset_buffers()"
                )
            owner._buffers[name] = _convert(buf, dtype, device)
        for name, param in owner._parameters.items():
            if param is not None and param.is_meta:
                raise CheckpointError(f"{source}: parameter '{_full_name(owner_name, name)}' was not loaded")
        for name, value in vars(owner).items():
            if isinstance(value, torch.Tensor) and value.is_meta:
                raise CheckpointError(
                    f"{source}: {type(owner).__name__} holds a plain tensor attribute "
                    f"'{_full_name(owner_name, name)}' computed from a parameter in __init__; make it a "
                    f"non-persistent buffer and define reset_buffers()"
                )


def load_pretrained(
    build: Callable[[Any], torch.nn.Module],
    config_cls: Type[C],
    folder: str,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> torch.nn.Module:
    """Rebuild a module from `folder/config.json` and load `folder/model.safetensors` strictly.

    The module's parameters are built on the meta device, so none is initialised in real
    memory; the file's tensors replace them. `dtype` casts the floating tensors as they are
    read (e.g. torch.bfloat16 for inference: no fp32 copy is ever kept), others keep their
    dtype; `device` is where every tensor, buffers included, lands. A config whose
    `_class` names another class than the one built is refused. Returns the module in
    eval mode.
    """
    config_path = os.path.join(folder, CONFIG_NAME)
    data = _read_config_json(config_path)
    if isinstance(build, type):
        check_config_class(data, build.__name__, config_path)
    config = config_from_dict(config_cls, data, source=config_path)
    module = build_with_meta_parameters(build, config)
    check_config_class(data, type(module).__name__, config_path)
    device = torch.device(device)
    path = os.path.join(folder, WEIGHTS_NAME)
    state = _read_state_streaming(path, module.state_dict(), dtype, device)
    module.load_state_dict(state, strict=True, assign=True)
    del state
    _materialize_buffers(module, path, dtype, device)
    module.eval()
    return module
