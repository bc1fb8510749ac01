"""Reading the same JPEGs as loose files, from one tar, from tar shards and from Parquet: images/s
(list + read + decode), ratios against loose files measured in the same run, and peak RSS; then
`encode --layout shards` end to end from loose files, tar shards and Parquet (the tiny preset at
32 px, default reader workers): images/s, the rerun with nothing left to do, and peak RSS.

The images are 64 x 64 crops of scikit-image's photographs (JPEG, quality 90) in 100 class
folders; the tar, the shards (1 000 images each, WebDataset layout with .cls labels) and the
Parquet file (Hugging Face layout, row groups of 1 000) hold the very same bytes. Every reader runs
in a fresh child process, so its peak RSS is its own; the files are read once beforehand, so all
readers find them in the page cache.

    python benchmarks/bench_sources.py [--sizes 1000 5000] [--full (1 000, 10 000, 50 000)]
                                       [--encode-sizes 2000 [50000]]
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

READERS = ("loose files", "one tar", "tar shards", "parquet")
ENCODE_INPUTS = {"loose files": "loose", "tar shards": "shards", "parquet": "train.parquet"}
SHARD = 1000


def _write_sets(root: Path, n: int) -> None:
    """n JPEGs as loose files in class folders, then the same bytes as one tar, shards and Parquet."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import skimage
    from PIL import Image

    data = Path(skimage.__file__).parent / "data"
    photos = [Image.open(data / p).convert("RGB") for p in ("astronaut.png", "chelsea.png", "coffee.png")]
    rng = np.random.default_rng(0)
    files = []
    for i in range(n):
        im = photos[i % 3]
        x, y = int(rng.integers(0, im.width - 128)), int(rng.integers(0, im.height - 128))
        buf = io.BytesIO()
        im.crop((x, y, x + 128, y + 128)).resize((64, 64)).save(buf, "JPEG", quality=90)
        rel = f"c{i % 100:03d}/{i:07d}.jpg"
        (root / "loose" / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / "loose" / rel).write_bytes(buf.getvalue())
        files.append((rel, buf.getvalue(), i % 100))
    (root / "shards").mkdir()
    with tarfile.open(root / "one.tar", "w") as one:
        for s in range(0, n, SHARD):
            with tarfile.open(root / "shards" / f"train-{s // SHARD:04d}.tar", "w") as shard:
                for rel, raw, label in files[s : s + SHARD]:
                    key = rel.replace("/", "_")[:-4]
                    for tf in (one, shard):
                        _add(tf, f"{key}.jpg", raw)
                        _add(tf, f"{key}.cls", str(label).encode())
    images = pa.array([{"bytes": raw, "path": rel} for rel, raw, _ in files])
    pq.write_table(pa.table({"image": images, "label": [lab for *_, lab in files]}), root / "train.parquet", SHARD)


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _decode(raw: bytes) -> None:
    from PIL import Image

    Image.open(io.BytesIO(raw)).convert("RGB").load()


def _child(reader: str, root: Path) -> dict:
    """List, read and decode every image of one reader; seconds and peak RSS (imports not timed)."""
    import PIL.Image  # noqa: F401

    from optvq_cli.sources.parquet import ParquetReader, list_parquet
    from optvq_cli.sources.tar import TarReader, find_tars, list_tar

    t0 = time.perf_counter()
    if reader == "loose files":
        paths = sorted((root / "loose").rglob("*.jpg"))
        listed = time.perf_counter()
        for p in paths:
            _decode(p.read_bytes())
        n = len(paths)
    elif reader in ("one tar", "tar shards"):
        records = [r for t in find_tars(root / ("one.tar" if reader == "one tar" else "shards")) for r in list_tar(t)]
        listed = time.perf_counter()
        tar = TarReader()
        for r in records:
            _decode(tar.read(r))
        n = len(records)
    else:
        rows = list(list_parquet(root / "train.parquet"))
        listed = time.perf_counter()
        pq = ParquetReader()
        for r in rows:
            _decode(pq.read(r))
        n = len(rows)
    done = time.perf_counter()
    return {"images": n, "list_s": listed - t0, "total_s": done - t0, "peak_mib": _peak_mib()}


