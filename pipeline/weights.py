"""The weights bundle: one folder (local path or any fsspec URI) holding every model the
dubbing job needs, in each model's own native format.

    <bundle>/
      bundle.json                         format, version, size, trained flag, component paths
      hubert/                             transformers HubertModel (config.json + model.safetensors)
      vae/                                diffusers AutoencoderKL (config.json + diffusion_pytorch_model.safetensors)
      liveportrait/motion_extractor.pth   LivePortrait's released file, loaded strictly
                                          (+ motion_extractor_config.json only for non-paper sizes)
      stage1/                             IMGTalk Stage 1 (config.json + model.safetensors)
      stage2/                             IMGTalk IMC-UNet (config.json + model.safetensors)
      syncnet/syncnet_v2.model            OPTIONAL: syncnet_python's released SyncNet (lip-sync
                                          quality checks; pipeline/dub/qc.py)

To assemble a real bundle: copy `facebook/hubert-large-ls960-ft` into hubert/,
`stabilityai/sd-vae-ft-mse` into vae/, LivePortrait's
`pretrained_weights/liveportrait/base_models/motion_extractor.pth` into liveportrait/,
and IMGTalk's trained Stage 1 / Stage 2 folders into stage1/ and stage2/; then write
bundle.json with "trained": true. `imgtalk weights init` writes a randomly initialised
bundle (marked untrained) so the whole system runs with no download.

Optional components are used when their file is there and are no error when it is not,
so every bundle made before them stays valid. One so far:

- `syncnet`: with `syncnet/syncnet_v2.model` present, every dubbed video is scored by
  SyncNet before it is committed (report columns sync_conf / sync_dist / sync_offset, the
  `qc.*` job settings). The project ships no copy: download syncnet_python's released
  file yourself (https://www.robots.ox.ac.uk/~vgg/software/lipsync/data/syncnet_v2.model,
  joonson/syncnet_python's download_model.sh) into `<bundle>/syncnet/`. To make it
  required from then on, also name it in bundle.json's "components" (`"syncnet":
  "syncnet/syncnet_v2.model"`).

A remote bundle is cached on each node under its content identity (`bundle_identity`:
every file's path, size and ETag), the same identity the dub job's resume key uses, so
any re-uploaded file (a retrained stage2/, an added syncnet/) is a new cache entry and
new segment keys, never new keys rendered with old weights.
"""
from __future__ import annotations

import hashlib
import json
import pickle
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Literal

from pipeline.storage import Storage, is_remote, strip_file_scheme

BUNDLE_FORMAT = "imgtalk-weights"
BUNDLE_VERSION = 1
COMPONENTS = {
    "hubert": "hubert",
    "vae": "vae",
    "motion_extractor": "liveportrait/motion_extractor.pth",
    "stage1": "stage1",
    "stage2": "stage2",
}
# Used when present; a bundle without them is complete (see the module docstring).
OPTIONAL_COMPONENTS = {
    "syncnet": "syncnet/syncnet_v2.model",
}


class BundleError(ValueError):
    """A bundle is missing, malformed, or one of its files does not match its network."""


@dataclass(frozen=True)
class BundleInfo:
    root: str  # local folder
    size: str
    trained: bool
    components: dict[str, str]

    def path(self, component: str) -> str:
        return os.path.join(self.root, self.components[component])

    def has(self, component: str) -> bool:
        """Whether the bundle holds `component` (always true for the required ones)."""
        return component in self.components


