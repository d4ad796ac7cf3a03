"""stages/common/checkpoint.py: meta-device loading, dtype/device, `_class` check, errors."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from stages.common.checkpoint import CONFIG_NAME, WEIGHTS_NAME, CheckpointError, load_pretrained, save_pretrained


@dataclass
class TinyConfig:
    dim: int = 6
    hidden: int = 10
    scale: float = 2.0


class Tiny(nn.Module):
    def __init__(self, config: TinyConfig):
        super().__init__()
        self.config = config
        self.inp = nn.Linear(config.dim, config.hidden)
        self.norm = nn.LayerNorm(config.hidden)
        self.out = nn.Linear(config.hidden, config.dim)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))  # persistent, integer

    def forward(self, x):
        return self.out(torch.relu(self.norm(self.inp(x))))


class Other(Tiny):
    pass


class Stats(nn.Module):
    """Non-persistent buffers computed from the config (as IMC-UNet's motion statistics)."""

    def __init__(self, dim: int, scale: float):
        super().__init__()
        self.register_buffer("mean", torch.arange(dim, dtype=torch.float32) * scale, persistent=False)
        self.register_buffer("std", torch.full((dim,), scale), persistent=False)


class WithStats(nn.Module):
    def __init__(self, config: TinyConfig):
        super().__init__()
        self.stats = Stats(config.dim, config.scale)
        self.proj = nn.Linear(config.dim, config.dim)

    def forward(self, x):
        return self.proj((x - self.stats.mean) / self.stats.std)


class Derived(nn.Module):
    """A non-persistent buffer computed from a parameter: needs reset_buffers()."""

    def __init__(self, config: TinyConfig):
        super().__init__()
        self.proj = nn.Linear(config.dim, config.dim)
        self.register_buffer("row_sums", torch.empty(config.dim), persistent=False)
        self.reset_buffers()

    def reset_buffers(self):
        self.row_sums = self.proj.weight.detach().sum(dim=1)


class DerivedNoReset(nn.Module):
    def __init__(self, config: TinyConfig):
        super().__init__()
        self.proj = nn.Linear(config.dim, config.dim)
        self.register_buffer("row_sums", self.proj.weight.detach().sum(dim=1), persistent=False)


def _saved(tmp_path, cls=Tiny, config=None, name="tiny"):
    torch.manual_seed(0)
    config = config or TinyConfig()
    module = cls(config)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p))  # not the init values, so a re-init would show
    folder = str(tmp_path / name)
    save_pretrained(module, config, folder)
    return module, folder


def test_round_trip_is_equal(tmp_path):
    module, folder = _saved(tmp_path)
    module.steps.fill_(7)
    save_pretrained(module, module.config, folder)
    loaded = load_pretrained(Tiny, TinyConfig, folder)
    assert isinstance(loaded, Tiny) and not loaded.training
    for (name, a), (_, b) in zip(module.state_dict().items(), loaded.state_dict().items()):
        assert b.device.type == "cpu" and b.dtype == a.dtype, name
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    assert loaded.steps.item() == 7 and loaded.steps.dtype == torch.long
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in loaded.parameters())
    x = torch.randn(3, 6)
    torch.testing.assert_close(loaded(x), module(x))
    assert json.load(open(os.path.join(folder, CONFIG_NAME)))["_class"] == "Tiny"


def test_load_never_initialises_parameters_in_real_memory(tmp_path, monkeypatch):
    _, folder = _saved(tmp_path)
    calls = []
    real_kaiming, real_ones = nn.init.kaiming_uniform_, nn.init.ones_

    def spy(real):
        def init(tensor, *args, **kwargs):
            calls.append(tensor.device.type)
            return real(tensor, *args, **kwargs)

        return init

    # nn.Linear.reset_parameters -> init.kaiming_uniform_; nn.LayerNorm -> init.ones_.
    monkeypatch.setattr(nn.init, "kaiming_uniform_", spy(real_kaiming))
    monkeypatch.setattr(nn.init, "ones_", spy(real_ones))
    Tiny(TinyConfig())
    assert calls and set(calls) == {"cpu"}  # the spy sees a normal build's init
    calls.clear()
    loaded = load_pretrained(Tiny, TinyConfig, folder)
    assert calls and set(calls) == {"meta"}, calls  # inits ran only on shapes, never on memory
    assert not any(t.is_meta for t in loaded.state_dict().values())