def _encode_child(reader: str, root: Path) -> dict:
    """`encode --layout shards` of one input, then the same command again (nothing left to do);
    seconds of each (the model built beforehand, not timed) and peak RSS."""
    import torch

    from optvq_cli.model import build_model
    from optvq_cli.tokenize.extract import encode_shards

    torch.manual_seed(0)
    model = build_model("tiny").eval()
    out = root / f"tokens-{ENCODE_INPUTS[reader]}"
    t0 = time.perf_counter()
    first = encode_shards(model, root / ENCODE_INPUTS[reader], out, size=32, shard_size=SHARD)
    t1 = time.perf_counter()
    again = encode_shards(model, root / ENCODE_INPUTS[reader], out, size=32, shard_size=SHARD)
    t2 = time.perf_counter()
    assert first.written == again.skipped and again.written == 0 and not first.failed
    return {"images": first.written, "total_s": t1 - t0, "rerun_s": t2 - t1, "peak_mib": _peak_mib()}


def _peak_mib() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _warm(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            p.read_bytes()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000])
    ap.add_argument("--full", action="store_true", help="1 000, 10 000 and 50 000 images")
    ap.add_argument("--encode-sizes", type=int, nargs="*", default=[2000], help="encode end to end (none: skip)")
    ap.add_argument("--child", nargs=2, metavar=("READER", "ROOT"), help=argparse.SUPPRESS)
    ap.add_argument("--encode-child", nargs=2, metavar=("READER", "ROOT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(args.child[0], Path(args.child[1]))))
        return
    if args.encode_child:
        print(json.dumps(_encode_child(args.encode_child[0], Path(args.encode_child[1]))))
        return
    sizes = [1000, 10000, 50000] if args.full else args.sizes
    _read_table(sizes)
    _encode_table(args.encode_sizes)


def _children(n: int, flag: str, kinds: list[str]):
    """(kind, its child's figures, its images/s relative to the first kind) for one set of n images."""
    with tempfile.TemporaryDirectory(prefix="bench-sources-") as tmp:
        root = Path(tmp)
        _write_sets(root, n)
        _warm(root)
        base = None
        for kind in kinds:
            cmd = [sys.executable, __file__, flag, kind, str(root)]
            r = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
            rate = r["images"] / r["total_s"]
            base = base or rate
            yield kind, r, rate, rate / base


def _encode_table(sizes: list[int]) -> None:
    if not sizes:
        return
    print(f"\nencode --layout shards (tiny preset, 32 px, shards of {SHARD})")
    print(f"{'images':>7} {'input':<12} {'total s':>8} {'images/s':>9} {'vs loose':>9} {'rerun s':>8} {'peak MiB':>9}")
    for n in sizes:
        for reader, r, rate, ratio in _children(n, "--encode-child", ENCODE_INPUTS):
            print(
                f"{r['images']:>7} {reader:<12} {r['total_s']:>8.2f} {rate:>9.0f} {ratio:>8.2f}x "
                f"{r['rerun_s']:>8.2f} {r['peak_mib']:>9.0f}",
                flush=True,
            )


def _read_table(sizes: list[int]) -> None:
    print(f"{'images':>7} {'reader':<12} {'list s':>7} {'total s':>8} {'images/s':>9} {'vs loose':>9} {'peak MiB':>9}")
    for n in sizes:
        for reader, r, rate, ratio in _children(n, "--child", READERS):
            print(
                f"{r['images']:>7} {reader:<12} {r['list_s']:>7.2f} {r['total_s']:>8.2f} {rate:>9.0f} "
                f"{ratio:>8.2f}x {r['peak_mib']:>9.0f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
