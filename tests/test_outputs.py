"""OUTPUT folders of encode / decode / reconstruct: never a file optvq did not write replaced or
deleted, never a write or delete outside OUTPUT, a manifest (and a journal) of every file written."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from optvq_cli.cli.app import app
from optvq_cli.core.errors import UserError
from optvq_cli.core.fileio import TMP_MARK
from optvq_cli.core.lock import LOCK_NAME

runner = CliRunner()


def cli(*args) -> tuple[int, str, str]:
    """In-process CLI: (exit code, stdout, stderr); a UserError is the entry point's one error line."""
    res = runner.invoke(app, [str(a) for a in args])
    if isinstance(res.exception, UserError):
        return 1, res.stdout, res.stderr + f"error: {res.exception}\n"
    if res.exception and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res.exit_code, res.stdout, res.stderr


def refused(result: tuple[int, str, str], *needles: str) -> str:
    code, _, stderr = result
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert code == 1 and "Traceback" not in stderr, stderr
    assert len(lines) == 1 and lines[0].startswith("error:"), stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def tree(folder: Path) -> dict[str, bytes]:
    """Every file below folder (hidden ones too, not following links) -> its bytes; the lock file aside."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink() and p.name != LOCK_NAME and not any(q.is_symlink() for q in p.parents)
    }


def photo_set(root: Path, n: int = 6, seed: int = 0, sub: str = "gray") -> Path:
    """n random 40x40 photos, the last two in a subfolder."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        path = root / (f"{sub}/p{i}.png" if i >= n - 2 else f"p{i}.png")
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), np.uint8)).save(path)
    return root


@pytest.fixture()
def sk(tmp_path) -> Path:
    return photo_set(tmp_path / "sk")


def opts(model_dir: Path) -> list:
    return ["--model", model_dir, "--device", "cpu", "--workers", "0"]


def encode(src, out, model_dir, *extra):
    return cli("encode", src, out, *opts(model_dir), *extra)


def decode(tokens, out, *extra):
    return cli("decode", tokens, out, "--device", "cpu", *extra)


def reconstruct(src, out, model_dir, *extra):
    return cli("reconstruct", src, out, *opts(model_dir), *extra)


# ---------------------------------------------------------------- no file optvq did not write


def test_decode_never_replaces_the_source_images(sk, tiny_model_dir, tmp_path):
    before = tree(sk)
    assert encode(sk, tmp_path / "sktok", tiny_model_dir)[0] == 0
    refused(decode(tmp_path / "sktok", sk, "--overwrite"), str(sk), "source image", "replace the originals")
    refused(decode(tmp_path / "sktok", sk / "gray"), "source image")
    assert tree(sk) == before


def test_decode_refuses_an_output_holding_its_token_files(sk, tiny_model_dir, tmp_path):
    tok = tmp_path / "tok"
    assert encode(sk, tok, tiny_model_dir)[0] == 0
    before = tree(tok)
    refused(decode(tok, tok), str(tok), "holds the token input")
    refused(decode(tok / "p0.npy", tok, "--overwrite"), "holds the token input")
    assert tree(tok) == before


def test_decode_does_not_replace_or_count_a_file_it_did_not_write(sk, tiny_model_dir, tmp_path):
    tok, out = tmp_path / "tok", tmp_path / "dec"
    assert encode(sk, tok, tiny_model_dir)[0] == 0
    out.mkdir()
    (out / "p1.png").write_bytes(b"my own picture")
    for extra in ([], ["--overwrite"]):
        code, stdout, stderr = decode(tok, out, *extra)
        assert code == 1 and "decoded 5 of 6, 1 failed" in stdout, stdout + stderr
        assert f"{out / 'p1.png'}: exists, and" in stderr and "so optvq did not write it; not replaced" in stderr
        assert (out / "p1.png").read_bytes() == b"my own picture"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "optvq-decode" and "p1" not in {r["name"] for r in manifest["images"]}


