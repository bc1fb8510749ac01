"""`optvq export MODEL OUT` and `optvq info MODEL`: thin wiring over optvq_cli.export and the loader."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import typer

from ..errors import UserError
from .app import app, fatal

MODEL_HELP = "Model: a folder, a .safetensors file, a bundled name or a hub id (ORG/NAME)."


def parse_size(text: str | None, default: int) -> tuple[int, int]:
    """``--size``: ``256`` or ``256x192`` (height x width)."""
    if text is None:
        return default, default
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX,]\s*(\d+))?\s*", text)
    if not m or int(m.group(1)) == 0 or (m.group(2) is not None and int(m.group(2)) == 0):
        raise UserError(f"--size {text}: give a positive size like 256 or 256x192 (height x width)")
    h = int(m.group(1))
    return h, int(m.group(2) or h)


def _formats(values: list[str]) -> list[str]:
    from ..export import FORMATS

    out: list[str] = []
    for v in values:
        for f in v.split(","):
            f = f.strip().lower()
            if f and f not in FORMATS:
                raise UserError(f"--format {f}: use one of {', '.join(FORMATS)} (repeat --format for several)")
            if f and f not in out:
                out.append(f)
    return out or ["hf"]


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished folder into place; an old one (with --force) goes only once the new one is there."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        out.replace(old / out.name)
    tmp.replace(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _load(model: str, from_upstream: bool, revision: str | None, device: str):
    from ..model.checkpoint import convert_upstream, load_model

    if from_upstream:
        if revision is not None:
            raise UserError("--revision does not apply to --from-upstream (a local checkpoint file)")
        return convert_upstream(model)
    return load_model(model, device=device, revision=revision)


@app.command()
def export(
    model: str = typer.Argument(..., help=MODEL_HELP + " With --from-upstream: the authors' checkpoint.pth."),
    out: Path = typer.Argument(..., help="Output folder (created; refused if it exists unless --overwrite)."),
    format: list[str] = typer.Option(
        ["hf"],
        "--format",
        "-f",
        help="hf, torchscript, torch-export or onnx; repeat (or comma-separate) for several.",
    ),
    dtype: str | None = typer.Option(None, "--dtype", help="hf weights in fp16 or bf16 (the quantizer stays fp32)."),
    from_upstream: bool = typer.Option(
        False, "--from-upstream", help="MODEL is the authors' training checkpoint ({'model': state_dict})."
    ),
    push_to_hub: str | None = typer.Option(None, "--push-to-hub", metavar="REPO", help="Upload the hf folder."),
    private: bool = typer.Option(False, "--private", help="With --push-to-hub: create the repo private."),
    revision: str | None = typer.Option(None, "--revision", help="Hub revision (branch, tag or commit)."),
    device: str = typer.Option("cpu", "--device", help="auto, cpu, cuda or cuda:N to load on (programs: CPU)."),
    size: str | None = typer.Option(
        None,
        "--size",
        help="Example image size for program exports, H or HxW (default: the model's resolution).",
    ),
    force: bool = typer.Option(False, "--overwrite", "--force", help="Replace OUT if it exists."),
) -> None:
    """Export a model: an inference-only Hugging Face folder and/or standalone programs."""
    try:
        _export(model, out, format, dtype, from_upstream, push_to_hub, private, revision, device, size, force)
    except UserError as e:
        fatal(str(e))


def _export(model, out, format, dtype, from_upstream, push_to_hub, private, revision, device, size, force) -> None:
    from ..device import resolve_dtype
    from ..export import export_hf, export_programs

    formats = _formats(format)
    if dtype is not None:
        resolve_dtype(dtype)
        if "hf" not in formats:
            raise UserError("--dtype applies to --format hf (the programs are fp32)")
    if push_to_hub and "hf" not in formats:
        raise UserError("--push-to-hub uploads the hf folder: add --format hf")
    out = Path(out)
    if out.exists() and not force:
        raise UserError(f"{out} exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; give a folder path")
    m = _load(model, from_upstream, revision, device)
    h, w = parse_size(size, m.config.resolution)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    lines = []
    try:
        if "hf" in formats:
            export_hf(m, tmp, dtype=dtype)
            doc = json.loads((tmp / "config.json").read_text())
            lines.append(f"hf: config.json, model.safetensors ({doc['weights_dtype']}), README.md")
            lines.append(f"sha256: {doc['weights_sha256']}")
        for fmt in formats:
            if fmt == "hf":
                continue
            for check in export_programs(m, tmp, fmt, h, w):
                lines.append(f"{fmt}: {check.line()}")
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    typer.echo(f"wrote {out}/ from {m.source}")
    for line in lines:
        typer.echo(f"  {line}")
    if push_to_hub:
        from ..hub import push

        url = push(out, push_to_hub, private=private)
        typer.echo(f"pushed to {url}")


def _describe_preset(name: str):
    from ..model.optvq import PRESETS, build_model

    if name not in PRESETS:
        return None
    model = build_model(name, device="meta")
    model.source = f"preset:{name} (untrained, no weights)"
    return model


@app.command()
def info(
    model: str = typer.Argument(..., help=MODEL_HELP + " A preset name describes the untrained preset."),
    size: str | None = typer.Option(None, "--size", help="Image size for the token grid, H or HxW."),
    revision: str | None = typer.Option(None, "--revision", help="Hub revision (branch, tag or commit)."),
    device: str = typer.Option("cpu", "--device", help="auto, cpu, cuda or cuda:N to load on."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of text."),
) -> None:
    """Describe a model: architecture, token grid, codebook, parameters, provenance."""
    try:
        _info(model, size, revision, device, as_json)
    except UserError as e:
        fatal(str(e))


def _info(model: str, size: str | None, revision: str | None, device: str, as_json: bool) -> None:
    from ..export import describe
    from ..model.checkpoint import load_model

    try:
        m = load_model(model, device=device, revision=revision)
    except UserError:
        m = None if Path(model).exists() else _describe_preset(model)
        if m is None:
            raise
    h, w = parse_size(size, m.config.resolution)
    d = describe(m, h, w)
    if as_json:
        typer.echo(json.dumps(d, indent=2, default=str))
        return
    c = m.config
    if c.arch == "vqgan":
        detail = (
            f"ch {c.ch}, ch_mult {list(c.ch_mult)}, {c.num_res_blocks} res blocks, "
            f"attention at {list(c.attn_resolutions)}, z_channels {c.z_channels}"
        )
    else:
        detail = f"widths {list(c.cnn_widths)}"
    heads, gh, gw = d["token_grid"]
    grid = f"{h}x{w} -> {heads} heads x {gh} x {gw} = {d['tokens_per_image']} tokens"
    if not d["size_ok"]:
        grid += f" (not a multiple of {c.downsample}: images must be resized or cropped)"
    p = d["parameters"]
    rows = [
        ("source", m.source),
        ("sha256", m.sha256 or "-"),
        ("architecture", f"{c.arch} ({detail})"),
        ("downsampling", f"f = {c.downsample}"),
        ("token grid", grid),
        ("heads", str(c.heads)),
        (
            "codebook",
            f"{c.n_codes} codes x {c.code_dim} dims (e_dim {c.e_dim}), {d['bits_per_token']} bits/token",
        ),
        ("quantizer", f"epsilon {c.epsilon}, {c.n_iters} Sinkhorn iterations, projection {c.use_proj}"),
        ("parameters", ", ".join(f"{k} {v:,}" for k, v in p.items())),
    ]
    if m.ignored_keys:
        rows.append(("ignored", f"{len(m.ignored_keys)} tensors in the file the model does not use"))
    for key in ("converted_from", "exported_from", "checkpoint_format"):
        if key in m.metadata:
            rows.append((key.replace("_", " "), str(m.metadata[key])))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        typer.echo(f"{k:<{width}}  {v}")
