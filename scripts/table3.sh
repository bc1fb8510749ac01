#!/usr/bin/env bash
# Table 3's trend on MNIST: codebook usage and reconstruction at codebook sizes 128, 1024, 4096,
# 16384, vanilla VQ vs OptVQ, one head of dimension 8 for both (the paper's "latent dim 8" half),
# a short schedule (2 epochs, batch 256). Each run validates on the 10,000 test digits at its end.
#   bash scripts/table3.sh RUNS_DIR      (needs `make data`; then scripts/table3_summary.py RUNS_DIR)
set -euo pipefail
runs=${1:?usage: scripts/table3.sh RUNS_DIR}
for n in 128 1024 4096 16384; do
  for q in vq optvq; do
    out="$runs/$q-$n"
    if [ -f "$out/model/model.safetensors" ]; then continue; fi  # finished earlier
    if [ -d "$out" ]; then optvq train --resume "$out" --quiet; continue; fi  # interrupted earlier
    optvq train --preset mnist --data .data/mnist --out "$out" --quantizer "$q" \
      --set model.heads=1 --set model.n_codes="$n" --epochs 2 --batch-size 256 --seed 0 \
      --set val_every=0 --set ckpt_every=100 --quiet
  done
done
