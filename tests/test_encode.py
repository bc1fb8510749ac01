"""`optvq encode / decode / reconstruct` end to end on real photographs from scikit-image."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import preprocess_reference
from PIL import Image
from typer.testing import CliRunner

from optvq_cli.cli.app import app
from optvq_cli.core.errors import UserError
from optvq_cli.core.fileio import TMP_MARK
from optvq_cli.core.lock import LOCK_NAME

runner = CliRunner()

# (bundled file, where the small copy goes): colour, grayscale, RGBA, JPEG, nested folders.
PHOTOS = [
    ("astronaut.png", "astronaut.png"),
    ("coffee.png", "coffee.png"),
    ("chelsea.png", "chelsea.png"),
    ("rocket.jpg", "rocket.jpg"),
    ("motorcycle_left.png", "motorcycle.png"),
    ("retina.jpg", "retina.jpg"),
    ("color.png", "color.png"),
    ("camera.png", "gray/camera.png"),
    ("coins.png", "gray/coins.png"),
    ("page.png", "gray/page.png"),
    ("logo.png", "gray/rgba/logo.png"),
    ("hubble_deep_field.jpg", "space/hubble.jpg"),
]
SHORT_SIDE = 40  # small copies keep the suite fast; the tiny model resizes them to 32 px


def skimage_photo(name: str) -> Path:
    """A photograph shipped inside the installed scikit-image package (never downloaded)."""
    import skimage

    return Path(skimage.__file__).parent / "data" / name


def _small_copy(src: Path, dst: Path) -> None:
    with Image.open(src) as im:
        im.load()
        scale = SHORT_SIDE / min(im.size)
        small = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BICUBIC)
    dst.parent.mkdir(parents=True, exist_ok=True)
    small.save(dst, quality=95) if dst.suffix == ".jpg" else small.save(dst)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    for name, rel in PHOTOS:
        _small_copy(skimage_photo(name), root / rel)
    return root


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from optvq_cli.model import load_model

    return load_model(str(tiny_model_dir), device="cpu")


def names(photos: Path) -> list[str]:
    return sorted(str(Path(rel).with_suffix("").as_posix()) for _, rel in PHOTOS)


def cli(*args) -> tuple[int, str, str]:
    """Runs the CLI in-process: (exit code, stdout, stderr). A UserError is what ``optvq``'s
    entry point turns into one 'error: ...' line and exit 1."""
    res = runner.invoke(app, [str(a) for a in args])
    if isinstance(res.exception, UserError):
        return 1, res.stdout, res.stderr + f"error: {res.exception}\n"
    if res.exception and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res.exit_code, res.stdout, res.stderr


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under folder (hidden ones too) -> its bytes; the lock file, which holds the last
    writer's pid, aside."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != LOCK_NAME
    }


def listing(folder: Path, with_manifest: bool = False) -> list[str]:
    """The names in folder, without the lock file (and manifest.json unless asked for)."""
    skip = {LOCK_NAME} | (set() if with_manifest else {"manifest.json"})
    return sorted(p.name for p in folder.iterdir() if p.name not in skip)


def grids(folder: Path) -> dict[str, np.ndarray]:
    return {
        p.relative_to(folder).with_suffix("").as_posix(): np.load(p, allow_pickle=False)
        for p in sorted(folder.rglob("*.npy"))
    }


def encode(photos, out, model_dir, *extra) -> tuple[int, str, str]:
    return cli("encode", photos, out, "--model", model_dir, "--device", "cpu", "--workers", "0", *extra)


def psnr_by_hand(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255.0**2 / mse)


# ---------------------------------------------------------------- encode


def test_encode_mirrors_the_tree_and_records_the_manifest(photos, tiny_model_dir, model, tmp_path):
    out = tmp_path / "tokens"
    code, stdout, stderr = encode(photos, out, tiny_model_dir)
    assert code == 0, stderr
    assert "encoded 12 of 12" in stdout
    g = grids(out)
    assert sorted(g) == names(photos)
    for grid in g.values():
        assert grid.shape == (2, 8, 8)  # tiny: 2 heads, 32 px / f=4
        assert grid.dtype == np.uint8  # n = 64 codes: 63 fits in 8 bits
        assert grid.max() < 64

    manifest = json.loads((out / "manifest.json").read_text())
    weights_sha = hashlib.sha256((tiny_model_dir / "model.safetensors").read_bytes()).hexdigest()
    assert manifest["model"]["sha256"] == weights_sha
    assert manifest["model"]["ref"] == str(tiny_model_dir.resolve())
    assert manifest["assign"] == "nearest" and manifest["batch_dependent"] is False
    assert (manifest["format"], manifest["optvq_format"]) == ("optvq-tokens", 1) and "version" not in manifest
    assert manifest["layout"] == "files" and manifest["complete"] is True
    assert manifest["preprocess"]["size"] == 32 and manifest["preprocess"]["crop"] == "center"
    rows = {r["name"]: r for r in manifest["images"]}
    assert sorted(rows) == names(photos)
    for _, rel in PHOTOS:
        row = rows[Path(rel).with_suffix("").as_posix()]
        w, h = Image.open(photos / rel).size
        s = min(w, h)
        assert row["source"] == rel
        assert row["original_size"] == [w, h]
        assert row["crop_box"] == [(w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s]
        assert row["grid"] == [8, 8]


def test_tokens_equal_the_model_applied_to_hand_preprocessed_images(photos, tiny_model_dir, model, tmp_path):
    import torch

    out = tmp_path / "tokens"
    assert encode(photos, out, tiny_model_dir)[0] == 0
    g = grids(out)
    for _, rel in PHOTOS[:4]:
        x = torch.from_numpy(preprocess_reference(photos / rel)).permute(2, 0, 1).float() / 127.5 - 1
        expected = model.encode_indices(x[None], assign="nearest")[0].numpy()
        assert (g[Path(rel).with_suffix("").as_posix()] == expected).all()


@pytest.mark.slow
def test_nearest_tokens_do_not_depend_on_batch_size_workers_or_order(photos, tiny_model_dir, tmp_path):
    runs = {}
    for bs, workers in [(1, 0), (3, 2), (8, 0), (8, 2)]:
        out = tmp_path / f"bs{bs}-w{workers}"
        args = ["encode", photos, out, "--model", tiny_model_dir, "--device", "cpu"]
        code, _, stderr = cli(*args, "--batch-size", bs, "--workers", workers)
        assert code == 0, stderr
        runs[(bs, workers)] = tree(out)
    # the same images listed in reverse order: a different batch composition and order
    lst = tmp_path / "reversed.txt"
    lst.write_text("\n".join(str(photos / rel) for _, rel in reversed(PHOTOS)))
    out = tmp_path / "reversed"
    assert encode(lst, out, tiny_model_dir, "--batch-size", "5")[0] == 0
    reversed_grids = grids(out)

    first = runs[(1, 0)]
    assert len([k for k in first if k.endswith(".npy")]) == 12
    for files in runs.values():
        assert files == first  # byte-identical grids and manifest
    assert {k: v.tobytes() for k, v in reversed_grids.items()} == {
        k: v.tobytes() for k, v in grids(tmp_path / "bs1-w0").items()
    }


def test_sinkhorn_assignment_works_and_is_marked_batch_dependent(photos, tiny_model_dir, model, tmp_path):
    import torch

    out = tmp_path / "sk"
    code, _, stderr = encode(photos, out, tiny_model_dir, "--assign", "sinkhorn", "--batch-size", "12")
    assert code == 0, stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["assign"] == "sinkhorn" and manifest["batch_dependent"] is True
    assert manifest["batch_size"] == 12
    # one batch of all 12 images: the same as the model's sinkhorn on that batch, in file order, on 1
    # thread as on 2; in the contiguous layout encode hands the model (a channels-last view takes
    # other convolution kernels on 1 thread, and flips near-tied tokens of this random model)
    order = sorted(PHOTOS, key=lambda p: p[1])
    hand = [preprocess_reference(photos / rel) for _, rel in order]
    x = (torch.from_numpy(np.stack(hand)).permute(0, 3, 1, 2).float() / 127.5 - 1).contiguous()
    g = grids(out)
    got = np.stack([g[Path(rel).with_suffix("").as_posix()] for _, rel in order])
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            assert (got == model.encode_indices(x, assign="sinkhorn").numpy()).all(), n
    finally:
        torch.set_num_threads(threads)


def test_the_encoder_gets_a_contiguous_batch_and_gives_the_apis_tokens(
    photos, tiny_model_dir, model, tmp_path, monkeypatch
):
    """One layout everywhere: a channels-last view would take other convolution kernels than the
    tensor a user builds, and flip near-tied tokens."""

    from optvq_cli.core.images import batch_to_tensor
    from optvq_cli.model.optvq import OptVQModel

    assert batch_to_tensor([np.zeros((8, 8, 3), np.uint8)] * 2).is_contiguous()
    seen = []
    real = OptVQModel.encode_indices

    def spy(self, x, assign="nearest"):
        seen.append(x.clone())
        assert x.is_contiguous()
        return real(self, x, assign=assign)

    monkeypatch.setattr(OptVQModel, "encode_indices", spy)
    out = tmp_path / "sk"
    code, _, stderr = encode(photos, out, tiny_model_dir, "--assign", "sinkhorn", "--batch-size", "12")
    assert code == 0, stderr
    assert len(seen) == 1 and seen[0].shape == (12, 3, 32, 32)
    # the tokens a user gets from the API on the same pixels in the usual (contiguous) layout
    expected = real(model, seen[0].contiguous(), assign="sinkhorn").numpy()
    order = sorted(PHOTOS, key=lambda p: p[1])
    g = grids(out)
    assert (np.stack([g[Path(rel).with_suffix("").as_posix()] for _, rel in order]) == expected).all()


def test_single_file_and_pack(photos, tiny_model_dir, tmp_path):
    code, _, _ = encode(photos / "chelsea.png", tmp_path / "one", tiny_model_dir)
    assert code == 0 and sorted(grids(tmp_path / "one")) == ["chelsea"]

    assert encode(photos, tmp_path / "files", tiny_model_dir)[0] == 0
    code, _, stderr = encode(photos, tmp_path / "packed", tiny_model_dir, "--pack")
    assert code == 0, stderr
    packed = np.load(tmp_path / "packed" / "tokens.npy", allow_pickle=False)
    order = (tmp_path / "packed" / "paths.txt").read_text().splitlines()
    assert order == names(photos) and packed.shape == (12, 2, 8, 8) and packed.dtype == np.uint8
    per_file = grids(tmp_path / "files")
    assert all((packed[i] == per_file[n]).all() for i, n in enumerate(order))
    assert not list((tmp_path / "packed").rglob("*.npy"))[1:]  # only tokens.npy


def test_no_crop_keeps_the_whole_image_and_records_padding(photos, tiny_model_dir, tmp_path):
    code, _, stderr = encode(photos / "coffee.png", tmp_path / "nc", tiny_model_dir, "--no-crop", "--size", "30")
    assert code == 0, stderr
    w, h = Image.open(photos / "coffee.png").size  # 60 x 40
    row = json.loads((tmp_path / "nc" / "manifest.json").read_text())["images"][0]
    rw = round(w * 30 / h)  # longer side keeps the aspect: 45
    assert row["crop_box"] == [0, 0, w, h] and row["resized"] == [rw, 30]
    assert row["padding"] == [0, 0, -rw % 4, 2]
    grid = np.load(tmp_path / "nc" / "coffee.npy")
    assert grid.shape == (2, 32 // 4, (rw + (-rw % 4)) // 4)
    code, _, stderr = cli("decode", tmp_path / "nc", tmp_path / "dec", "--device", "cpu")
    assert code == 0, stderr
    assert Image.open(tmp_path / "dec" / "coffee.png").size == (rw, 30)  # padding cut off again


# ---------------------------------------------------------------- decode and reconstruct


def test_encode_then_decode_equals_reconstruct_and_psnr_is_right(photos, tiny_model_dir, tmp_path):
    assert encode(photos, tmp_path / "tok", tiny_model_dir)[0] == 0
    code, stdout, stderr = cli("decode", tmp_path / "tok", tmp_path / "dec", "--device", "cpu")  # model from manifest
    assert code == 0, stderr
    assert "decoded 12 of 12" in stdout
    code, stdout, stderr = cli(
        "reconstruct",
        photos,
        tmp_path / "rec",
        "--model",
        tiny_model_dir,
        "--device",
        "cpu",
        "--workers",
        "0",
    )
    assert code == 0, stderr
    dec, rec = tree(tmp_path / "dec"), tree(tmp_path / "rec")
    assert json.loads(rec.pop("manifest.json"))["format"] == "optvq-reconstruct"
    assert json.loads(dec.pop("manifest.json"))["format"] == "optvq-decode"
    assert sorted(dec) == sorted(rec) == [n + ".png" for n in names(photos)]
    values = []
    for name in dec:
        a, b = (
            np.asarray(Image.open(tmp_path / "dec" / name)),
            np.asarray(Image.open(tmp_path / "rec" / name)),
        )
        assert a.shape == (32, 32, 3) and (a == b).all()
        src = next(rel for _, rel in PHOTOS if Path(rel).with_suffix(".png").as_posix() == name)
        values.append(psnr_by_hand(preprocess_reference(photos / src), b))
    assert f"mean PSNR (RGB) {np.mean(values):.2f} dB over 12 images" in stdout


def test_side_by_side(photos, tiny_model_dir, tmp_path):
    args = [
        "reconstruct",
        photos / "astronaut.png",
        tmp_path / "sbs",
        "--model",
        tiny_model_dir,
        "--side-by-side",
    ]
    code, _, stderr = cli(*args, "--device", "cpu", "--workers", "0")
    assert code == 0, stderr
    both = np.asarray(Image.open(tmp_path / "sbs" / "astronaut.png"))
    assert both.shape == (32, 64, 3)
    assert (both[:, :32] == preprocess_reference(photos / "astronaut.png")).all()
    code, stdout, _ = cli(*args, "--device", "cpu", "--workers", "0")
    assert code == 0 and "reconstructed 0 of 1, 1 already done" in stdout


def test_decode_checks_each_grid_of_a_packed_file(tiny_model_dir, tmp_path):
    packed = np.zeros((3, 2, 8, 8), np.uint8)
    packed[1, 0, 0, 0] = 200  # outside [0, 64)
    np.save(tmp_path / "tokens.npy", packed)
    (tmp_path / "paths.txt").write_text("a\nb\nc\n")
    code, stdout, stderr = cli("decode", tmp_path / "tokens.npy", tmp_path / "out", "--model", tiny_model_dir)
    assert code == 1 and "decoded 2 of 3, 1 failed" in stdout
    assert f"{tmp_path / 'tokens.npy'}[1]: index 200 is outside [0, 64)" in stderr
    assert listing(tmp_path / "out") == ["a.png", "c.png"]


def test_decode_packed_equals_decode_of_files(photos, tiny_model_dir, tmp_path):
    assert encode(photos, tmp_path / "files", tiny_model_dir)[0] == 0
    assert encode(photos, tmp_path / "packed", tiny_model_dir, "--pack")[0] == 0
    assert cli("decode", tmp_path / "files", tmp_path / "d1", "--device", "cpu")[0] == 0
    code, _, stderr = cli("decode", tmp_path / "packed" / "tokens.npy", tmp_path / "d2", "--device", "cpu")
    assert code == 0, stderr
    d1, d2 = tree(tmp_path / "d1"), tree(tmp_path / "d2")
    assert d1.pop("manifest.json") != d2.pop("manifest.json")  # each names its own token files
    assert d1 == d2


def test_grayscale_model(photos, tmp_path):
    import torch

    from optvq_cli.model import build_model, save_model

    torch.manual_seed(1)
    gray_dir = save_model(build_model("tiny", in_channels=1, out_channels=1), tmp_path / "gray-model")
    code, stdout, stderr = cli(
        "reconstruct",
        photos / "gray",
        tmp_path / "rec",
        "--model",
        gray_dir,
        "--device",
        "cpu",
        "--workers",
        "0",
    )
    assert code == 0, stderr
    out = Image.open(tmp_path / "rec" / "camera.png")
    assert out.mode == "L" and out.size == (32, 32)


# ---------------------------------------------------------------- safety: skip, resume, refuse


def test_rerun_skips_finished_outputs_and_overwrite_redoes_them(photos, tiny_model_dir, tmp_path):
    out = tmp_path / "tok"
    assert encode(photos, out, tiny_model_dir)[0] == 0
    clean = tree(out)
    np.save(out / "chelsea.npy", np.zeros((2, 8, 8), np.uint8))  # pretend an old output
    code, stdout, _ = encode(photos, out, tiny_model_dir)
    assert code == 0 and "encoded 0 of 12, 12 already done" in stdout
    assert (np.load(out / "chelsea.npy") == 0).all()  # left alone
    code, stdout, _ = encode(photos, out, tiny_model_dir, "--overwrite")
    assert code == 0 and "encoded 12 of 12" in stdout
    assert tree(out) == clean


@pytest.mark.slow
def test_resume_after_sigkill_ends_with_the_files_of_an_uninterrupted_run(photos, tiny_model_dir, tmp_path):
    many = tmp_path / "many"  # enough images that the kill lands mid-run
    for i in range(5):
        shutil.copytree(photos, many / f"set{i}")
    total = 5 * len(PHOTOS)
    opts = ["--model", str(tiny_model_dir), "--device", "cpu", "--batch-size", "1", "--workers", "0"]
    assert cli("encode", many, tmp_path / "clean", *opts)[0] == 0

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "optvq_cli", "encode", str(many), str(out), *opts]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while (
        time.monotonic() < deadline
        and proc.poll() is None
        and len([p for p in out.rglob("*.npy") if TMP_MARK not in p.name]) < 5
    ):
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    # finished outputs only: a kill mid-write leaves a temporary ".<name>.optvq-tmp-….npy" behind
    written = len([p for p in out.rglob("*.npy") if TMP_MARK not in p.name])
    assert proc.returncode == -signal.SIGKILL
    assert 5 <= written < total, "the run was not interrupted mid-way"
    assert json.loads((out / "manifest.json").read_text())["complete"] is False

    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert f"{total - written} of {total}, {written} already done" in res.stdout
    assert tree(out) == tree(tmp_path / "clean")


def test_bad_inputs_are_reported_skipped_and_counted(photos, tiny_model_dir, tmp_path):
    mixed = tmp_path / "mixed"
    shutil.copytree(photos, mixed)
    (mixed / "empty.png").write_bytes(b"")
    (mixed / "notes.jpg").write_text("a text file, not a photo")
    data = (photos / "astronaut.png").read_bytes()
    (mixed / "truncated.png").write_bytes(data[: len(data) // 2])
    Image.new("RGB", (3, 7)).save(mixed / "speck.png")  # smaller than one 4x4 token

    assert encode(photos, tmp_path / "good", tiny_model_dir)[0] == 0
    code, stdout, stderr = encode(mixed, tmp_path / "out", tiny_model_dir)
    assert code == 1
    assert "encoded 12 of 16, 4 failed" in stdout
    for name, reason in [
        ("empty.png", "empty file (0 bytes)"),
        ("notes.jpg", "not an image Pillow can read"),
        ("truncated.png", "truncated or corrupt image"),
        ("speck.png", "image is 3x7 px, smaller than one token (4x4 px)"),
    ]:
        line = next(ln for ln in stderr.splitlines() if name in ln)
        assert str(mixed / name) in line and reason in line
    assert "Traceback" not in stderr
    good = tree(tmp_path / "good")
    out = tree(tmp_path / "out")
    assert {k: v for k, v in out.items() if k.endswith(".npy")} == {k: v for k, v in good.items() if k.endswith(".npy")}
    assert len(json.loads(out["manifest.json"])["images"]) == 12

    code, stdout, stderr = encode(mixed, tmp_path / "strict", tiny_model_dir, "--strict")
    assert code == 1 and "stopped by --strict" in stderr and str(mixed / "empty.png") in stderr


def test_output_of_another_model_is_refused_unless_overwrite(photos, tiny_model_dir, tmp_path):
    import torch

    from optvq_cli.model import build_model, save_model

    torch.manual_seed(123)
    other = save_model(build_model("tiny"), tmp_path / "other-model")
    out = tmp_path / "tok"
    assert encode(photos, out, tiny_model_dir)[0] == 0
    before = tree(out)
    code, _, stderr = encode(photos, out, other)
    assert code == 1 and "belong to another model" in stderr and "--overwrite" in stderr
    assert tree(out) == before
    code, _, stderr = encode(photos, out, tiny_model_dir, "--size", "64")
    assert code == 1 and "different preprocess" in stderr
    code, _, stderr = encode(photos, out, other, "--overwrite")
    assert code == 0, stderr
    assert (
        json.loads((out / "manifest.json").read_text())["model"]["sha256"]
        == hashlib.sha256((other / "model.safetensors").read_bytes()).hexdigest()
    )
    # decoding these tokens with the first model is refused: the manifest names another model
    code, _, stderr = cli("decode", out, tmp_path / "dec", "--model", tiny_model_dir, "--device", "cpu")
    assert code == 1 and "made by another model" in stderr and not (tmp_path / "dec").exists()


def test_decode_validates_every_file(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    np.save(bad / "good.npy", np.full((2, 8, 8), 5, np.uint8))
    np.save(bad / "float.npy", np.zeros((2, 8, 8), np.float32))
    np.save(bad / "heads.npy", np.zeros((4, 8, 8), np.uint8))
    np.save(bad / "flat.npy", np.zeros((8, 8), np.uint8))
    np.save(bad / "range.npy", np.full((2, 8, 8), 64, np.uint16))
    np.save(bad / "negative.npy", np.full((2, 8, 8), -1, np.int32))
    np.save(bad / "pickle.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    (bad / "garbage.npy").write_bytes(b"garbage")
    code, stdout, stderr = cli("decode", bad, tmp_path / "out", "--model", tiny_model_dir, "--device", "cpu")
    assert code == 1
    assert "decoded 1 of 8, 7 failed" in stdout
    expected = {
        "float.npy": "dtype float32 is not an integer type",
        "heads.npy": "has 4 heads (shape (4, 8, 8)), the model has 2",
        "flat.npy": "shape (8, 8) is not (heads, h, w) or (N, heads, h, w)",
        "range.npy": "index 64 is outside [0, 64)",
        "negative.npy": "index -1 is outside [0, 64)",
        "pickle.npy": "holds pickled Python objects",
        "garbage.npy": "not a .npy file",
    }
    for name, reason in expected.items():
        lines = [ln for ln in stderr.splitlines() if name in ln]
        assert len(lines) == 1 and str(bad / name) in lines[0] and reason in lines[0], (name, stderr)
    assert "Traceback" not in stderr
    assert listing(tmp_path / "out") == ["good.png"]


@pytest.mark.slow
def test_cli_errors_are_one_line_without_traceback(tiny_model_dir, tmp_path):
    """Through the real entry point: a user's mistake is one 'error:' line and exit 1."""
    out = tmp_path / "tok"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"format": "optvq-tokens", "model": {"sha256": "0" * 64}}))
    np.save(out / "a.npy", np.zeros((2, 8, 8), np.uint8))
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "optvq_cli",
            "decode",
            str(out),
            str(tmp_path / "d"),
            "--model",
            str(tiny_model_dir),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 1
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "made by another model" in lines[0]


