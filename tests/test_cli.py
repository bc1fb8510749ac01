"""The command line's own behaviour: one-line usage errors, plain help, library errors as one line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

OPTVQ = [sys.executable, "-m", "optvq_cli"]


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*OPTVQ, *args], capture_output=True, text=True, env={**os.environ, **(env or {})})


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["encode"], "Missing argument 'input'"),
        (["encode", "a", "b", "--bogus"], "No such option: --bogus"),
        (["toy", "--steps", "0"], "--steps"),
        (["nosuchcommand"], "No such command"),
    ],
)
def test_usage_mistakes_are_one_line(args, says):
    res = _run(*args)
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error:") and says in lines[0]
    assert "--help" in lines[0] and "╭" not in res.stderr and "Traceback" not in res.stderr


def test_flags_show_no_value_placeholder():
    res = _run("toy", "--help")
    assert res.returncode == 0
    gif = next(ln for ln in res.stdout.splitlines() if "--gif" in ln)
    assert "<bool>" not in res.stdout and "BOOLEAN" not in gif
    steps = next(ln for ln in res.stdout.splitlines() if "--steps" in ln)
    assert "int" in steps.lower()  # options that take a value still say what kind


def test_library_error_is_one_line_and_debug_shows_the_traceback(tmp_path):
    missing = tmp_path / "nothing-here.jpg"
    res = _run("encode", str(missing), str(tmp_path / "out"))
    assert res.returncode == 1
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("error:") and str(missing) in res.stderr
    debug = _run("encode", str(missing), str(tmp_path / "out"), env={"OPTVQ_DEBUG": "1"})
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_no_arguments_prints_help():
    res = _run()
    assert "Usage: optvq" in res.stdout + res.stderr
    assert "Traceback" not in res.stderr


def test_pillow_warnings_are_one_line_naming_the_file(tmp_path):
    """A decompression-bomb size (Pillow's limit lowered to 3,000 pixels here) is read, with one
    `warning:` line naming the file instead of Python's two-line warning with source."""
    import subprocess
    import sys

    from PIL import Image

    (tmp_path / "in").mkdir()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "in" / "wide.png")
    code = (
        "import sys, PIL.Image as I; I.MAX_IMAGE_PIXELS = 3000; from optvq_cli.cli import main; "
        f"sys.argv = ['optvq', 'encode', {str(tmp_path / 'in')!r}, {str(tmp_path / 'out')!r}, '-q']; main()"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    lines = [line for line in res.stderr.splitlines() if "wide.png" in line]
    assert lines and all(line.startswith("warning: ") and "pixels" in line for line in lines)
    assert "warnings.warn" not in res.stderr and "DecompressionBombWarning" not in res.stderr


@pytest.mark.slow
def test_a_batch_too_large_for_memory_is_one_line_before_it_runs(tmp_path):
    """12000 x 12000 through the default model needs far more than this machine's memory: refused
    from the model's estimate, naming the flags to lower, instead of a traceback or a swapped-out machine."""
    import subprocess
    import sys

    from PIL import Image

    Image.new("RGB", (96, 64), (10, 200, 30)).save(tmp_path / "apple.png")
    args = [sys.executable, "-m", "optvq_cli", "reconstruct", str(tmp_path / "apple.png"), str(tmp_path / "o")]
    res = subprocess.run([*args, "--size", "12000", "-q"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: a batch of 1 image(s) of 12000x12000 needs about") and "--size" in last


def test_encode_compile_compiles_the_encoder(tmp_path, tiny_model_dir, monkeypatch):
    """--compile hands the loaded model's encoder to core.device.compile_module (compiling itself is
    tested in test_gpu; inductor on a CPU takes minutes)."""
    from PIL import Image
    from typer.testing import CliRunner

    from optvq_cli.cli import app
    from optvq_cli.core import device

    seen = []
    monkeypatch.setattr(device, "compile_module", lambda module, enabled, backend="inductor": seen.append(module))
    Image.new("RGB", (40, 32), (10, 20, 30)).save(tmp_path / "a.png")
    args = ["encode", str(tmp_path / "a.png"), str(tmp_path / "t"), "--model", str(tiny_model_dir), "--compile", "-q"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert len(seen) == 1 and type(seen[0]).__name__.endswith("Encoder")