def test_decode_keeps_a_manifest_and_overwrite_removes_only_what_it_lists(sk, tiny_model_dir, tmp_path):
    tok, out = tmp_path / "tok", tmp_path / "dec"
    assert encode(sk, tok, tiny_model_dir)[0] == 0
    assert decode(tok, out)[0] == 0
    manifest = json.loads((out / "manifest.json").read_text())
    rows = {r["name"]: r for r in manifest["images"]}
    assert sorted(rows) == ["gray/p4", "gray/p5", "p0", "p1", "p2", "p3"]
    assert rows["p0"]["source"] == str((tok / "p0.npy").resolve())
    assert rows["p0"]["source_size"] == (tok / "p0.npy").stat().st_size
    (out / "mine.txt").write_text("notes")
    assert decode(tok / "p0.npy", out, "--overwrite")[0] == 0  # one file now: the other PNGs go
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == ["p0.png"]
    assert (out / "mine.txt").read_text() == "notes"


def test_reconstruct_refuses_an_output_inside_its_input(sk, tiny_model_dir):
    before = tree(sk)
    refused(reconstruct(sk, sk / "out", tiny_model_dir), f"{sk / 'out'}: lies inside INPUT", "outside INPUT")
    assert tree(sk) == before and not (sk / "out").exists()


def test_encode_refuses_an_output_holding_its_inputs(sk, tiny_model_dir):
    before = tree(sk)
    refused(encode(sk / "gray", sk, tiny_model_dir), "holds the input", "outside INPUT")
    assert tree(sk) == before


# ---------------------------------------------------------------- nothing outside OUTPUT


@pytest.mark.parametrize("command", ["encode", "decode"])
def test_a_symlinked_subfolder_does_not_lead_writes_outside(sk, tiny_model_dir, tmp_path, command):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    o4 = tmp_path / "o4"
    o4.mkdir()
    (o4 / "gray").symlink_to(elsewhere, target_is_directory=True)
    says = f"{o4 / 'gray'}: a symbolic link to {elsewhere}, outside OUTPUT"
    if command == "encode":  # refused before anything is written
        refused(encode(sk, o4, tiny_model_dir), says)
    else:  # decode learns output names file by file: those two are reported and skipped
        assert encode(sk, tmp_path / "tok", tiny_model_dir)[0] == 0
        code, stdout, stderr = decode(tmp_path / "tok", o4)
        assert code == 1 and "decoded 4 of 6, 2 failed" in stdout and stderr.count(says) == 2
    assert list(elsewhere.iterdir()) == []


def test_a_manifest_row_through_a_symlink_deletes_nothing_outside(sk, tiny_model_dir, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep.npy").write_bytes(b"precious")
    o6 = tmp_path / "o6"
    assert encode(sk, o6, tiny_model_dir)[0] == 0
    manifest = json.loads((o6 / "manifest.json").read_text())
    manifest["images"].append({**manifest["images"][0], "name": "lnk/keep"})
    (o6 / "manifest.json").write_text(json.dumps(manifest))
    (o6 / "lnk").symlink_to(precious, target_is_directory=True)
    before = tree(o6)
    refused(encode(sk, o6, tiny_model_dir, "--overwrite"), f"{o6 / 'lnk'}: a symbolic link", "outside OUTPUT")
    assert (precious / "keep.npy").read_bytes() == b"precious"
    assert tree(o6) == before  # checked before the first deletion


# ---------------------------------------------------------------- journal


@pytest.mark.slow
def test_overwrite_after_sigkill_ends_as_a_fresh_run(sk, tiny_model_dir, tmp_path):
    """A run killed midway has journalled every file it wrote: a later --overwrite with other
    inputs removes them all."""
    many = tmp_path / "many"
    for i in range(16):
        shutil.copytree(sk, many / f"set{i}")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "optvq_cli", "encode", str(many), str(out), "--model", str(tiny_model_dir)]
    cmd += ["--device", "cpu", "--workers", "0", "--batch-size", "1"]
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
    written = [p for p in out.rglob("*.npy") if TMP_MARK not in p.name]
    assert proc.returncode == -signal.SIGKILL and 5 <= len(written) < 96, f"not interrupted mid-way ({len(written)})"

    assert encode(sk / "gray", out, tiny_model_dir, "--overwrite")[0] == 0
    assert encode(sk / "gray", tmp_path / "fresh", tiny_model_dir)[0] == 0
    assert tree(out) == tree(tmp_path / "fresh")