def _cache_dir() -> str:
    return os.environ.get("IMGTALK_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "imgtalk"))


def bundle_identity(uri: str, storage: Storage | None = None) -> str:
    """A digest of the bundle's content identity: the sorted listing of every file's
    relative path, size, and ETag (object stores) or modification time in ns (local
    files). Any file re-uploaded or rewritten changes it, bundle.json or not."""
    storage = storage or Storage()
    if is_remote(uri):
        fs, path = storage.fs_for(uri)
        root = path.rstrip("/") + "/"
        listing = storage.retry(lambda: fs.find(root, detail=True), f"list {uri}")
        entries = sorted(
            (name[len(root):], int(info.get("size") or 0), str(info.get("ETag") or info.get("LastModified") or "").strip('"'))
            for name, info in listing.items()
            if info.get("type", "file") == "file"
        )
    else:
        root = strip_file_scheme(uri)
        entries = []
        for folder, _, names in os.walk(root):
            for name in names:
                st = os.stat(os.path.join(folder, name))
                entries.append((os.path.relpath(os.path.join(folder, name), root), st.st_size, str(st.st_mtime_ns)))
        entries.sort()
    if not any(rel == "bundle.json" for rel, _, _ in entries):
        raise BundleError(f"{uri.rstrip('/')}/bundle.json: bundle.json not found")
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def localize_bundle(uri: str, storage: Storage | None = None) -> str:
    """A local folder with the bundle's files: the folder itself, or a cached download
    keyed by the bundle's URI and content identity (bundle_identity)."""
    if not is_remote(uri):
        path = strip_file_scheme(uri)
        if not os.path.isdir(path):
            raise BundleError(f"{uri}: weights bundle folder not found")
        return path
    storage = storage or Storage()
    fs, path = storage.fs_for(uri)
    identity = bundle_identity(uri, storage)
    for _ in range(3):
        key = hashlib.sha256(f"{uri}\0{identity}".encode()).hexdigest()[:16]
        local = os.path.join(_cache_dir(), "bundles", key)
        if os.path.exists(os.path.join(local, ".complete")):
            return local
        os.makedirs(os.path.dirname(local), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f"{key}.", dir=os.path.dirname(local))
        try:
            storage.retry(lambda: fs.get(path.rstrip("/") + "/", tmp + "/", recursive=True), f"download bundle {uri}")
            # A file re-uploaded while this copy was made would file new bytes under the
            # old identity: such a copy is thrown away and the new identity fetched.
            now = bundle_identity(uri, storage)
            if now != identity:
                identity = now
                continue
            open(os.path.join(tmp, ".complete"), "w").close()
            try:
                os.replace(tmp, local)
            except OSError:
                # Another worker on this node renamed its copy into place first (a
                # non-empty folder cannot be replaced); the two are the same files.
                if not os.path.exists(os.path.join(local, ".complete")):
                    raise
            return local
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # the loser's copy, or a half download
    raise BundleError(f"{uri}: the bundle kept changing while it was downloaded; try again once the upload is done")


def read_bundle_info(root: str) -> BundleInfo:
    meta_path = os.path.join(root, "bundle.json")
    if not os.path.exists(meta_path):
        raise BundleError(f"{meta_path}: bundle.json not found (is {root} a weights bundle?)")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise BundleError(f"{meta_path}: not valid JSON ({e})") from e
    if meta.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{meta_path}: format is {meta.get('format')!r}, expected {BUNDLE_FORMAT!r}")
    if meta.get("version") != BUNDLE_VERSION:
        raise BundleError(f"{meta_path}: bundle version {meta.get('version')} not supported (want {BUNDLE_VERSION})")
    components = {**COMPONENTS, **meta.get("components", {})}
    for name, rel in components.items():
        if not os.path.exists(os.path.join(root, rel)):
            raise BundleError(f"{os.path.join(root, rel)}: bundle component {name!r} is missing")
    for name, rel in OPTIONAL_COMPONENTS.items():
        if name not in components and os.path.isfile(os.path.join(root, rel)):
            components[name] = rel
    return BundleInfo(root=root, size=meta.get("size", "custom"), trained=bool(meta.get("trained", False)), components=components)


def _configs(size: Literal["tiny", "paper"]) -> dict[str, Any]:
    from stages.audio.hubert import hubert_large_config, tiny_hubert_config
    from stages.completion.imc_unet import IMCUNetConfig
    from stages.completion.vae import sd_vae_config, tiny_vae_config
    from stages.motion.audio2motion import Audio2MotionConfig
    from stages.motion.extractor import MotionExtractorConfig

    if size == "tiny":
        hubert = tiny_hubert_config()
        return {
            "hubert": hubert,
            "vae": tiny_vae_config(),
            "motion_extractor": MotionExtractorConfig.tiny(),
            "stage1": Audio2MotionConfig.tiny(audio_dim=hubert.hidden_size),
            "stage2": IMCUNetConfig.tiny(),
        }
    if size == "paper":
        return {
            "hubert": hubert_large_config(),
            "vae": sd_vae_config(),
            "motion_extractor": MotionExtractorConfig(),
            "stage1": Audio2MotionConfig(),
            "stage2": IMCUNetConfig(),
        }
    raise BundleError(f"unknown bundle size {size!r}; choose tiny or paper")


def hubert_feature_extractor():
    """The feature extractor config saved beside HuBERT's weights, as the real checkpoint has it."""
    from transformers import Wav2Vec2FeatureExtractor

    return Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                                    return_attention_mask=True)