def test_dtype_and_device_load_directly_in_the_compute_dtype(tmp_path):
    module, folder = _saved(tmp_path)
    loaded = load_pretrained(Tiny, TinyConfig, folder, dtype=torch.bfloat16, device="cpu")
    for name, p in loaded.named_parameters():
        assert p.dtype == torch.bfloat16 and p.device.type == "cpu", name
        torch.testing.assert_close(p, module.get_parameter(name).to(torch.bfloat16), rtol=0, atol=0)
    assert loaded.steps.dtype == torch.long  # not floating: untouched
    assert loaded(torch.randn(2, 6, dtype=torch.bfloat16)).dtype == torch.bfloat16

    # The file is fp32; without dtype the network's own dtype is kept. A float16 load
    # that overflows is refused naming the tensor.
    with torch.no_grad():
        module.inp.bias[0] = 1e6
    save_pretrained(module, module.config, folder)
    assert load_pretrained(Tiny, TinyConfig, folder).inp.bias.dtype == torch.float32
    with pytest.raises(CheckpointError, match=r"tiny.model\.safetensors.*'inp\.bias' overflows torch\.float16"):
        load_pretrained(Tiny, TinyConfig, folder, dtype=torch.float16)


def test_a_config_saved_by_another_class_is_refused(tmp_path):
    _, folder = _saved(tmp_path, cls=Other, name="other")
    with pytest.raises(CheckpointError, match=r"other.config\.json.*'Other'.*'Tiny'"):
        load_pretrained(Tiny, TinyConfig, folder)

    # A builder that is not a class is checked against the class it builds.
    with pytest.raises(CheckpointError, match=r"config\.json.*'Other'.*'Tiny'"):
        load_pretrained(lambda config: Tiny(config), TinyConfig, folder)
    assert isinstance(load_pretrained(Other, TinyConfig, folder), Other)

    # Configs written without `_class` still load.
    path = os.path.join(folder, CONFIG_NAME)
    data = json.load(open(path))
    del data["_class"]
    json.dump(data, open(path, "w"))
    assert isinstance(load_pretrained(Tiny, TinyConfig, folder), Tiny)


def test_missing_and_misshapen_tensors_name_file_and_tensor(tmp_path):
    _, folder = _saved(tmp_path)
    path = os.path.join(folder, WEIGHTS_NAME)
    state = load_file(path)

    partial = dict(state)
    del partial["norm.weight"]
    save_file(partial, path)
    with pytest.raises(CheckpointError, match=r"tiny.model\.safetensors.*missing tensors \['norm\.weight'\]"):
        load_pretrained(Tiny, TinyConfig, folder)

    save_file({**state, "extra.weight": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*unexpected tensors \['extra\.weight'\]"):
        load_pretrained(Tiny, TinyConfig, folder)

    save_file({**state, "out.weight": torch.zeros(6, 11)}, path)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*'out\.weight' has shape \(6, 11\).*\(6, 10\)"):
        load_pretrained(Tiny, TinyConfig, folder)

    save_file({**state, "inp.bias": torch.full((10,), float("nan"))}, path)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*'inp\.bias' holds NaN"):
        load_pretrained(Tiny, TinyConfig, folder)

    with open(path, "wb") as f:
        f.write(b"\x00" * 20)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*corrupt"):
        load_pretrained(Tiny, TinyConfig, folder)
    os.remove(path)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*not found"):
        load_pretrained(Tiny, TinyConfig, folder)


def test_non_persistent_buffers_computed_from_the_config_come_back(tmp_path):
    config = TinyConfig(dim=4, scale=3.0)
    module, folder = _saved(tmp_path, cls=WithStats, config=config, name="stats")
    assert "stats.mean" not in load_file(os.path.join(folder, WEIGHTS_NAME))  # not in the file
    loaded = load_pretrained(WithStats, TinyConfig, folder)
    assert not loaded.stats.mean.is_meta and loaded.stats.mean.device.type == "cpu"
    torch.testing.assert_close(loaded.stats.mean, torch.tensor([0.0, 3.0, 6.0, 9.0]))
    torch.testing.assert_close(loaded.stats.std, torch.full((4,), 3.0))
    x = torch.randn(2, 4)
    torch.testing.assert_close(loaded(x), module(x))
    # Buffers follow the compute dtype too.
    assert load_pretrained(WithStats, TinyConfig, folder, dtype=torch.bfloat16).stats.std.dtype == torch.bfloat16


def test_buffers_computed_from_parameters_come_back_through_reset_buffers(tmp_path):
    module, folder = _saved(tmp_path, cls=Derived, name="derived")
    module.reset_buffers()  # after the test's weight change
    loaded = load_pretrained(Derived, TinyConfig, folder)
    torch.testing.assert_close(loaded.row_sums, module.row_sums, rtol=0, atol=0)

    _, folder = _saved(tmp_path, cls=DerivedNoReset, name="noreset")
    with pytest.raises(CheckpointError, match=r"noreset.model\.safetensors.*\['row_sums'\].*DerivedNoReset has no reset_buffers"):
        load_pretrained(DerivedNoReset, TinyConfig, folder)


def test_building_for_a_load_leaves_other_builds_alone(tmp_path):
    _, folder = _saved(tmp_path)
    load_pretrained(Tiny, TinyConfig, folder)
    assert not any(p.is_meta for p in Tiny(TinyConfig()).parameters())  # the hook is gone
