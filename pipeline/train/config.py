"""`imgtalk train`: the training job's configuration (pydantic at the edge, YAML on disk)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline.config import StorageConfig, load_yaml_config


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Stage1Options(_Strict):
    clip_frames: int = Field(50, ge=2, description="frames per training clip (2 s at 25 fps)")
    audio_steps_per_frame: Literal[1, 2] = Field(2, description="k of B^A: 2 = HuBERT's native 50 Hz rows")
    audio_window_before: int = Field(0, ge=0, description="frames of audio before each frame its attention sees")
    # Lips move before the sound they make; benchmarks/stage1_audio_window.py (README) picks 2 frames.
    audio_window_after: int = Field(2, ge=0, description="frames of look-ahead (80 ms at 25 fps)")
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    lam_temp: float = Field(0.1, ge=0, description="λ of Eq. 6")
    prev_noise_std: float = Field(0.1, ge=0)
    scheduled_sampling: float = Field(0.25, ge=0, le=1)
    sampling_source: Literal["teacher_forced", "free_running"] = Field(
        "teacher_forced", description="what scheduled sampling feeds back: a teacher-forced pass's predictions, "
        "or free-running decoding's (the inference loop, so drift is seen and corrected)")
    dropout: float = Field(0.1, ge=0, lt=1)
    # the Transformer's size; None keeps the base bundle's (a real bundle's Stage 1 has its own)
    d_model: int | None = Field(None, ge=8, description="width of a fresh Stage 1 (default: the base bundle's)")
    n_layers: int | None = Field(None, ge=1, description="layers of a fresh Stage 1 (default: the base bundle's)")
    n_heads: int | None = Field(None, ge=1, description="attention heads (default: the base bundle's); must divide d_model")


class Stage2Options(_Strict):
    pairs_per_chunk: int = Field(8, ge=1)
    min_gap_frames: int = Field(12, ge=1, description="a reference is at least this far from its target")
    max_pose_deg: float = Field(10.0, gt=0, description="reference head pose within this of the target's")
    lr: float = Field(1e-4, gt=0)
    alpha_lr: float = Field(1e-3, gt=0, description="RSCA's per-layer alphas: own group, no weight decay")
    weight_decay: float = Field(0.01, ge=0)
    d_lr: float = Field(5e-5, gt=0)
    gan_start_step: int = Field(1000, ge=0, description="the adversarial term and D's updates start here")
    rec: float = Field(1.0, ge=0)
    perc: float = Field(0.01, ge=0)
    motion: float = Field(1.0, ge=0)
    adv: float = Field(0.01, ge=0)
    lambda_c: float = Field(0.1, ge=0)
    latent: float = Field(0.0, ge=0, description="optional L1 on the completed latent inside the mask")
    motion_noise: float = Field(0.0, ge=0, description="std of Gaussian noise on the driven keypoints' δ of the "
                                "condition in training: robustness to Stage 1's errors")
    source_swap: float = Field(0.0, ge=0, le=1, description="share of pairs whose masked source is another frame of "
                               "the shot (pose-matched) with the target's mouth pasted in: Stage 2 cannot read the "
                               "mouth off what its hole leaves in view, as a dub's speaking source would have it do")
    vgg_weights: str | None = Field(None, description="torchvision vgg19-dcbb9e9d.pth for L_perc; without it perc is 0")
    gradient_checkpointing: bool = False
    use_rsca: bool = Field(True, description="False: the paper's concatenation ablation")
    condition: Literal["motion", "audio"] = Field(
        "motion", description="audio: the audio-conditioned IMC-UNet ablation (HuBERT rows by cross-attention, no motion)")
    audio_window_frames: int = Field(2, ge=0, description="condition=audio: frames of audio each side of the target")


class VaeOptions(_Strict):
    """`imgtalk train vae`: a small stand-in for the SD VAE (stages/completion/vae_training.py)."""

    crops_per_chunk: int = Field(16, ge=1)
    block_out_channels: list[int] | None = Field(None, description="widths of a fresh VAE (default: the base bundle's)")
    lr: float = Field(1e-3, gt=0)
    kl: float = Field(1e-6, ge=0, description="β of the KL term")
    mouth_weight: float = Field(4.0, ge=0, description="extra L1 weight inside the mouth mask")
    decoder_only: bool = Field(False, description="fine-tune the decoder of the bundle's VAE, its encoder and scaling "
                               "factor kept: the latents, and a Stage 2 trained on them, keep their meaning")
    sample_latents: bool = Field(True, description="decode a posterior sample while training (the SD VAE's recipe); "
                                 "false: its mode, as the dub decodes (sharper with a wide posterior)")


class ExtractorOptions(_Strict):
    """`imgtalk train extractor`: a small landmark-guided stand-in for LivePortrait's motion
    extractor (stages/motion/extractor_training.py)."""

    frames_per_chunk: int = Field(16, ge=1)
    lr: float = Field(1e-3, gt=0)
    # mouth_open (inner-lip gap / mouth width) is normalised with these; the defaults are the
    # synthetic corpus's (mean 0.165, std 0.121 over 4,045 frames)
    open_mean: float = 0.165
    open_std: float = Field(0.121, gt=0)


class HubertOptions(_Strict):
    """`imgtalk train hubert`: a brief self-supervised training of a small HuBERT stand-in
    (stages/audio/hubert_training.py); a bundle with the real HuBERT never needs it."""

    clip_frames: int = Field(32, ge=2, description="25 fps frames of speech per crop (1.28 s)")
    clips_per_chunk: int = Field(8, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    n_mels: int = Field(40, ge=8)
    mask_prob: float = Field(0.5, gt=0, lt=1, description="share of the 20 ms frames masked, in spans")
    mask_length: int = Field(10, ge=1)
    unmasked_weight: float = Field(0.5, ge=0)


class TrainConfig(_Strict):
    name: str = Field("imgtalk", description="run name: rerunning with the same name and storage_path resumes")
    storage_path: str = Field("runs", description="checkpoints and curves (local, NFS or s3://); shared by all nodes")
    num_workers: int = Field(1, ge=1, description="DDP ranks")
    use_gpu: bool = False
    cpus_per_worker: float = Field(0.5, gt=0, description="leave CPUs for Ray Data to read the shards")
    strategy: Literal["ddp", "fsdp"] = Field("ddp", description="fsdp shards parameters (CUDA only)")
    precision: Literal["fp32", "bf16"] = Field("bf16", description="bf16 autocast on GPU; always fp32 on CPU")
    batch_size: int = Field(8, ge=1, description="per rank")
    steps: int = Field(1000, ge=1)
    warmup_steps: int = Field(100, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    val_every: int = Field(200, ge=1)
    val_batches: int = Field(8, ge=1)
    checkpoint_every: int = Field(200, ge=1)
    num_to_keep: int = Field(3, ge=1)
    max_failures: int = Field(3, ge=-1, description="worker-group restarts from the last checkpoint (-1: no limit)")
    collective_timeout_s: int = Field(1800, ge=10, description="how long a rank waits in a collective (gradient "
                                      "all-reduce, the step barrier) for the others before failing: a rank lost "
                                      "without its process dying then ends as a failure, restarted from the checkpoint")
    data_timeout_s: int = Field(1800, ge=1, description="how long a rank waits for its next training batch before "
                                "failing: a data read that hangs on every rank (no collective left to time out) "
                                "then ends as a failure, restarted from the checkpoint")
    shuffle_buffer: int = Field(64, ge=1, description="rows in each rank's local shuffle buffer")
    cache_samples: bool = Field(False, description="materialise the training samples once (object store) instead of "
                                "re-reading the shards every epoch: for small corpora whose epochs are a few batches")
    seed: int = 0
    torch_threads: int = Field(1, ge=1)
    init_from_bundle: bool = Field(False, description="stage1 / stage2: start from the base bundle's trained network, "
                                   "its architecture and statistics kept (a fine-tune on new footage or for more "
                                   "steps), instead of a fresh one")
    stage1: Stage1Options = Stage1Options()
    stage2: Stage2Options = Stage2Options()
    vae: VaeOptions = VaeOptions()
    hubert: HubertOptions = HubertOptions()
    extractor: ExtractorOptions = ExtractorOptions()
    storage: StorageConfig = StorageConfig()


def load_train_config(path: str | None) -> TrainConfig:
    return load_yaml_config(TrainConfig, path, "training config")
