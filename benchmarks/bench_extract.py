"""`encode --layout shards` at growing N: images/s, the time a rerun takes to find a finished run has
nothing left to do, index size, peak memory, shard read speed and TokenDataset random reads/s.

The `tiny` preset with random weights (build_model("tiny"), 32 px, f4) on synthetic 48 x 40 JPEGs
written to a temporary folder. Each N runs in a fresh child process, so its peak RSS is its own.

    python benchmarks/bench_extract.py [--sizes 1000 10000] [--full (adds 50000)] [--workers 1]
    python benchmarks/bench_extract.py --photos 192   # the bundled default model on real photographs:
                                                      # --layout shards vs files, TokenDataset reads/s
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _write_images(folder: Path, n: int) -> None:
    """n JPEGs in 100 class folders (the ImageNet layout), smooth random colours."""
    from PIL import Image

    rng = np.random.default_rng(0)
    base = [Image.fromarray(rng.integers(0, 256, (5, 6, 3), np.uint8)).resize((48, 40)) for _ in range(64)]
    for i in range(n):
        cls = folder / f"c{i % 100:03d}"
        cls.mkdir(parents=True, exist_ok=True)
        base[i % 64].rotate(i % 360).save(cls / f"{i:07d}.jpg", quality=90)


def _one(n: int, workers: int, batch_size: int, shard_size: int, root: Path) -> dict:
    """Child process: encode n images, rerun, read back; figures as a dict."""
    import torch

    from optvq_cli.model import build_model
    from optvq_cli.tokenize.dataset import TokenDataset
    from optvq_cli.tokenize.extract import encode_shards
    from optvq_cli.tokenize.shards import Shard

    torch.manual_seed(0)
    model = build_model("tiny").eval()
    images, out = root / f"images{n}", root / f"out{n}"
    t0 = time.perf_counter()
    _write_images(images, n)
    write_s = time.perf_counter() - t0
    kw = dict(shard_size=shard_size, workers=workers, batch_size=batch_size)
    first = encode_shards(model, images, out, **kw)
    t0 = time.perf_counter()
    again = encode_shards(model, images, out, **kw)
    rerun_s = time.perf_counter() - t0
    assert again.written == 0 and again.skipped == n
    shard_files = sorted((out / "shards").glob("*.safetensors"))
    t0 = time.perf_counter()
    read = sum(Shard(p).read_all().tokens.nbytes for p in shard_files)
    read_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    data = TokenDataset(out)
    open_s = time.perf_counter() - t0
    idx = np.random.default_rng(0).integers(0, len(data), 5000)
    t0 = time.perf_counter()
    for i in idx:
        data[int(i)]
    reads_per_s = len(idx) / (time.perf_counter() - t0)
    return {
        "n": n,
        "write_images_s": write_s,
        "encode_s": first.seconds,
        "images_per_s": first.rate,
        "wait_share": first.wait_share,
        "rerun_s": rerun_s,
        "index_bytes": (out / "manifest.json").stat().st_size,
        "shards": len(shard_files),
        "shard_mb": sum(p.stat().st_size for p in shard_files) / 1e6,
        "shard_read_mb_s": read / 1e6 / read_s if read_s else 0.0,
        "open_ms": open_s * 1e3,
        "random_reads_per_s": reads_per_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _shard_io(rows: int, root: Path) -> dict:
    """One shard of ``rows`` ImageNet-sized rows (16 x 16 grid, 4 heads, uint16: imagenet-f16-h4):
    write, read whole, random single rows."""
    from optvq_cli.tokenize.shards import Shard, ShardRows, write_shard

    rng = np.random.default_rng(0)
    data = ShardRows(
        tokens=rng.integers(0, 16384, (rows, 4, 16, 16), dtype=np.uint16),
        paths=[f"n{i % 1000:08d}/n{i % 1000:08d}_{i}.JPEG" for i in range(rows)],
        labels=np.arange(rows, dtype=np.int64) % 1000,
        views=np.zeros(rows, np.uint8),
        sizes=np.full((rows, 2), 500, np.int32),
        crops=np.zeros((rows, 4), np.int32),
        view_names=["center"],
    )
    path = root / f"shard{rows}.safetensors"
    t0 = time.perf_counter()
    write_shard(path, data)
    write_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    nbytes = Shard(path).read_all().tokens.nbytes
    read_s = time.perf_counter() - t0
    shard = Shard(path)
    idx = rng.integers(0, rows, 5000)
    t0 = time.perf_counter()
    for i in idx:
        shard.tokens(int(i))
    return {
        "rows": rows,
        "mb": path.stat().st_size / 1e6,
        "write_s": write_s,
        "read_mb_s": nbytes / 1e6 / read_s,
        "reads_per_s": len(idx) / (time.perf_counter() - t0),
    }


def _shard_table(root: Path) -> None:
    print("\none shard of imagenet-f16-h4-sized rows (4 x 16 x 16 uint16 = 2 kB a row)\n")
    print("| rows | file | write | read whole | random rows/s |")
    print("|---:|---:|---:|---:|---:|")
    for rows in (1_000, 10_000, 50_000):
        r = _shard_io(rows, root)
        print(
            f"| {r['rows']:,} | {r['mb']:.1f} MB | {r['write_s']:.2f} s | {r['read_mb_s']:.0f} MB/s "
            f"| {r['reads_per_s']:,.0f} |"
        )


def _encode_here(images: Path, out: Path, shard_size: int) -> None:
    """One torchrun rank (or the only process): encode with the tiny preset, one thread a process."""
    import torch

    from optvq_cli.model import build_model
    from optvq_cli.tokenize.extract import encode_shards

    torch.set_num_threads(1)
    torch.manual_seed(0)
    encode_shards(build_model("tiny").eval(), images, out, shard_size=shard_size, workers=0, batch_size=64)


def _gloo_table(n: int, root: Path) -> None:
    """torchrun with 1 and 2 gloo processes on the same n images: wall time, identical bytes."""
    images = root / "gloo-images"
    _write_images(images, n)
    outs, walls = {}, {}
    for procs in (1, 2):
        outs[procs] = root / f"gloo{procs}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)]
        cmd += [__file__, "--rank-run", str(images), str(outs[procs]), "--shard-size", str(max(1, n // 8))]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        walls[procs] = time.perf_counter() - t0

    def files(d: Path) -> dict:
        return {p.relative_to(d): p.read_bytes() for p in d.rglob("*") if p.is_file() and p.name != ".optvq.lock"}

    same = files(outs[1]) == files(outs[2])
    print(f"\n{n:,} images in 8 shards, torchrun (gloo, CPU, 1 thread a process, start-up included)\n")
    print("| processes | wall | identical bytes |\n|---:|---:|---|")
    for procs in (1, 2):
        print(f"| {procs} | {walls[procs]:.1f} s | {'yes' if same else 'NO'} |")


def _write_photos(folder: Path, n: int) -> None:
    """n 320 x 320 JPEG crops of the photographs scikit-image ships, at shifting positions."""
    import skimage
    from PIL import Image

    names = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png")
    photos = [Image.open(Path(skimage.__file__).parent / "data" / m).convert("RGB") for m in names]
    folder.mkdir(parents=True)
    for i in range(n):
        im = photos[i % len(photos)]
        k = i // len(photos)
        side = min(im.size) * 3 // 4
        left, top = (k * 29) % (im.width - side), (k * 41) % (im.height - side)
        im.crop((left, top, left + side, top + side)).resize((320, 320)).save(folder / f"{i:05d}.jpg", quality=90)


def _photo_table(n: int, root: Path, workers: int) -> None:
    """The default model at 256 px: files layout vs shards layout, same images, same batch."""
    import torch

    from optvq_cli.model import load_model
    from optvq_cli.tokenize.dataset import TokenDataset
    from optvq_cli.tokenize.encode_job import encode
    from optvq_cli.tokenize.extract import encode_shards

    _write_photos(root / "photos", n)
    model = load_model("default", device="cpu")
    kw = dict(batch_size=16, workers=workers)
    t0 = time.perf_counter()
    encode(model, root / "photos", root / "files", model_ref="default", **kw)
    files_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    encode_shards(model, root / "photos", root / "shards", shard_size=10_000, **kw)
    shards_s = time.perf_counter() - t0
    data = TokenDataset(root / "shards")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0)).tolist() * 50
    t0 = time.perf_counter()
    for i in order:
        data[i]
    reads = len(order) / (time.perf_counter() - t0)
    print(f"\nbundled default model, {n} real-photo crops 320 px -> 256 px, batch 16, --workers {workers}\n")
    print("| layout | images/s | ratio to files |\n|---|---:|---:|")
    print(f"| files | {n / files_s:.1f} | 1.00 |\n| shards | {n / shards_s:.1f} | {files_s / shards_s:.2f} |")
    print(f"\nTokenDataset random reads over the shards: {reads:,.0f} rows/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--full", action="store_true", help="add 50,000 images (several minutes on 2 cores)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--shard-size", type=int, default=10_000)
    ap.add_argument("--shards-only", action="store_true", help="only the one-shard read/write table")
    ap.add_argument("--photos", type=int, metavar="N", help="only the default model on N real photos")
    ap.add_argument("--gloo", type=int, metavar="N", help="only 1 vs 2 torchrun processes on N images")
    ap.add_argument("--rank-run", nargs=2, type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # the child process
    ap.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(_one(args.one, args.workers, args.batch_size, args.shard_size, args.root)))
        return
    if args.rank_run:
        _encode_here(*args.rank_run, args.shard_size)
        return
    if args.gloo:
        with tempfile.TemporaryDirectory() as tmp:
            _gloo_table(args.gloo, Path(tmp))
        return
    if args.photos:
        with tempfile.TemporaryDirectory() as tmp:
            _photo_table(args.photos, Path(tmp), args.workers)
        return
    if args.shards_only:
        with tempfile.TemporaryDirectory() as tmp:
            _shard_table(Path(tmp))
        return
    sizes = args.sizes + ([50_000] if args.full and 50_000 not in args.sizes else [])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            cmd = [sys.executable, __file__, "--one", str(n), "--root", tmp, "--workers", str(args.workers)]
            cmd += ["--batch-size", str(args.batch_size), "--shard-size", str(args.shard_size)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    print(
        f"\ntiny preset, 48x40 JPEGs, --workers {args.workers}, --batch-size {args.batch_size}, "
        f"--shard-size {args.shard_size}\n"
    )
    print(
        "| images | images/s | ms/image | device waited | rerun, nothing to do | index | shards (MB) "
        "| shard read | open | random reads/s | peak RSS |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['n']:,} | {r['images_per_s']:.0f} | {1e3 / r['images_per_s']:.2f} | {r['wait_share']:.0%} "
            f"| {r['rerun_s']:.2f} s | {r['index_bytes'] / 1e3:.1f} kB | {r['shards']} ({r['shard_mb']:.1f}) "
            f"| {r['shard_read_mb_s']:.0f} MB/s | {r['open_ms']:.1f} ms | {r['random_reads_per_s']:,.0f} "
            f"| {r['peak_rss_mb']:.0f} MB |"
        )
    with tempfile.TemporaryDirectory() as tmp:
        _shard_table(Path(tmp))


if __name__ == "__main__":
    main()
