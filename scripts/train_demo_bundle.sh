#!/usr/bin/env bash
# Reproduces the demo's trained tiny bundle (weights/demo/) with the project's own commands,
# from nothing: a synthetic corpus -> prepare -> the stand-ins (motion extractor, HuBERT, VAE)
# -> Stage 1 -> Stage 2. Seeds and settings are in deploy/demo/*.yaml and below.
#
#   bash scripts/train_demo_bundle.sh [WORK_DIR] [OUT_BUNDLE]
#
# On a 2-core CPU machine it takes about an hour and three quarters, most of it Stage 2 and the VAE (README, "Proving it learns").
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-demo_train}
OUT=${2:-weights/demo}
IMGTALK=${IMGTALK:-.venv/bin/imgtalk}
mkdir -p "$WORK"
rm -rf demo_train/runs  # deploy/demo/*.yaml keep runs there: a leftover run would be resumed, not retrained
# 1. 8 synthetic speakers x 8 sentences (seed 0); the split by speaker is prepare's (seed 0)
$IMGTALK synth-corpus --folder "$WORK/corpus" --speakers 8 --sentences 8 --seed 0
$IMGTALK weights init --size tiny --seed 0 "$WORK/base"
# 2. crops and mouth openings for the extractor's landmark-guided training
$IMGTALK prepare --corpus "$WORK/corpus/corpus.parquet" --weights "$WORK/base" --output "$WORK/shards-base" \
    --config deploy/demo/prepare.yaml
$IMGTALK train extractor --shards "$WORK/shards-base" --weights "$WORK/base" --output-bundle "$WORK/bundle" \
    --config deploy/demo/extractor.yaml
# 3. the HuBERT stand-in, trained briefly on the shards' speech (masked log-mel prediction)
$IMGTALK train hubert --shards "$WORK/shards-base" --weights "$WORK/bundle" --output-bundle "$WORK/bundle" \
    --config deploy/demo/hubert.yaml
# 4. the shards again, now with the trained extractor's motion and the trained HuBERT's features
$IMGTALK prepare --corpus "$WORK/corpus/corpus.parquet" --weights "$WORK/bundle" --output "$WORK/shards" \
    --config deploy/demo/prepare.yaml
# 5. the VAE stand-in and Stage 2 (Stage 2 learns from the extractor's keypoints, not from Stage 1)
$IMGTALK train vae --shards "$WORK/shards" --weights "$WORK/bundle" --output-bundle "$WORK/bundle" --config deploy/demo/vae.yaml
$IMGTALK train stage2 --shards "$WORK/shards" --weights "$WORK/bundle" --output-bundle "$WORK/bundle" --config deploy/demo/stage2.yaml
# the same Stage 2 run resumed to 1200 steps with the latent L1 inside the mouth added
$IMGTALK train stage2 --shards "$WORK/shards" --weights "$WORK/bundle" --output-bundle "$WORK/bundle" --config deploy/demo/stage2.more.yaml
# 6. a larger corpus (16 speakers x 12 sentences; speakers 0-7 are step 1's, saying 4 more sentences)
#    for what gains from more speech: the VAE's decoder fine-tuned (its encoder, hence Stage 2's
#    latents, kept), twice: on posterior samples, then on the posterior's mode, as the dub decodes
#    (sharper closed lips), and Stage 1, a wider one (deploy/demo/stage1.yaml)
$IMGTALK synth-corpus --folder "$WORK/corpus-large" --speakers 16 --sentences 12 --seed 0
$IMGTALK prepare --corpus "$WORK/corpus-large/corpus.parquet" --weights "$WORK/bundle" --output "$WORK/shards-large" \
    --config deploy/demo/prepare.yaml
$IMGTALK train vae --shards "$WORK/shards-large" --weights "$WORK/bundle" --output-bundle "$WORK/bundle" \
    --config deploy/demo/vae.decoder.yaml
$IMGTALK train vae --shards "$WORK/shards-large" --weights "$WORK/bundle" --output-bundle "$WORK/bundle" \
    --config deploy/demo/vae.decoder.mode.yaml
$IMGTALK train stage1 --shards "$WORK/shards-large" --weights "$WORK/bundle" --output-bundle "$WORK/bundle" \
    --config deploy/demo/stage1.yaml
rm -rf "$OUT" && mkdir -p "$(dirname "$OUT")" && cp -r "$WORK/bundle" "$OUT"
echo "trained bundle: $OUT"
