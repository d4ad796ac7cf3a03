"""What differs between training Stage 1 and Stage 2, for the one Ray Train harness:
the network and its config (with the corpus statistics), how a prepared chunk becomes
training samples, how a batch reaches the Ray-free trainer, and what goes into the bundle.

A task's `sampler(videos, seed, model_config, split)` maps a shard row to samples; `split`
is "train" or "val", and validation samples carry no training-only augmentation (Stage 2's
`source_swap`), so a val figure means the same in every run.

The training steps themselves live beside their networks (stages/motion/training.py,
stages/completion/training.py) and never import Ray.
"""
from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

from pipeline.arrays import unpack
from pipeline.train.config import TrainConfig

CHUNK_ARRAYS = ("has_face", "shot", "x_c", "exp", "R", "t", "scale", "pose", "audio")


def decode_chunk(row: dict, crops: bool = False) -> dict:
    """A shard row (pipeline/prepare/operators.py) as numpy arrays; crops decoded on request."""
    chunk = {"n": int(row["n"]), **{k: unpack(row[k]) for k in CHUNK_ARRAYS}}
    if crops:
        from stages.corpus.chunk import decode_crop

        chunk["crops"] = np.stack([decode_crop(b) for b in row["crops"]])
    return chunk


def chunk_rng(seed: int, row: dict) -> np.random.Generator:
    """The same samples from the same chunk on every run: a resumed run sees the data an
    uninterrupted one would."""
    key = hashlib.sha256(f"{seed}:{row['video_id']}:{int(row['chunk_idx'])}".encode()).digest()
    return np.random.default_rng(int.from_bytes(key[:8], "little"))


def _fine_tune_mismatch(stage: str, base, options, names: tuple[str, ...]) -> None:
    """init_from_bundle keeps the bundle's network: options given (not defaults) that would
    change it are an error."""
    changed = {k: (getattr(base, k), getattr(options, k)) for k in names
               if k in options.model_fields_set and getattr(base, k) != getattr(options, k)}
    if changed:
        from pipeline.train.job import TrainError

        raise TrainError(f"{stage}: init_from_bundle keeps the bundle's network, but the options change "
                         + ", ".join(f"{k} (bundle {b!r}, options {o!r})" for k, (b, o) in changed.items()))


def _stats(card: dict, name: str) -> tuple[np.ndarray, np.ndarray]:
    s = card["statistics"][name]
    return np.asarray(s["mean"], np.float32), np.asarray(s["std"], np.float32)