# ---------------------------------------------------------------- "already done" means the same source


def picture(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 40, 3), np.uint8)).save(path)
    return path


@pytest.mark.parametrize("command", ["encode", "reconstruct"])
def test_a_rerun_redoes_an_output_whose_source_changed(tiny_model_dir, tmp_path, command):
    run = encode if command == "encode" else reconstruct
    suffix, verb = (".npy", "encoded") if command == "encode" else (".png", "reconstructed")
    picture(tmp_path / "A" / "pic.png", 1)
    picture(tmp_path / "B" / "pic.png", 2)
    out = tmp_path / "out"
    assert run(tmp_path / "A", out, tiny_model_dir)[0] == 0
    code, stdout, _ = run(tmp_path / "B", out, tiny_model_dir)  # another folder's pic.png
    assert code == 0 and f"{verb} 1 of 1" in stdout and "already done" not in stdout
    assert run(tmp_path / "B", tmp_path / "fresh", tiny_model_dir)[0] == 0
    assert (out / f"pic{suffix}").read_bytes() == (tmp_path / "fresh" / f"pic{suffix}").read_bytes()

    code, stdout, _ = run(tmp_path / "B", out, tiny_model_dir)
    assert code == 0 and f"{verb} 0 of 1, 1 already done" in stdout
    picture(tmp_path / "B" / "pic.png", 3)  # the same path, new content
    code, stdout, _ = run(tmp_path / "B", out, tiny_model_dir)
    assert code == 0 and f"{verb} 1 of 1" in stdout and "already done" not in stdout
    row = json.loads((out / "manifest.json").read_text())["images"][0]
    st = (tmp_path / "B" / "pic.png").stat()
    assert (row["source_size"], row["source_mtime_ns"]) == (st.st_size, st.st_mtime_ns)


def test_decode_counts_as_done_only_its_own_outputs_of_the_same_token_file(sk, tiny_model_dir, tmp_path):
    tok, out = tmp_path / "tok", tmp_path / "dec"
    assert encode(sk, tok, tiny_model_dir)[0] == 0
    assert decode(tok, out)[0] == 0
    code, stdout, _ = decode(tok, out)
    assert code == 0 and "decoded 0 of 6, 6 already done" in stdout
    assert encode(sk, tok, tiny_model_dir, "--size", "16", "--overwrite")[0] == 0  # new token files
    code, stdout, _ = decode(tok, out)
    assert code == 0 and "decoded 6 of 6" in stdout and "already done" not in stdout
    assert Image.open(out / "p0.png").size == (16, 16)
    shutil.copytree(tok, tmp_path / "tok2")  # the same grids from other files
    code, stdout, _ = decode(tmp_path / "tok2", out)
    assert code == 0 and "decoded 6 of 6" in stdout


# ---------------------------------------------------------------- one run at a time


@pytest.mark.parametrize("command", ["encode", "decode", "reconstruct"])
def test_a_second_run_on_a_locked_output_fails_at_once_naming_the_holder(sk, tiny_model_dir, tmp_path, command):
    import os

    from optvq_cli.core.lock import folder_lock

    assert encode(sk, tmp_path / "tok", tiny_model_dir)[0] == 0
    out = tmp_path / "out"
    gone = tmp_path / "no-such-model"  # refused before the model load: the missing model is not reported
    args = {
        "encode": ["encode", sk, out, *opts(gone)],
        "decode": ["decode", tmp_path / "tok", out, "--device", "cpu", "--model", gone],
        "reconstruct": ["reconstruct", sk, out, *opts(gone)],
    }[command]
    with folder_lock(out):
        began = time.monotonic()
        res = subprocess.run([sys.executable, "-m", "optvq_cli", *map(str, args)], capture_output=True, text=True)
        seconds = time.monotonic() - began
    assert res.returncode == 1 and "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {out}: another optvq run (pid {os.getpid()})"), lines
    assert seconds < 60  # at once: no waiting for the holder
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]


# ---------------------------------------------------------------- messages and flags