def init_bundle(out: str, size: Literal["tiny", "paper"] = "tiny", seed: int = 0, storage: Storage | None = None) -> str:
    """Write a randomly initialised bundle (marked untrained) to `out` (local or remote)."""
    import torch
    from transformers import HubertModel

    from stages.completion.imc_unet import IMCUNet
    from stages.completion.vae import LatentVAE
    from stages.motion.audio2motion import Audio2Motion
    from stages.motion.extractor import MotionExtractor

    storage = storage or Storage()
    configs = _configs(size)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory(prefix="imgtalk-bundle-") as tmp:
        root = tmp if is_remote(out) else strip_file_scheme(out)
        os.makedirs(root, exist_ok=True)
        hubert = HubertModel(configs["hubert"])
        hubert.save_pretrained(os.path.join(root, "hubert"))
        hubert_feature_extractor().save_pretrained(os.path.join(root, "hubert"))
        del hubert
        LatentVAE.from_config(configs["vae"]).save_pretrained(os.path.join(root, "vae"))
        MotionExtractor(configs["motion_extractor"]).save_pretrained(os.path.join(root, "liveportrait"))
        Audio2Motion(configs["stage1"]).save_pretrained(os.path.join(root, "stage1"))
        IMCUNet(configs["stage2"]).save_pretrained(os.path.join(root, "stage2"))
        meta = {
            "format": BUNDLE_FORMAT,
            "version": BUNDLE_VERSION,
            "size": size,
            "trained": False,
            "note": "randomly initialised by `imgtalk weights init`; outputs are not lip-synced until trained weights replace stage1/ and stage2/",
            "seed": seed,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "components": COMPONENTS,
        }
        with open(os.path.join(root, "bundle.json"), "w") as f:
            json.dump(meta, f, indent=2)
        if is_remote(out):
            upload_folder(storage, root, out)
    return out


def upload_folder(storage: Storage, local_root: str, uri: str) -> None:
    """Copy a bundle written in a local folder to a remote URI."""
    fs, path = storage.fs_for(uri)
    storage.retry(lambda: fs.put(local_root.rstrip("/") + "/", path.rstrip("/") + "/", recursive=True), f"upload {uri}")


# ---- loading: one function per component so a worker loads only what it runs ----


def load_hubert(info: BundleInfo, device: str = "cpu", dtype=None):
    from stages.audio.hubert import HubertFeatures

    kwargs = {"dtype": dtype} if dtype is not None else {}
    return _wrap(lambda: HubertFeatures(info.path("hubert"), device=device, **kwargs), info.path("hubert"))


def load_vae(info: BundleInfo):
    from stages.completion.vae import LatentVAE

    return _wrap(lambda: LatentVAE.from_pretrained(info.path("vae")), info.path("vae"))


def load_motion_extractor(info: BundleInfo):
    from stages.motion.extractor import MotionExtractor

    path = info.path("motion_extractor")
    # The folder form picks up motion_extractor_config.json for non-paper sizes.
    source = os.path.dirname(path) if os.path.basename(path) == "motion_extractor.pth" else path
    return _wrap(lambda: MotionExtractor.from_pretrained(source), path)


def load_stage1(info: BundleInfo):
    from stages.motion.audio2motion import Audio2Motion

    return _wrap(lambda: Audio2Motion.from_pretrained(info.path("stage1")), info.path("stage1"))


def load_stage2(info: BundleInfo):
    from stages.completion.imc_unet import IMCUNet

    return _wrap(lambda: IMCUNet.from_pretrained(info.path("stage2")), info.path("stage2"))


def load_syncnet(info: BundleInfo):
    """The bundle's SyncNet (stages.eval.syncnet.SyncNet), or None when it has none."""
    if not info.has("syncnet"):
        return None
    from stages.eval.syncnet import SyncNet

    return _wrap(lambda: SyncNet.from_file(info.path("syncnet")), info.path("syncnet"))


def _wrap(fn, where: str):
    from stages.common.checkpoint import CheckpointError

    try:
        return fn()
    except CheckpointError as e:
        raise BundleError(str(e)) from e
    except (OSError, ValueError, RuntimeError, KeyError, pickle.UnpicklingError) as e:
        raise BundleError(f"{where}: cannot load ({type(e).__name__}: {e})") from e


@dataclass
class ModelSet:
    """Every network of a bundle, built in one call (training, evaluation, benchmarks)."""

    info: BundleInfo
    hubert: Any
    vae: Any
    motion_extractor: Any
    stage1: Any
    stage2: Any


def load_bundle(uri: str, storage: Storage | None = None, device: str = "cpu") -> ModelSet:
    info = read_bundle_info(localize_bundle(uri, storage))
    return ModelSet(
        info=info,
        hubert=load_hubert(info, device=device),
        vae=load_vae(info),
        motion_extractor=load_motion_extractor(info),
        stage1=load_stage1(info),
        stage2=load_stage2(info),
    )