class Stage1Task:
    name = "stage1"
    val_metric = "rec"

    def __init__(self, cfg: TrainConfig, card: dict):
        self.cfg, self.card = cfg, card
        self.fine_tunes_base = cfg.init_from_bundle  # write_bundle keeps the base's record inside the new one

    def model_config(self, bundle_info):
        from stages.common.checkpoint import load_config
        from stages.motion.audio2motion import Audio2MotionConfig

        o = self.cfg.stage1
        base = load_config(Audio2MotionConfig, bundle_info.path("stage1"))
        if self.cfg.init_from_bundle:  # the bundle's statistics stay: its weights were trained on them
            _fine_tune_mismatch("stage1", base, o, ("d_model", "n_layers", "n_heads", "audio_steps_per_frame",
                                                    "audio_window_before", "audio_window_after"))
            return dataclasses.replace(base, dropout=o.dropout, max_frames=o.clip_frames)
        config = dataclasses.replace(base, audio_steps_per_frame=o.audio_steps_per_frame, audio_window_before=o.audio_window_before,
                                     audio_window_after=o.audio_window_after, dropout=o.dropout,
                                     max_frames=o.clip_frames,  # it decodes longer sequences in windows of this
                                     **{k: getattr(o, k) for k in ("d_model", "n_layers", "n_heads") if getattr(o, k)})
        if config.d_model % config.n_heads:
            from pipeline.train.job import TrainError

            raise TrainError(f"stage1: d_model {config.d_model} is not a multiple of n_heads {config.n_heads}")
        driven = list(config.driven_keypoints)
        off_mean, off_std = _stats(self.card, "offset")
        exp_mean, exp_std = _stats(self.card, "exp")
        xc_mean, xc_std = _stats(self.card, "x_c")
        return config.with_statistics(off_mean[driven], off_std[driven], exp_mean, exp_std, xc_mean, xc_std)

    def sampler(self, videos: dict, seed: int, model_config, split: str = "train"):
        from stages.motion.training import sample_clips

        clip, k, driven = self.cfg.stage1.clip_frames, model_config.audio_steps_per_frame, tuple(model_config.driven_keypoints)

        def samples(row: dict) -> list[dict]:
            return sample_clips(decode_chunk(row), videos[row["video_id"]], clip, k, driven, chunk_rng(seed, row))

        return samples

    def build_trainer(self, bundle_info, model_config, wrap, device, autocast_dtype, seed: int):
        from stages.motion.audio2motion import Audio2Motion
        from stages.motion.training import Stage1Trainer, Stage1TrainConfig

        c, o = self.cfg, self.cfg.stage1
        if o.sampling_source == "free_running" and c.strategy == "fsdp" and c.num_workers > 1:
            from pipeline.train.job import TrainError

            # generate() runs the unwrapped network, whose parameters FSDP keeps sharded
            raise TrainError("stage1: sampling_source free_running needs strategy ddp (FSDP shards the weights "
                             "that free-running decoding reads outside the wrapped forward)")
        train_cfg = Stage1TrainConfig(lr=o.lr, weight_decay=o.weight_decay, warmup_steps=c.warmup_steps, total_steps=c.steps,
                                      lam_temp=o.lam_temp, grad_clip=c.grad_clip, prev_noise_std=o.prev_noise_std,
                                      scheduled_sampling=o.scheduled_sampling, sampling_source=o.sampling_source)
        model = Audio2Motion(model_config)
        if c.init_from_bundle:
            model.load_state_dict(Audio2Motion.from_pretrained(bundle_info.path("stage1")).state_dict())
        return Stage1Trainer(model, train_cfg, wrap=wrap, device=device, autocast_dtype=autocast_dtype, seed=seed)

    def to_batch(self, batch: dict) -> dict:
        return batch

    def network(self, trainer):
        return trainer.model

    def load_network(self, model_config, state: dict):
        from stages.motion.audio2motion import Audio2Motion

        model = Audio2Motion(model_config)
        model.load_state_dict(state["model"])
        return model.eval()