def test_an_unwritable_output_names_the_folder_not_a_temporary_file(sk, tiny_model_dir, tmp_path, monkeypatch):
    from optvq_cli.core import fileio

    def denied(src, dst):  # what a read-only folder does to the rename (root may write anywhere)
        raise PermissionError(13, "Permission denied", str(src))

    monkeypatch.setattr(fileio.os, "replace", denied)
    out = tmp_path / "ro"
    out.mkdir()
    for result in (encode(sk, out, tiny_model_dir), reconstruct(sk, tmp_path / "ro2", tiny_model_dir)):
        line = refused(result, "cannot write in this folder (permission denied)")
        assert TMP_MARK not in line and line.startswith(f"error: {tmp_path}/ro")


def test_an_output_below_a_file_names_the_file(sk, tiny_model_dir, tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    for result in (
        encode(sk, tmp_path / "afile" / "sub", tiny_model_dir),
        reconstruct(sk, tmp_path / "afile" / "sub" / "deeper", tiny_model_dir),
    ):
        refused(result, f"error: {tmp_path / 'afile'}: is a file, not a folder")
    refused(encode(sk, tmp_path / "afile", tiny_model_dir), f"{tmp_path / 'afile'}: exists and is not a folder")
    # before the (slow) model load: a missing model is not what is reported
    refused(cli("encode", sk, tmp_path / "afile" / "sub", "--model", tmp_path / "gone"), "is a file, not a folder")


def test_quiet_and_decode_workers(sk, tiny_model_dir, tmp_path):
    code, stdout, stderr = encode(sk, tmp_path / "tok", tiny_model_dir, "-q")
    assert code == 0 and stderr == "" and "encoded 6 of 6" in stdout
    trees = []
    for j in ("0", "3"):
        code, stdout, stderr = decode(tmp_path / "tok", tmp_path / f"dec{j}", "-q", "-j", j)
        assert code == 0 and stderr == "" and "decoded 6 of 6" in stdout
        trees.append({k: v for k, v in tree(tmp_path / f"dec{j}").items() if k.endswith(".png")})
    assert trees[0] == trees[1] and len(trees[0]) == 6


def test_reconstruct_records_each_images_rgb_psnr(sk, tiny_model_dir, tmp_path):
    out = tmp_path / "rec"
    code, stdout, _ = reconstruct(sk, out, tiny_model_dir, "--side-by-side")
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    values = []
    for row in manifest["images"]:
        assert "psnr" not in row
        both = np.asarray(Image.open(out / f"{row['name']}.png")).astype(np.float64)
        original, restored = both[:, :32], both[:, 32:]
        by_hand = 10 * np.log10(255.0**2 / np.mean((original - restored) ** 2))
        assert row["psnr_rgb"] == pytest.approx(by_hand, abs=1e-4)
        values.append(by_hand)
    assert f"mean PSNR (RGB) {np.mean(values):.2f} dB over 6 images" in stdout

    for row in manifest["images"]:  # as an earlier version wrote it
        row["psnr"] = row.pop("psnr_rgb")
    (out / "manifest.json").write_text(json.dumps(manifest))
    code, stdout, _ = reconstruct(sk, out, tiny_model_dir, "--side-by-side")
    assert code == 0 and "reconstructed 0 of 6, 6 already done" in stdout
    rows = json.loads((out / "manifest.json").read_text())["images"]
    assert [r["psnr_rgb"] for r in rows] == pytest.approx(values, abs=1e-4) and all("psnr" not in r for r in rows)


def test_an_output_waiting_to_be_redone_stays_listed_when_the_run_stops(tiny_model_dir, tmp_path, monkeypatch):
    from optvq_cli.tokenize import encode_job

    picture(tmp_path / "A" / "pic.png", 1)
    out = tmp_path / "out"
    assert encode(tmp_path / "A", out, tiny_model_dir)[0] == 0
    picture(tmp_path / "A" / "pic.png", 2)  # changed: the next run redoes pic.npy

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt
        yield

    monkeypatch.setattr(encode_job, "encoded_batches", stopped)
    assert encode(tmp_path / "A", out, tiny_model_dir)[0] == 130
    assert [r["name"] for r in json.loads((out / "manifest.json").read_text())["images"]] == ["pic"]
    monkeypatch.undo()
    code, stdout, stderr = encode(tmp_path / "A", out, tiny_model_dir)
    assert code == 0 and "encoded 1 of 1" in stdout, stderr
