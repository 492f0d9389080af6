#!/usr/bin/env bash
# The GPU checks, as one script: the GPU bench (loss kernels + training step, bf16, ViT-S/16 at 224 px,
# 2 x 224 + 6 x 96 crops, batch 256) and a bf16 `bamray train` smoke run through Ray Train + Ray Data + MLflow
# on one GPU (BAM, the shipped small-image ResNet, batch 256, 4 epochs). Run from the repository root, with
# the project installed, on a machine with a CUDA GPU:   bash bench/gpu_smoke.sh [OUT_DIR]
# Fashion-MNIST IDX files come from BAMRAY_FMNIST_SRC (default /usr/share/datasets/fashion-mnist).
set -u
OUT=${1:-bench/results}
SRC=${BAMRAY_FMNIST_SRC:-/usr/share/datasets/fashion-mnist}
mkdir -p "$OUT"
timeout 600 python3 -m bench --device cuda --only loss,step --out "$OUT"; echo "bench rc=$?"
python3 -m orchestrator data prepare fashion-mnist --src "$SRC" --limit 10000
timeout 600 python3 -m orchestrator train --config bam_fmnist --set train.workers=1 --set train.gpus_per_worker=1 \
  --set train.precision=bf16 --set optim.batch_size=256 --set optim.epochs=4 --set data.map_workers=8 \
  2>&1 | tee "$OUT/gpu-train-smoke.log"