class Stage2Task:
    name = "stage2"
    val_metric = "rec"

    def __init__(self, cfg: TrainConfig, card: dict):
        self.cfg, self.card = cfg, card
        self.fine_tunes_base = cfg.init_from_bundle

    def model_config(self, bundle_info):
        from stages.common.checkpoint import load_config
        from stages.completion.imc_unet import IMCUNetConfig

        o = self.cfg.stage2
        base = load_config(IMCUNetConfig, bundle_info.path("stage2"))
        if self.cfg.init_from_bundle:  # its motion statistics stay: its weights were trained on them
            _fine_tune_mismatch("stage2", base, o, ("use_rsca", "condition"))
            return base
        audio = {}
        if o.condition == "audio":
            from transformers import HubertConfig

            # The shard's audio rows are this HuBERT's hidden states.
            audio_dim = HubertConfig.from_pretrained(bundle_info.path("hubert")).hidden_size
            audio = dict(audio_window_frames=o.audio_window_frames, audio_dim=int(audio_dim))
        config = dataclasses.replace(base, use_rsca=o.use_rsca, condition=o.condition, **audio)
        if audio:  # no motion tokens to normalise
            return dataclasses.replace(config, motion_mean=None, motion_std=None)
        return config.with_motion_statistics(*_stats(self.card, "exp"))

    def sampler(self, videos: dict, seed: int, model_config, split: str = "train"):
        from stages.completion.training import sample_pairs

        o = self.cfg.stage2
        audio = o.condition == "audio"
        swap = {}
        if o.source_swap > 0 and split == "train":
            from stages.face import MouthMask

            swap = dict(source_swap=o.source_swap, mouth_mask=MouthMask().array())  # the trainer's hole

        def samples(row: dict) -> list[dict]:
            pairs = sample_pairs(decode_chunk(row, crops=True), videos[row["video_id"]], chunk_rng(seed, row),
                                 o.pairs_per_chunk, o.min_gap_frames, o.max_pose_deg,
                                 audio_window_frames=o.audio_window_frames if audio else None, **swap)
            keys = ("target", "reference", "motion", "target_exp", "target_x_c")
            out = [{k: p[k] for k in keys} for p in pairs]
            if audio:  # the UNet's condition is batch["motion"], whatever it holds
                for sample, pair in zip(out, pairs):
                    sample["motion"] = pair["audio_condition"]
            return out

        return samples

    def build_trainer(self, bundle_info, model_config, wrap, device, autocast_dtype, seed: int):
        import torch

        from pipeline.weights import load_motion_extractor, load_vae
        from stages.completion.discriminator import PatchDiscriminator, PatchDiscriminatorConfig
        from stages.completion.imc_unet import IMCUNet
        from stages.completion.losses import Stage2LossWeights
        from stages.completion.training import Stage2Trainer, Stage2TrainConfig
        from stages.completion.vgg import VGG19
        from stages.face import MouthMask

        c, o = self.cfg, self.cfg.stage2
        weights = Stage2LossWeights(rec=o.rec, perc=o.perc, motion=o.motion, adv=o.adv, lambda_c=o.lambda_c, latent=o.latent)
        train_cfg = Stage2TrainConfig(lr=o.lr, alpha_lr=o.alpha_lr, weight_decay=o.weight_decay, warmup_steps=c.warmup_steps,
                                      total_steps=c.steps, grad_clip=c.grad_clip, d_lr=o.d_lr, gan_start_step=o.gan_start_step,
                                      loss=weights, gradient_checkpointing=o.gradient_checkpointing,
                                      motion_noise=o.motion_noise, noise_seed=seed)
        torch.manual_seed(seed)
        d_config = PatchDiscriminatorConfig.tiny() if bundle_info.size == "tiny" else PatchDiscriminatorConfig()
        vgg = VGG19.from_pretrained(o.vgg_weights) if o.vgg_weights and o.perc > 0 else None
        unet = IMCUNet(model_config)
        if c.init_from_bundle:
            unet.load_state_dict(IMCUNet.from_pretrained(bundle_info.path("stage2")).state_dict())
        return Stage2Trainer(unet, load_vae(bundle_info), MouthMask().array(), train_cfg,
                             extractor=load_motion_extractor(bundle_info), vgg=vgg,
                             discriminator=PatchDiscriminator(d_config) if o.adv > 0 else None,
                             wrap=wrap, device=device, autocast_dtype=autocast_dtype)

    def to_batch(self, batch: dict) -> dict:
        out = {k: batch[k] for k in ("motion", "target_exp", "target_x_c")}
        for k in ("target", "reference"):  # (B,S,S,3) uint8 -> (B,3,S,S) in [0,1]
            out[k] = batch[k].permute(0, 3, 1, 2).float() / 255.0
        return out

    def network(self, trainer):
        return trainer.unet

    def load_network(self, model_config, state: dict):
        from stages.completion.imc_unet import IMCUNet

        model = IMCUNet(model_config)
        model.load_state_dict(state["unet"])
        return model.eval()


