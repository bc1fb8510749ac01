"""`optvq export MODEL OUT` and `optvq info MODEL`: thin wiring over optvq_cli.model.export and the loader."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from pathlib import Path

import typer

from optvq_cli.cli.app import app, fatal
from optvq_cli.core.errors import UserError
from optvq_cli.core.fileio import TMP_MARK

MODEL_HELP = (
    "Model: a folder, a .safetensors file, a bundled name (bundled:NAME where a folder has that name) "
    "or a hub id (ORG/NAME)."
)
PRESET_PREFIX = "preset:"  # `optvq info preset:NAME`: the preset even where a folder has its name


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
    from optvq_cli.model.export import FORMATS

    out: list[str] = []
    for v in values:
        for f in v.split(","):
            f = f.strip().lower()
            if f and f not in FORMATS:
                raise UserError(f"--format {f}: use one of {', '.join(FORMATS)} (repeat --format for several)")
            if f and f not in out:
                out.append(f)
    return out or ["hf"]


def _aside(path: Path, what: str) -> Path:
    """A hidden name beside ``path`` for a folder in transit (same filesystem, so renames are atomic)."""
    return path.parent / f".{path.name}{TMP_MARK}{what}-{os.getpid()}-{secrets.token_hex(4)}"


def check_out(out: Path, force: bool) -> None:
    """Refuse an OUT that cannot or must not be replaced, before any work: the current folder or
    one above it, a file (or a path through one), an existing folder without --overwrite, and,
    even with it, a folder holding anything an export does not write."""
    from optvq_cli.model.export import looks_like_export

    here, target = Path.cwd().resolve(), out.resolve()
    if here == target or target in here.parents:
        raise UserError(f"{out}: OUT is the current folder or contains it; give a new folder for the export")
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{out}: {parent} is a file, not a folder; give another OUT")
    if not (out.exists() or out.is_symlink()):
        return
    if not out.is_dir():
        raise UserError(f"{out} is a file; give a folder path for OUT")
    if not force:
        raise UserError(f"{out} exists; pass --overwrite to replace it")
    if not looks_like_export(out):
        raise UserError(
            f"{out} holds files `optvq export` does not write; refusing to replace it with --overwrite: "
            "give another OUT or remove the folder yourself"
        )


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished folder into place. An old OUT (checked by check_out) is renamed aside and
    deleted only once the new one is there; if the move fails, it is put back."""
    if not (out.exists() or out.is_symlink()):
        tmp.replace(out)
        return
    old = _aside(out, "old")
    out.replace(old)
    try:
        tmp.replace(out)
    except BaseException:
        old.replace(out)
        raise
    if old.is_symlink():
        old.unlink()
    else:
        shutil.rmtree(old)


def _load(model: str, from_upstream: bool, revision: str | None, device: str):
    from optvq_cli.model import convert_upstream, load_model

    if from_upstream:
        if revision is not None:
            raise UserError("--revision does not apply to --from-upstream (a local checkpoint file)")
        return convert_upstream(model)
    return load_model(model, device=device, revision=revision)


@app.command()
def export(
    model: str = typer.Argument(..., help=MODEL_HELP + " With --from-upstream: the authors' checkpoint.pth."),
    out: Path = typer.Argument(
        ..., help="Output folder (created with its parents; an existing one needs --overwrite)."
    ),
    format: list[str] = typer.Option(
        ["hf"],
        "--format",
        "-f",
        help="hf, torchscript, torch-export or onnx; repeat (or comma-separate) for several.",
    ),
    dtype: str | None = typer.Option(
        None,
        "--dtype",
        help="hf weights in fp32, fp16 or bf16 (default: as MODEL stores them; the quantizer stays fp32).",
    ),
    from_upstream: bool = typer.Option(
        False, "--from-upstream", help="MODEL is the authors' training checkpoint ({'model': state_dict})."
    ),
    push_to_hub: str | None = typer.Option(None, "--push-to-hub", metavar="REPO", help="Upload the hf folder."),
    private: bool = typer.Option(False, "--private", help="With --push-to-hub: create the repo private."),
    revision: str | None = typer.Option(None, "--revision", help="Hub revision (branch, tag or commit)."),
    device: str = typer.Option("cpu", "--device", help="auto, cpu, cuda or cuda:N to load on (programs: CPU)."),
    size: str | None = typer.Option(
        None,
        "--input-size",
        "--size",
        help="Example image size for program exports, H or HxW (default: the model's resolution).",
    ),
    force: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists and holds only an earlier export."),
) -> None:
    """Export a model: an inference-only Hugging Face folder and/or standalone programs."""
    try:
        _export(model, out, format, dtype, from_upstream, push_to_hub, private, revision, device, size, force)
    except UserError as e:
        fatal(str(e))