# ---------------------------------------------------------------- OUTPUT safety


def refused(result: tuple[int, str, str], *needles: str) -> str:
    """The run was refused: exit 1, one 'error:' line on stderr holding every needle, no traceback."""
    code, _, stderr = result
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert code == 1, stderr
    assert "Traceback" not in stderr
    assert len(lines) == 1 and lines[0].startswith("error:"), stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def reconstruct(src, out, model_dir, *extra) -> tuple[int, str, str]:
    return cli("reconstruct", src, out, "--model", model_dir, "--device", "cpu", "--workers", "0", *extra)


def test_reconstruct_never_writes_among_its_inputs(photos, tiny_model_dir, tmp_path):
    same = tmp_path / "same"
    shutil.copytree(photos, same)
    before = tree(same)
    refused(reconstruct(same, same, tiny_model_dir, "--overwrite"), str(same), "choose an OUTPUT folder outside")
    # OUTPUT an ancestor of INPUT: <name>.png lands next to other photos
    refused(reconstruct(same / "gray", same, tiny_model_dir, "--overwrite"), "outside INPUT")
    # one image whose folder is OUTPUT: OUTPUT/astronaut.png is the input itself
    refused(reconstruct(same / "astronaut.png", same, tiny_model_dir, "--overwrite"), "outside INPUT")
    # a list naming images that sit in OUTPUT
    lst = tmp_path / "list.txt"
    lst.write_text(f"{same / 'chelsea.png'}\n{photos / 'coffee.png'}\n")
    refused(reconstruct(lst, same, tiny_model_dir, "--overwrite"), "outside INPUT")
    # a symlink inside OUTPUT that leads back to the inputs
    out = tmp_path / "out"
    out.mkdir()
    (out / "gray").symlink_to(same / "gray", target_is_directory=True)
    refused(reconstruct(same, out, tiny_model_dir, "--overwrite"), "is an input image")
    assert tree(same) == before