class VaeTask:
    """The SD VAE's small stand-in, trained on the corpus crops (a bundle with the real SD VAE
    never needs this); the network is diffusers' AutoencoderKL, saved in its own format."""

    name = "vae"
    val_metric = "rec"

    def __init__(self, cfg: TrainConfig, card: dict):
        self.cfg, self.card = cfg, card
        self.fine_tunes_base = cfg.vae.decoder_only  # write_bundle keeps the first pass's record

    def model_config(self, bundle_info) -> dict:
        from stages.completion.vae import LatentVAE

        config = dict(LatentVAE.from_pretrained(bundle_info.path("vae")).vae.config)
        config = {k: v for k, v in config.items() if not k.startswith("_")}
        widths = self.cfg.vae.block_out_channels
        if widths and self.cfg.vae.decoder_only:
            from pipeline.train.job import TrainError

            raise TrainError("vae.decoder_only fine-tunes the bundle's VAE: vae.block_out_channels cannot change it")
        if widths:
            if len(widths) != len(config["block_out_channels"]):
                from pipeline.train.job import TrainError

                raise TrainError(f"vae.block_out_channels {widths} must have {len(config['block_out_channels'])} widths "
                                 "(the latent's 8x downsampling)")
            groups = min(config["norm_num_groups"], *widths)
            config.update(block_out_channels=list(widths), norm_num_groups=groups)
        return config

    def sampler(self, videos: dict, seed: int, model_config, split: str = "train"):
        from stages.completion.vae_training import sample_crops

        count = self.cfg.vae.crops_per_chunk
        return lambda row: sample_crops(decode_chunk(row, crops=True), chunk_rng(seed, row), count)

    def build_trainer(self, bundle_info, model_config, wrap, device, autocast_dtype, seed: int):
        from stages.completion.vae import LatentVAE
        from stages.completion.vae_training import VaeTrainConfig, VaeTrainer
        from stages.face import MouthMask

        c, o = self.cfg, self.cfg.vae
        train_cfg = VaeTrainConfig(lr=o.lr, warmup_steps=c.warmup_steps, total_steps=c.steps, grad_clip=c.grad_clip,
                                   kl=o.kl, mouth_weight=o.mouth_weight, decoder_only=o.decoder_only,
                                   sample_latents=o.sample_latents)
        # a fresh VAE, or (decoder_only) the bundle's, whose encoder the fine-tune keeps
        vae = LatentVAE.from_pretrained(bundle_info.path("vae")) if o.decoder_only else LatentVAE.from_config(model_config)
        return VaeTrainer(vae, MouthMask().array(), train_cfg, wrap=wrap, device=device, seed=seed)

    def to_batch(self, batch: dict) -> dict:
        return {"image": batch["image"].permute(0, 3, 1, 2).float() / 255.0}  # (B,S,S,3) uint8 -> (B,3,S,S)

    def network(self, trainer):
        return trainer.vae

    def load_network(self, model_config, state: dict):
        from stages.completion.vae import LatentVAE
        from stages.completion.vae_training import with_scaling_factor

        vae = LatentVAE.from_config(model_config)
        vae.vae.load_state_dict(state["vae"])
        return with_scaling_factor(vae, float(state["latent_std"]))