def _export(model, out, format, dtype, from_upstream, push_to_hub, private, revision, device, size, force) -> None:
    from optvq_cli.core.device import resolve_dtype
    from optvq_cli.model.export import export_hf, export_programs

    formats = _formats(format)
    if dtype is not None:
        resolve_dtype(dtype)
        if "hf" not in formats:
            raise UserError("--dtype applies to --format hf (the programs are fp32)")
    if push_to_hub and "hf" not in formats:
        raise UserError("--push-to-hub uploads the hf folder: add --format hf")
    out = Path(out)
    check_out(out, force)
    m = _load(model, from_upstream, revision, device)
    h, w = parse_size(size, m.config.resolution)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _aside(out, "new")
    tmp.mkdir()  # with the usual umask, like every folder a user creates
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
        from optvq_cli.checkpoints.hub import push

        url = push(out, push_to_hub, private=private)
        typer.echo(f"pushed to {url}")


def _describe_preset(name: str):
    from optvq_cli.model.optvq import PRESETS, Provenance, build_model

    if name not in PRESETS:
        raise UserError(f"model {PRESET_PREFIX}{name}: no such preset; presets: {', '.join(PRESETS)}")
    model = build_model(name, device="meta")
    model.provenance = Provenance(source=f"preset:{name} (untrained, no weights)")
    return model


def _model_to_describe(ref: str, revision: str | None, device: str):
    """(model, what it is). A preset only when the reference names nothing else at all: a folder,
    file, bundled or hub model of that name, or an error loading it, wins."""
    from optvq_cli.checkpoints.refs import NotFound, locate
    from optvq_cli.model import load_located
    from optvq_cli.model.optvq import PRESETS

    if ref.startswith(PRESET_PREFIX):
        if revision is not None:
            raise UserError(f"--revision {revision}: only a hub id takes a revision, not {ref}")
        return _describe_preset(ref[len(PRESET_PREFIX) :]), "preset"
    try:
        located = locate(ref, revision)
    except NotFound as e:
        if ref in PRESETS:
            return _describe_preset(ref), "preset"
        raise UserError(f"{e}; nor is it a preset ({', '.join(PRESETS)})") from None
    return load_located(located, device=device), "checkpoint"


@app.command()
def info(
    model: str = typer.Argument(
        ..., help=MODEL_HELP + " A preset name (or preset:NAME) describes the untrained preset."
    ),
    size: str | None = typer.Option(None, "--input-size", "--size", help="Image size for the token grid, H or HxW."),
    revision: str | None = typer.Option(None, "--revision", help="Hub revision (branch, tag or commit)."),
    device: str = typer.Option("cpu", "--device", help="auto, cpu, cuda or cuda:N to load on."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of text."),
) -> None:
    """Describe a model: architecture, token grid, codebook, parameters, provenance."""
    try:
        _info(model, size, revision, device, as_json)
    except UserError as e:
        fatal(str(e))


def _described(m, kind: str, ref: str) -> str:
    from optvq_cli.model.optvq import PRESETS

    if kind == "preset":
        return f"{m.source}; no folder, file or hub model has that name"
    text = f"checkpoint {m.source}"
    if ref in PRESETS:
        text += f" (not the preset {ref}: `optvq info {PRESET_PREFIX}{ref}` describes that)"
    return text


def _info(model: str, size: str | None, revision: str | None, device: str, as_json: bool) -> None:
    from optvq_cli.core.device import resolve_device
    from optvq_cli.model.export import describe

    resolve_device(device)  # a bad --device is an error, for a preset too
    m, kind = _model_to_describe(model, revision, device)
    h, w = parse_size(size, m.config.resolution)
    d = {"described": kind, **describe(m, h, w)}
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
    ph, pw = d["padded_size"]
    grid = f"{h}x{w}"
    if (ph, pw) != (h, w):
        grid += f" (padded to {ph}x{pw}, a multiple of {c.downsample}, as encode does)"
    grid += f" -> {heads} heads x {gh} x {gw} = {d['tokens_per_image']} tokens"
    p = d["parameters"]
    rows = [
        ("model", _described(m, kind, model)),
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
    # provenance: where the file was found, how it stores its weights, and all it says of its making
    rows += [("source", m.source or "-"), ("weights dtype", m.weights_dtype)]
    rows += [(key.replace("_", " "), str(value)) for key, value in m.metadata.items()]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        typer.echo(f"{k:<{width}}  {v}")