def test_decode_refuses_output_names_that_leave_output(tiny_model_dir, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    np.save(src / "tokens.npy", np.zeros((4, 2, 8, 8), np.uint8))
    (src / "paths.txt").write_text(f"../escaped\n{tmp_path / 'absolute'}\nok\nsub/../../up\n")
    out = tmp_path / "work" / "out"
    code, stdout, stderr = cli("decode", src / "tokens.npy", out, "--model", tiny_model_dir, "--device", "cpu")
    assert code == 1 and "decoded 1 of 4, 3 failed" in stdout and "Traceback" not in stderr
    assert "'../escaped' (from paths.txt) has a '..' part" in stderr
    assert f"'{tmp_path / 'absolute'}' (from paths.txt) is an absolute path" in stderr
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.png")) == ["work/out/ok.png"]


def test_decode_refuses_manifest_names_that_leave_output(photos, tiny_model_dir, tmp_path):
    tok = tmp_path / "tok"
    assert encode(photos, tok, tiny_model_dir)[0] == 0
    manifest = json.loads((tok / "manifest.json").read_text())
    manifest["images"][0]["name"] = "../../astronaut"
    (tok / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "a" / "b"
    code, stdout, stderr = cli("decode", tok, out, "--device", "cpu")
    assert code == 1 and "decoded 11 of 12, 1 failed" in stdout and "Traceback" not in stderr
    assert "images[0].name '../../astronaut' has a '..' part" in stderr
    assert not list(tmp_path.glob("*.png")) and not (tmp_path / "astronaut.png").exists()


def test_reconstruct_rerun_with_another_model_or_settings_is_refused(photos, tiny_model_dir, other_model_dir, tmp_path):
    gray = photos / "gray"
    out = tmp_path / "rec"
    assert reconstruct(gray, out, tiny_model_dir)[0] == 0
    before = tree(out)
    manifest = json.loads(before["manifest.json"])
    weights_sha = hashlib.sha256((tiny_model_dir / "model.safetensors").read_bytes()).hexdigest()
    assert manifest["model"]["sha256"] == weights_sha and manifest["side_by_side"] is False
    assert sorted(r["name"] for r in manifest["images"]) == ["camera", "coins", "page", "rgba/logo"]

    refused(reconstruct(gray, out, other_model_dir), "belong to another model", "--overwrite")
    refused(reconstruct(gray, out, tiny_model_dir, "--size", "64"), "different preprocess (size 32 vs 64)")
    refused(reconstruct(gray, out, tiny_model_dir, "--side-by-side"), "different side_by_side (false vs true)")
    assert tree(out) == before
    code, stdout, _ = reconstruct(gray, out, tiny_model_dir)
    assert code == 0 and "reconstructed 0 of 4, 4 already done" in stdout

    code, _, stderr = reconstruct(gray, out, other_model_dir, "--side-by-side", "--overwrite")
    assert code == 0, stderr
    assert reconstruct(gray, tmp_path / "fresh", other_model_dir, "--side-by-side")[0] == 0
    assert tree(out) == tree(tmp_path / "fresh")


def test_reconstruct_does_not_take_over_files_it_did_not_write(photos, tiny_model_dir, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "camera.png").write_bytes(b"my own picture")
    refused(reconstruct(photos / "gray", out, tiny_model_dir), f"{out / 'camera.png'}: exists", "no manifest.json")
    assert tree(out) == {"camera.png": b"my own picture"}


@pytest.mark.slow
def test_encode_overwrite_leaves_the_folder_as_a_fresh_run_would(photos, tiny_model_dir, other_model_dir, tmp_path):
    for layout in ([], ["--pack"]):
        assert encode(photos, tmp_path / f"fresh{layout}", tiny_model_dir, *layout)[0] == 0
    assert encode(photos, tmp_path / "fresh-other", other_model_dir)[0] == 0
    out = tmp_path / "tok"
    assert encode(photos, out, tiny_model_dir)[0] == 0

    assert encode(photos, out, tiny_model_dir, "--pack", "--overwrite")[0] == 0  # files -> packed
    assert tree(out) == tree(tmp_path / "fresh['--pack']")  # no stale .npy, no empty gray/ folder
    assert listing(out, with_manifest=True) == ["manifest.json", "paths.txt", "tokens.npy"]
    assert encode(photos, out, tiny_model_dir, "--overwrite")[0] == 0  # packed -> files
    assert tree(out) == tree(tmp_path / "fresh[]")
    assert encode(photos, out, other_model_dir, "--overwrite")[0] == 0  # another model
    assert tree(out) == tree(tmp_path / "fresh-other")

    # a rerun on fewer images keeps listing the earlier outputs; a file nobody listed is left alone
    np.save(out / "stranger.npy", np.zeros((2, 8, 8), np.uint8))
    assert encode(photos / "gray", out, other_model_dir)[0] == 0
    rows = {r["name"]: r for r in json.loads((out / "manifest.json").read_text())["images"]}
    assert sorted(rows) == sorted(names(photos) + ["camera", "coins", "page", "rgba/logo"])
    assert rows["camera"]["source"] == "camera.png"  # relative to this run's INPUT, photos/gray
    assert rows["astronaut"]["source"] == str(photos.resolve() / "astronaut.png")  # an earlier INPUT's
    assert (out / "stranger.npy").exists()


def test_decode_with_a_manifest_decodes_only_the_files_it_lists(photos, tiny_model_dir, tmp_path):
    out = tmp_path / "tok"
    assert encode(photos, out, tiny_model_dir)[0] == 0
    np.save(out / "stale.npy", np.zeros((2, 8, 8), np.uint8))  # e.g. left by a hand copy
    code, stdout, stderr = cli("decode", out, tmp_path / "dec", "--device", "cpu")
    assert code == 0 and "decoded 12 of 12" in stdout, stderr
    assert not (tmp_path / "dec" / "stale.png").exists()
    (out / "chelsea.npy").unlink()
    code, stdout, stderr = cli("decode", out, tmp_path / "dec2", "--device", "cpu")
    assert code == 1 and "decoded 11 of 12, 1 failed" in stdout
    assert f"{out / 'chelsea.npy'}: no such file (listed in manifest.json)" in stderr


def test_markup_in_user_paths_is_printed_as_is(photos, tiny_model_dir, tmp_path):
    src = tmp_path / "brk"
    shutil.copytree(photos / "gray", src)
    bad = src / "[bold]trip" / "[red]bad.jpg"
    bad.parent.mkdir()
    bad.write_text("not a photo")
    code, stdout, stderr = encode(src, tmp_path / "out", tiny_model_dir)
    assert code == 1 and "encoded 4 of 5, 1 failed" in stdout
    assert f"skipped {bad}: not an image Pillow can read" in stderr
    # through the real entry point: a missing INPUT whose name looks like a closing tag
    res = subprocess.run(
        [sys.executable, "-m", "optvq_cli", "encode", "nope[/x]", str(tmp_path / "t")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    refused((res.returncode, res.stdout, res.stderr), "nope[/x]: no such file or folder")


MANIFEST_EDITS = [
    (lambda m: m["images"][0].__setitem__("padding", [0, 0, 0, 1000]), "images[0].padding [0, 0, 0, 1000]"),
    (lambda m: m["images"][0].__setitem__("padding", "abc"), "images[0].padding must be 4 non-negative integers"),
    (lambda m: m.__setitem__("images", [1]), "images[0] must be an object"),
    (lambda m: m.__setitem__("model", "x"), 'model must be an object, got "x"'),
    (lambda m: m["images"][1].__setitem__("name", None), "images[1].name must be a non-empty string"),
]


@pytest.mark.parametrize("edit, field", MANIFEST_EDITS, ids=["padding-big", "padding-str", "row-int", "model", "name"])
def test_an_edited_manifest_is_refused_naming_the_field(photos, tiny_model_dir, tmp_path, edit, field):
    out = tmp_path / "tok"
    assert encode(photos / "gray", out, tiny_model_dir)[0] == 0
    manifest = json.loads((out / "manifest.json").read_text())
    edit(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))
    before = tree(out)
    where = str(out / "manifest.json")
    refused(cli("decode", out, tmp_path / "dec", "--model", tiny_model_dir, "--device", "cpu"), where, field)
    refused(encode(photos / "gray", out, tiny_model_dir), where, field)
    refused(encode(photos / "gray", out, tiny_model_dir, "--overwrite"), where, field)
    assert tree(out) == before and not (tmp_path / "dec").exists()


# ---------------------------------------------------------------- messages and smaller refusals


def test_pack_with_no_crop_is_refused_before_any_work(photos, tmp_path):
    out = tmp_path / "tok"
    refused(encode(photos, out, tmp_path / "no-such-model", "--pack", "--no-crop"), "--pack --no-crop")
    assert not out.exists()


def test_an_empty_input_folder_is_reported_before_the_model_load(tmp_path):
    (tmp_path / "empty").mkdir()
    for command in ("encode", "reconstruct"):
        refused(cli(command, tmp_path / "empty", tmp_path / "o", "--model", tmp_path / "gone"), "no images found")


def test_a_missing_model_is_named_for_what_it_is(photos, tiny_model_dir, tmp_path, monkeypatch):
    model_copy = tmp_path / "model-copy"
    shutil.copytree(tiny_model_dir, model_copy)
    tok = tmp_path / "tok"
    assert encode(photos / "gray", tok, model_copy)[0] == 0
    shutil.rmtree(model_copy)
    line = refused(cli("decode", tok, tmp_path / "dec", "--device", "cpu"))
    assert line.startswith(f"error: the model recorded in {tok / 'manifest.json'} ({model_copy}) cannot be loaded")
    assert line.endswith("pass --model")
    from optvq_cli.checkpoints import refs as checkpoint

    monkeypatch.setattr(checkpoint, "BUNDLED_DIRS", [tmp_path / "no-bundled-models"])  # an install without them
    refused(cli("encode", photos, tmp_path / "x"), "no bundled default model is installed; pass --model REF")


def test_failures_leave_the_manifest_incomplete_with_their_count(photos, tiny_model_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(photos / "gray", src)
    (src / "broken.png").write_bytes(b"")
    assert encode(src, tmp_path / "tok", tiny_model_dir)[0] == 1
    manifest = json.loads((tmp_path / "tok" / "manifest.json").read_text())
    assert manifest["complete"] is False and manifest["failed"] == 1 and len(manifest["images"]) == 4
    assert encode(photos / "gray", tmp_path / "ok", tiny_model_dir)[0] == 0
    manifest = json.loads((tmp_path / "ok" / "manifest.json").read_text())
    assert manifest["complete"] is True and manifest["failed"] == 0


def test_ctrl_c_prints_one_line_exits_130_and_the_manifest_lists_what_was_written(
    photos, tiny_model_dir, tmp_path, monkeypatch
):
    from optvq_cli.tokenize import encode_job as codec

    real = codec.encoded_batches

    def interrupted_after_two(*args, **kwargs):
        for i, batch in enumerate(real(*args, **kwargs)):
            if i == 2:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(codec, "encoded_batches", interrupted_after_two)
    out = tmp_path / "tok"
    code, _, stderr = encode(photos, out, tiny_model_dir, "--batch-size", "3")
    assert code == 130 and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == "interrupted; rerun the same command to resume"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is False
    assert sorted(r["name"] for r in manifest["images"]) == sorted(grids(out)) and len(grids(out)) == 6

    monkeypatch.setattr(codec, "encoded_batches", real)
    code, stdout, _ = encode(photos, out, tiny_model_dir, "--batch-size", "3")
    assert code == 0 and "encoded 6 of 12, 6 already done" in stdout
    assert encode(photos, tmp_path / "clean", tiny_model_dir)[0] == 0
    assert tree(out) == tree(tmp_path / "clean")


def test_no_crop_judges_the_size_after_resizing(tiny_model_dir, tmp_path):
    src = tmp_path / "strip.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (3, 60, 3), np.uint8)).save(src)  # 60 x 3 px
    code, _, stderr = encode(src, tmp_path / "crop", tiny_model_dir)
    assert code == 1 and "image is 60x3 px, smaller than one token (4x4 px)" in stderr
    code, _, stderr = encode(src, tmp_path / "whole", tiny_model_dir, "--no-crop", "--size", "8")
    assert code == 0, stderr
    assert np.load(tmp_path / "whole" / "strip.npy").shape == (2, 2, 40)  # 60 x 3 -> 160 x 8 px
    refused(encode(src, tmp_path / "tiny", tiny_model_dir, "--size", "2"), "--size 2: smaller than one token")