class ExtractorTask:
    """The motion extractor's small landmark-guided stand-in (a bundle with LivePortrait's
    real extractor never needs this); saved in LivePortrait's .pth layout."""

    name = "extractor"
    component = "motion_extractor"
    val_metric = "loss"

    def __init__(self, cfg: TrainConfig, card: dict):
        self.cfg, self.card = cfg, card

    def model_config(self, bundle_info):
        from pipeline.weights import load_motion_extractor

        return load_motion_extractor(bundle_info).config

    def sampler(self, videos: dict, seed: int, model_config, split: str = "train"):
        from stages.motion.extractor_training import sample_frames

        count = self.cfg.extractor.frames_per_chunk

        def samples(row: dict) -> list[dict]:
            chunk = decode_chunk(row, crops=True)
            chunk["mouth_open"] = unpack(row["mouth_open"])
            return sample_frames(chunk, chunk_rng(seed, row), count)

        return samples

    def build_trainer(self, bundle_info, model_config, wrap, device, autocast_dtype, seed: int):
        from stages.motion.extractor import MotionExtractor
        from stages.motion.extractor_training import ExtractorTrainConfig, ExtractorTrainer

        c, o = self.cfg, self.cfg.extractor
        train_cfg = ExtractorTrainConfig(lr=o.lr, warmup_steps=c.warmup_steps, total_steps=c.steps, grad_clip=c.grad_clip,
                                         open_mean=o.open_mean, open_std=o.open_std)
        return ExtractorTrainer(MotionExtractor(model_config), train_cfg, wrap=wrap, device=device, seed=seed)

    def to_batch(self, batch: dict) -> dict:
        return {"image": batch["image"].permute(0, 3, 1, 2).float() / 255.0, "mouth_open": batch["mouth_open"]}

    def network(self, trainer):
        return trainer.extractor

    def load_network(self, model_config, state: dict):
        from stages.motion.extractor import MotionExtractor

        model = MotionExtractor(model_config)
        model.load_state_dict(state["extractor"])
        return model.eval()


class _HubertFolder:
    """The bundle's hubert/ folder as the real checkpoint has it: the model in transformers
    format and its feature extractor's config."""

    def __init__(self, model):
        self.model = model

    def save_pretrained(self, folder: str) -> None:
        from pipeline.weights import hubert_feature_extractor

        self.model.save_pretrained(folder)
        hubert_feature_extractor().save_pretrained(folder)


class HubertTask:
    """The HuBERT stand-in's brief self-supervised training (a bundle with the real HuBERT
    never needs this). Shards must hold the speech (`wave`, prepared by this version)."""

    name = "hubert"
    val_metric = "masked"

    def __init__(self, cfg: TrainConfig, card: dict):
        self.cfg, self.card = cfg, card

    def model_config(self, bundle_info):
        from transformers import HubertConfig

        return HubertConfig.from_pretrained(bundle_info.path("hubert"))

    def sampler(self, videos: dict, seed: int, model_config, split: str = "train"):
        from stages.audio.hubert_training import sample_audio_clips

        o = self.cfg.hubert

        def samples(row: dict) -> list[dict]:
            if "wave" not in row:
                raise ValueError(f"shard {row['video_id']} chunk {row['chunk_idx']} holds no speech samples (prepared "
                                 "by an older version): prepare the corpus again into a new output to train HuBERT")
            return sample_audio_clips(unpack(row["wave"]), chunk_rng(seed, row), o.clip_frames, o.clips_per_chunk)

        return samples

    def build_trainer(self, bundle_info, model_config, wrap, device, autocast_dtype, seed: int):
        from transformers import HubertModel

        from stages.audio.hubert_training import HubertTrainConfig, HubertTrainer

        c, o = self.cfg, self.cfg.hubert
        train_cfg = HubertTrainConfig(lr=o.lr, weight_decay=o.weight_decay, warmup_steps=c.warmup_steps, total_steps=c.steps,
                                      grad_clip=c.grad_clip, n_mels=o.n_mels, mask_prob=o.mask_prob,
                                      mask_length=o.mask_length, unmasked_weight=o.unmasked_weight)
        # from the bundle's weights: a second run continues from the first
        hubert = HubertModel.from_pretrained(bundle_info.path("hubert"))
        return HubertTrainer(hubert, train_cfg, wrap=wrap, device=device, seed=seed)

    def to_batch(self, batch: dict) -> dict:
        return batch

    def network(self, trainer):
        return trainer.model

    def load_network(self, model_config, state: dict):
        from transformers import HubertModel

        from stages.audio.hubert_training import MaskedMelModel

        model = MaskedMelModel(HubertModel(model_config), self.cfg.hubert.n_mels)
        model.load_state_dict(state["model"])
        return _HubertFolder(model.hubert.eval())


TASKS = {"stage1": Stage1Task, "stage2": Stage2Task, "vae": VaeTask, "extractor": ExtractorTask, "hubert": HubertTask}
