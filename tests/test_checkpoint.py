"""Checkpoints: the native folder, every way to name a model, the authors' formats, and bad files."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from optvq_cli.checkpoints import files, refs
from optvq_cli.core.errors import UserError
from optvq_cli.model import PRESETS, OptVQModel, build_model, convert_upstream, load_model, save_model
from optvq_cli.model import checkpoint as ckpt
from optvq_cli.quant.assign import sinkhorn_assign_plain

DATA = Path(__file__).parent / "data" / "upstream"
COMMIT = hashlib.sha1(b"optvq test snapshot").hexdigest()


def read_key_list(name: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """key -> (shape, dtype) of every tensor in the authors' file."""
    out = {}
    for line in (DATA / name).read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape, dtype, in_file, _ = line.split("\t")
        if in_file == "yes":
            out[key] = (tuple(int(s) for s in shape.strip("()").split(",") if s), dtype)
    return out


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def images(n: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(n, 3, size // 4, size // 4, generator=g) * 2 - 1
    return F.interpolate(small, size=(size, size), mode="bilinear", align_corners=False)


@pytest.fixture
def tiny_dir(tmp_path) -> Path:
    torch.manual_seed(0)
    return save_model(build_model("tiny"), tmp_path / "tiny", metadata={"dataset": "unit-test"})


def one_line_error(excinfo, *needles: str) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and msg
    for n in needles:
        assert n in msg, msg
    return msg


# -- the native format ---------------------------------------------------------------------------
def test_save_load_round_trip(tiny_dir):
    doc = json.loads((tiny_dir / "config.json").read_text())
    assert doc["weights_sha256"] == file_sha256(tiny_dir / "model.safetensors")
    assert doc["model"] == PRESETS["tiny"].to_dict()
    torch.manual_seed(0)
    original = build_model("tiny").eval()
    model = load_model(str(tiny_dir), device="cpu")
    assert not model.training and model.config == original.config
    for k, v in original.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    x = images()
    assert torch.equal(model.encode_indices(x), original.encode_indices(x))
    assert model.source == str(tiny_dir.resolve())
    assert model.sha256 == file_sha256(tiny_dir / "model.safetensors")
    assert model.metadata["dataset"] == "unit-test"
    # no temp files left behind
    assert sorted(p.name for p in tiny_dir.iterdir()) == ["config.json", "model.safetensors"]


def test_safetensors_file_carries_its_config(tiny_dir, tmp_path):
    alone = tmp_path / "elsewhere" / "my-model.safetensors"
    alone.parent.mkdir()
    shutil.copy(tiny_dir / "model.safetensors", alone)
    model = load_model(str(alone), device="cpu")
    assert model.config == PRESETS["tiny"] and model.source == str(alone.resolve())
    # the free-form metadata lives in config.json only: it must not change the weights' bytes
    assert "dataset" not in model.metadata


SAVE_IN_ANOTHER_PROCESS = """
import sys, torch
from optvq_cli.model import build_model, save_model
torch.manual_seed(0)
save_model(build_model("tiny"), sys.argv[1], metadata={"dataset": "another", "steps": 7, "z": 1, "a": 2})
"""


def test_identity_is_reproducible_across_saves_and_processes(tiny_dir, tmp_path):
    """The same model saved twice, in two processes and with other metadata, is the same file,
    so the same identity; the header holds one metadata key, a sorted JSON string."""
    import subprocess
    import sys

    other = tmp_path / "other-process"
    subprocess.run([sys.executable, "-c", SAVE_IN_ANOTHER_PROCESS, str(other)], check=True, timeout=120)
    a, b = tiny_dir / "model.safetensors", other / "model.safetensors"
    assert a.read_bytes() == b.read_bytes()
    assert load_model(tiny_dir, device="cpu").sha256 == load_model(other, device="cpu").sha256 == file_sha256(a)
    assert json.loads((other / "config.json").read_text())["metadata"]["dataset"] == "another"
    from safetensors import safe_open

    with safe_open(str(a), "pt") as f:
        meta = f.metadata()
    assert list(meta) == [files.META_KEY]
    stored = json.loads(meta[files.META_KEY])
    assert stored == {"optvq_format": 1, "model": PRESETS["tiny"].to_dict()}
    assert meta[files.META_KEY] == json.dumps(stored, sort_keys=True)


def test_files_written_by_earlier_versions_still_load(tmp_path):
    """Earlier saves: "format" + config + metadata as three header keys (in a random order)."""
    path = tmp_path / "old.safetensors"
    meta = {
        "format": "pt",
        files.META_CONFIG: json.dumps(PRESETS["tiny"].to_dict()),
        files.META_METADATA: json.dumps({"dataset": "old"}),
    }
    save_file(_tiny_tensors(), str(path), metadata=meta)
    model = load_model(path, device="cpu")
    assert model.config == PRESETS["tiny"] and model.metadata["dataset"] == "old"
    assert model.sha256 == file_sha256(path)


def test_half_precision_weights_keep_quantizer_fp32(tmp_path):
    torch.manual_seed(0)
    model = build_model("tiny")
    out = save_model(model, tmp_path / "half", dtype="fp16")
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        dtypes = {k: f.get_tensor(k).dtype for k in f.keys()}
    assert dtypes["encoder.in_fc.weight"] == torch.float16
    assert dtypes["quantize.embedding.weight"] == torch.float32
    loaded = load_model(out, device="cpu")
    assert loaded.encoder.in_fc.weight.dtype == torch.float32
    assert torch.equal(loaded.quantize.embedding.weight, model.quantize.embedding.weight)
    torch.testing.assert_close(loaded.encoder.in_fc.weight, model.encoder.in_fc.weight, atol=1e-3, rtol=1e-3)


def test_bundled_name(tiny_dir, tmp_path, monkeypatch):
    root = tmp_path / "bundled"
    shutil.copytree(tiny_dir, root / "tiny-test")
    monkeypatch.setattr(refs, "BUNDLED_DIRS", [tmp_path / "missing", root])
    model = load_model("tiny-test", device="cpu")
    assert model.source == "bundled:tiny-test" and model.config == PRESETS["tiny"]
    assert refs.bundled_names() == ["tiny-test"]
    with pytest.raises(UserError) as e:
        load_model("nonexistent-name", device="cpu")
    one_line_error(e, "nonexistent-name", "tiny-test")


# -- the hub, from a cache laid out as huggingface_hub lays it out -------------------------------
def lay_out_hub_cache(cache: Path, repo_id: str, folder: Path, refs=("main",), commit: str = COMMIT) -> Path:
    """models--ORG--NAME/{blobs/<sha256>, snapshots/<commit>/<file> -> ../../blobs/<sha256>, refs/<ref>}."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    for f in folder.iterdir():
        digest = file_sha256(f)
        shutil.copy(f, repo / "blobs" / digest)
        os.symlink(Path("..") / ".." / "blobs" / digest, snap / f.name)
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture
def offline_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hf-home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_hub_id_loads_from_cache_offline(tiny_dir, offline_cache, monkeypatch):
    snap = lay_out_hub_cache(offline_cache, "someone/optvq-tiny", tiny_dir, refs=("main", "v1"))
    assert (snap / "model.safetensors").is_symlink()
    monkeypatch.chdir(offline_cache)  # so "someone/optvq-tiny" is no local path
    model = load_model("someone/optvq-tiny", device="cpu")
    assert model.source == f"hub:someone/optvq-tiny@{COMMIT}"
    assert model.sha256 == file_sha256(tiny_dir / "model.safetensors")
    assert load_model("someone/optvq-tiny", device="cpu", revision="v1").config == PRESETS["tiny"]
    assert load_model("someone/optvq-tiny", device="cpu", revision=COMMIT).source.endswith(COMMIT)
    # HF_HUB_CACHE wins over HF_HOME
    monkeypatch.setenv("HF_HUB_CACHE", str(offline_cache))
    monkeypatch.setenv("HF_HOME", "/nonexistent")
    assert load_model("someone/optvq-tiny", device="cpu").config == PRESETS["tiny"]


def test_uncached_hub_id_offline_is_one_line(offline_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as e:
        load_model("BorelTHU/optvq-16x16x4", device="cpu")
    one_line_error(e, "BorelTHU/optvq-16x16x4", "HF_HUB_OFFLINE", "not in the huggingface cache")
    with pytest.raises(UserError) as e:
        load_model("BorelTHU/optvq-16x16x4", device="cpu", revision="v9")
    one_line_error(e, "revision v9")


def test_revision_needs_a_hub_id(tiny_dir):
    with pytest.raises(UserError) as e:
        load_model(str(tiny_dir), device="cpu", revision="main")
    one_line_error(e, "--revision")


# -- the authors' hub format ---------------------------------------------------------------------
def upstream_tiny_config() -> dict:
    """The authors' config.json (the real one, from the fixture) with tiny-vqgan sizes."""
    raw = json.loads((DATA / "config_f16_h4.json").read_text())
    small = dict(
        ch=32,
        ch_mult=[1, 2],
        num_res_blocks=1,
        attn_resolutions=[8],
        resolution=16,
        z_channels=32,
        in_channels=3,
    )
    raw["encoder"].update(small)
    raw["decoder"].update(small)
    raw["quantize"].update(n_e=64, e_dim=16, num_head=2)
    return raw


def write_upstream_tiny(folder: Path, seed: int = 0, with_loss: bool = True) -> dict[str, torch.Tensor]:
    """A checkpoint in the authors' hub format: their config.json, ``model.``-prefixed tensors of
    random values, and (optionally) their training-only ``model.loss.*`` tensors by name."""
    g = torch.Generator().manual_seed(seed)
    skeleton = build_model(PRESETS["tiny-vqgan"], device="meta").state_dict()
    tensors = {"model." + k: torch.randn(v.shape, generator=g) * 0.2 for k, v in skeleton.items()}
    if with_loss:
        for key, (_, dtype) in read_key_list("keys_f16_h4.txt").items():
            if key.startswith("model.loss."):
                tensors[key] = torch.zeros(2, dtype=getattr(torch, dtype))
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(upstream_tiny_config(), indent=2, sort_keys=True))
    return tensors


def test_authors_config_maps_to_the_presets():
    for name, preset in (
        ("config_f16_h4.json", "imagenet-f16-h4"),
        ("config_f16_h8.json", "imagenet-f16-h8"),
    ):
        parsed = ckpt.parse_config(json.loads((DATA / name).read_text()), name)
        assert parsed.kind == "upstream"
        assert parsed.config == PRESETS[preset]


def test_authors_full_file_plan_from_key_list():
    """The published 4-head file as the key list describes it: every model tensor found with the
    right shape, and exactly the loss tensors left over."""
    file_shapes = {k: s for k, (s, _) in read_key_list("keys_f16_h4.txt").items()}
    _, expected = ckpt._expected_shapes(OptVQModel, PRESETS["imagenet-f16-h4"], device="meta")
    plan = files.plan_keys(file_shapes, expected, "model.safetensors", "imagenet-f16-h4")
    assert sorted(plan.ignored) == sorted(k for k in file_shapes if k.startswith("model.loss."))
    assert len(plan.sources) == len(expected) == sum(not k.startswith("model.loss.") for k in file_shapes)


def test_authors_format_loads_and_gives_their_indices(tmp_path, caplog):
    folder = tmp_path / "upstream"
    tensors = write_upstream_tiny(folder)
    with caplog.at_level(logging.WARNING, logger="optvq"):
        model = load_model(str(folder), device="cpu")
    n_loss = sum(k.startswith("model.loss.") for k in tensors)
    assert n_loss > 50
    assert sorted(model.ignored_keys) == sorted(k for k in tensors if k.startswith("model.loss."))
    assert f"ignored {n_loss} training-only" in caplog.text
    assert model.metadata["checkpoint_format"] == "upstream"
    assert model.sha256 == file_sha256(folder / "model.safetensors")  # their identity: the file's sha256
    assert model.config.heads == 2 and model.config.n_codes == 64 and model.config.epsilon == 10
    for k, v in model.state_dict().items():
        assert torch.equal(v, tensors["model." + k]), k

    # Their quantizer: z = quant_conv(encoder(x)); every head chunk of every position of every image
    # is one row of a single pool, assigned by the plain Sinkhorn formulation against
    # proj(embedding). Computed here from the raw tensors.
    x = images(3, 16)
    with torch.no_grad():
        h = model.encoder(x)
        z = F.conv2d(h, tensors["model.quant_conv.weight"], tensors["model.quant_conv.bias"])
    codes = tensors["model.quantize.embedding.weight"] @ tensors["model.quantize.proj.weight"].t()
    codes = codes + tensors["model.quantize.proj.bias"]
    b, e, hh, ww = z.shape
    d = e // 2
    pool = torch.stack(
        [z[n, k * d : (k + 1) * d, i, j] for n in range(b) for i in range(hh) for j in range(ww) for k in range(2)]
    )
    want = sinkhorn_assign_plain(pool, codes, 10.0, 5).reshape(b, hh, ww, 2).permute(0, 3, 1, 2)
    got = model.encode_indices(x, assign="sinkhorn")
    assert got.shape == (3, 2, 8, 8) and got.dtype == torch.int64
    assert torch.equal(got, want)
    near = torch.cdist(pool, codes).argmin(1).reshape(b, hh, ww, 2).permute(0, 3, 1, 2)
    assert torch.equal(model.encode_indices(x, assign="nearest"), near)


def test_authors_format_from_the_hub_cache(tmp_path, offline_cache, monkeypatch):
    folder = tmp_path / "upstream"
    write_upstream_tiny(folder, with_loss=False)
    lay_out_hub_cache(offline_cache, "BorelTHU/optvq-16x16x4", folder)
    monkeypatch.chdir(tmp_path / "hf-home")
    model = load_model("BorelTHU/optvq-16x16x4", device="cpu")
    assert model.ignored_keys == [] and model.source.startswith("hub:BorelTHU/optvq-16x16x4@")


def test_authors_weights_file_named_directly_uses_config_beside_it(tmp_path):
    folder = tmp_path / "upstream"
    write_upstream_tiny(folder, with_loss=False)
    model = load_model(str(folder / "model.safetensors"), device="cpu")
    assert model.metadata["checkpoint_format"] == "upstream"
    (folder / "config.json").unlink()
    with pytest.raises(UserError) as e:
        load_model(str(folder / "model.safetensors"), device="cpu")
    one_line_error(e, "no model config", "--from-upstream")


def test_export_of_authors_model_is_inference_only(tmp_path):
    from optvq_cli.model.export import export_hf

    folder = tmp_path / "upstream"
    write_upstream_tiny(folder)
    model = load_model(str(folder), device="cpu")
    out = export_hf(model, tmp_path / "export")
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert keys == set(build_model("tiny-vqgan", device="meta").state_dict())
    doc = json.loads((out / "config.json").read_text())
    assert doc["metadata"]["source_sha256"] == file_sha256(folder / "model.safetensors")
    assert doc["metadata"]["upstream_config"]["quantize"]["n_e"] == 64
    again = load_model(str(out), device="cpu")
    x = images(2, 16)
    assert torch.equal(again.encode_indices(x, assign="sinkhorn"), model.encode_indices(x, assign="sinkhorn"))


# -- the authors' training checkpoints -----------------------------------------------------------
def test_convert_vqgan_training_checkpoint(tmp_path):
    g = torch.Generator().manual_seed(3)
    skeleton = build_model("tiny-vqgan", device="meta").state_dict()
    sd = {"_orig_mod." + k: torch.randn(v.shape, generator=g) * 0.2 for k, v in skeleton.items()}
    sd["_orig_mod.loss.discriminator.main.0.weight"] = torch.zeros(4)
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": sd, "optimizer": {"lr": 1e-4}, "epoch": 3}, path)
    model = convert_upstream(path)
    cfg = model.config
    want = PRESETS["tiny-vqgan"]
    assert (cfg.arch, cfg.ch, cfg.ch_mult, cfg.num_res_blocks, cfg.z_channels) == (
        want.arch,
        want.ch,
        want.ch_mult,
        want.num_res_blocks,
        want.z_channels,
    )
    assert (cfg.n_codes, cfg.e_dim, cfg.heads) == (want.n_codes, want.e_dim, want.heads)
    # attention sits at the same level (level 1) as in the original
    assert set(model.state_dict()) == set(skeleton)
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd["_orig_mod." + k])
    assert model.ignored_keys == ["_orig_mod.loss.discriminator.main.0.weight"]
    assert model.metadata["converted_from_sha256"] == file_sha256(path)


def test_convert_plain_cnn_training_checkpoint_from_key_list(tmp_path):
    keys = read_key_list("keys_mnist.txt")
    g = torch.Generator().manual_seed(4)
    sd = {k: torch.randn(s, generator=g) for k, (s, _) in keys.items() if not k.startswith("loss.")}
    sd["loss.perceptual_loss.lin0.model.1.weight"] = torch.zeros(1, 64, 1, 1)
    torch.save({"model": sd}, tmp_path / "checkpoint.pth")
    model = convert_upstream(tmp_path / "checkpoint.pth")
    m = PRESETS["mnist"]
    assert (model.config.arch, model.config.in_channels, model.config.cnn_widths) == (
        "plain_cnn",
        1,
        (16, 16, 32),
    )
    assert (model.config.n_codes, model.config.e_dim, model.config.heads) == (m.n_codes, m.e_dim, m.heads)
    assert torch.equal(model.quantize.embedding.weight, sd["quantize.embedding.weight"])
    assert model.config == m  # the whole MNIST preset, resolution 32 (Sec. 4.2) included


def test_convert_refuses_arbitrary_pickles(tmp_path):
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": {"encoder.x": torch.zeros(1)}, "cfg": Path("/etc")}, path)  # a non-tensor object
    with pytest.raises(UserError) as e:
        convert_upstream(path)
    one_line_error(e, "checkpoint.pth", "refused")


# -- bad checkpoints: one clear line each --------------------------------------------------------
def _tiny_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in build_model("tiny").state_dict().items()}


def _write_with_config(path: Path, tensors: dict, cfg: dict) -> Path:
    meta = {"format": "pt", files.META_CONFIG: json.dumps(cfg)}
    save_file(tensors, str(path), metadata=meta)
    return path


def test_missing_keys(tmp_path):
    t = _tiny_tensors()
    del t["decoder.out_fc.weight"]
    path = _write_with_config(tmp_path / "m.safetensors", t, PRESETS["tiny"].to_dict())
    with pytest.raises(UserError) as e:
        load_model(str(path), device="cpu")
    one_line_error(e, "m.safetensors", "missing", "decoder.out_fc.weight")


def test_wrong_shapes_config_not_matching_tensors(tmp_path):
    path = _write_with_config(
        tmp_path / "m.safetensors", _tiny_tensors(), PRESETS["tiny"].replace(n_codes=128).to_dict()
    )
    with pytest.raises(UserError) as e:
        load_model(str(path), device="cpu")
    one_line_error(e, "quantize.embedding.weight", "(64, 4)", "(128, 4)", "does not match")


def test_config_json_not_matching_tensors(tiny_dir):
    doc = json.loads((tiny_dir / "config.json").read_text())
    doc["model"]["heads"] = 4
    (tiny_dir / "config.json").write_text(json.dumps(doc))
    with pytest.raises(UserError) as e:
        load_model(str(tiny_dir), device="cpu")
    one_line_error(e, "does not match")


def test_truncated_file(tiny_dir):
    w = tiny_dir / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) - 100])
    with pytest.raises(UserError) as e:
        load_model(str(tiny_dir), device="cpu")
    one_line_error(e, "model.safetensors", "truncated")
    w.write_bytes(data[:5])
    with pytest.raises(UserError) as e:
        load_model(str(w), device="cpu")
    one_line_error(e, "truncated")


def test_pickle_renamed_safetensors(tmp_path):
    path = tmp_path / "model.safetensors"
    tensors = _tiny_tensors()
    torch.save({"model": tensors}, path)
    with pytest.raises(UserError) as e:
        load_model(str(path), device="cpu")
    msg = one_line_error(e, "pickle", "--from-upstream")
    # the advice works: the converter tells the file by its content, not its name
    assert f"optvq export --from-upstream {path} OUT" in msg
    model = convert_upstream(path)
    assert model.config == PRESETS["tiny"].replace(resolution=32)
    for k, v in model.state_dict().items():
        assert torch.equal(v, tensors[k]), k


def test_folder_without_weights(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError) as e:
        load_model(str(tmp_path / "empty"), device="cpu")
    one_line_error(e, "no model weights")
    (tmp_path / "empty" / "checkpoint.pth").write_bytes(b"x")
    with pytest.raises(UserError) as e:
        load_model(str(tmp_path / "empty"), device="cpu")
    one_line_error(e, "checkpoint.pth", "--from-upstream")


def test_bad_config_json_and_missing_config(tiny_dir, tmp_path):
    (tiny_dir / "config.json").write_text("{not json")
    with pytest.raises(UserError) as e:
        load_model(str(tiny_dir), device="cpu")
    one_line_error(e, "config.json", "not valid JSON")
    bare = tmp_path / "bare.safetensors"
    save_file(_tiny_tensors(), str(bare))
    with pytest.raises(UserError) as e:
        load_model(str(bare), device="cpu")
    one_line_error(e, "no model config")


def _refuse_building(monkeypatch):
    """Make building any model an error: a check that must come first is then proven to."""

    def no_build(*a, **k):
        raise AssertionError("the model was built before the config was checked against the file")

    monkeypatch.setattr(ckpt, "_expected_shapes", no_build)  # where the loader builds the model


def test_oversized_config_is_refused_before_building(tiny_dir, monkeypatch):
    doc = json.loads((tiny_dir / "config.json").read_text())
    doc["model"]["n_codes"] = 16_000_000  # would be a 256 MB codebook (2e9, 32 GB, is out of range)
    (tiny_dir / "config.json").write_text(json.dumps(doc))
    _refuse_building(monkeypatch)
    with pytest.raises(UserError) as e:
        load_model(str(tiny_dir), device="cpu")
    one_line_error(e, "quantize.embedding.weight", "(64, 4)", "(16000000, 4)", "does not match")


@pytest.mark.parametrize(
    "change,needles",
    [
        ({"ch": 4096}, ("encoder.conv_in.weight", "does not match")),
        ({"num_res_blocks": 60}, ("encoder.down.0.block.59.conv2.weight", "missing")),
        ({"ch_mult": [1, 2, 2, 2, 2, 2]}, ("encoder.down.2.block.0.conv1.weight", "missing")),
        ({"z_channels": 1 << 14}, ("(16, 16384, 1, 1)", "does not match")),
    ],
)
def test_vqgan_sizes_are_checked_against_the_header(tmp_path, monkeypatch, change, needles):
    folder = tmp_path / "upstream"
    write_upstream_tiny(folder, with_loss=False)
    raw = json.loads((folder / "config.json").read_text())
    cfg = ckpt.parse_config(raw, "x").config.to_dict()
    cfg.update(change)
    cfg["resolution"] = 256  # fits every ch_mult above; attention placement is not in question here
    cfg["attn_resolutions"] = []
    (folder / "config.json").write_text(json.dumps({"optvq_format": 1, "model": cfg}))
    _refuse_building(monkeypatch)
    with pytest.raises(UserError) as e:
        load_model(folder, device="cpu")
    one_line_error(e, "model.safetensors", *needles)


@pytest.mark.parametrize(
    "field,value,needle",
    [("e_dim", 0, "e_dim=0"), ("epsilon", 0, "epsilon=0"), ("n_iters", 0, "n_iters=0"), ("heads", "2", "heads")],
)
def test_bad_config_values_are_one_line(tiny_dir, field, value, needle):
    doc = json.loads((tiny_dir / "config.json").read_text())
    doc["model"][field] = value
    (tiny_dir / "config.json").write_text(json.dumps(doc))
    with pytest.raises(UserError) as e:
        load_model(str(tiny_dir), device="cpu")
    one_line_error(e, "config.json", "bad model config", needle)


def test_weights_replaced_after_export(tiny_dir):
    save_file(_tiny_tensors(seed=9), str(tiny_dir / "model.safetensors"))
    with pytest.raises(UserError) as e:
        load_model(str(tiny_dir), device="cpu")
    one_line_error(e, "sha256", "corrupted or replaced")


def test_pickled_file_reference_points_to_converter(tmp_path):
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": {}}, path)
    with pytest.raises(UserError) as e:
        load_model(str(path), device="cpu")
    one_line_error(e, "never loaded as is", "--from-upstream")


# -- the Python API: from_pretrained / save_pretrained / push_to_hub -----------------------------
def test_from_pretrained_takes_every_kind_of_reference(tiny_dir, offline_cache, monkeypatch):
    from optvq_cli import OptVQModel

    bundled = OptVQModel.from_pretrained("default", device="cpu")
    recorded = json.loads((refs.BUNDLED_DIRS[0] / "default" / "config.json").read_text())["weights_sha256"]
    assert bundled.sha256 == recorded and not bundled.training
    weights = file_sha256(tiny_dir / "model.safetensors")
    assert OptVQModel.from_pretrained(tiny_dir, device="cpu").sha256 == weights
    assert OptVQModel.from_pretrained(str(tiny_dir / "model.safetensors"), device="cpu").sha256 == weights
    lay_out_hub_cache(offline_cache, "someone/optvq-tiny", tiny_dir, refs=("main", "v1"))
    monkeypatch.chdir(offline_cache)
    hub_model = OptVQModel.from_pretrained("someone/optvq-tiny", revision="v1", device="cpu")
    assert hub_model.source == f"hub:someone/optvq-tiny@{COMMIT}" and hub_model.sha256 == weights


def test_save_pretrained_round_trip_and_foreign_files(tiny_dir, tmp_path):
    from optvq_cli import OptVQModel

    model = OptVQModel.from_pretrained(tiny_dir, device="cpu")
    out = model.save_pretrained(tmp_path / "saved")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    back = OptVQModel.from_pretrained(out, device="cpu")
    assert back.sha256 == model.sha256 and back.config == model.config  # same tensors, same file
    model.save_pretrained(out)  # an earlier optvq model there: replaced
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(FileExistsError, match="config.json"):
        model.save_pretrained(theirs)
    assert (theirs / "config.json").read_text() == '{"model_type": "bert"}'
    assert sorted(p.name for p in theirs.iterdir()) == ["config.json"]


def test_push_to_hub_uploads_the_saved_folder(tiny_dir, monkeypatch):
    import huggingface_hub

    from optvq_cli import OptVQModel

    calls = []

    class FakeApi:
        def create_repo(self, repo_id, private=False, exist_ok=False, repo_type=None):
            calls.append(("create", repo_id, private, repo_type))

        def upload_folder(self, repo_id, folder_path, commit_message, repo_type):
            folder = Path(folder_path)
            doc = json.loads((folder / "config.json").read_text())
            calls.append(("upload", repo_id, sorted(p.name for p in folder.iterdir()), doc["weights_sha256"]))

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("OPTVQ_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)  # read once, at its import
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    model = OptVQModel.from_pretrained(tiny_dir, device="cpu")
    url = model.push_to_hub("me/optvq-tiny", private=True)
    assert url == "https://huggingface.co/me/optvq-tiny"
    files = ["README.md", "config.json", "model.safetensors"]
    assert calls == [("create", "me/optvq-tiny", True, "model"), ("upload", "me/optvq-tiny", files, model.sha256)]


@pytest.mark.slow
def test_checkpoint_files_are_read_without_the_model_code():
    import subprocess
    import sys

    code = (
        "import sys; import optvq_cli.checkpoints.refs, optvq_cli.checkpoints.files, "
        "optvq_cli.checkpoints.configs, optvq_cli.checkpoints.upstream; "
        "print(sorted(m for m in sys.modules if m.startswith(('optvq_cli.model', 'optvq_cli.cli'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_provenance_is_attached_once_and_read_only(tiny_dir):
    from optvq_cli.model import Provenance

    model = load_model(tiny_dir, device="cpu")
    weights = tiny_dir / "model.safetensors"
    want = {"dataset": "unit-test", "checkpoint_format": "optvq"}
    assert model.provenance == Provenance(str(tiny_dir.resolve()), file_sha256(weights), "fp32", want, [])
    with pytest.raises(AttributeError):
        model.source = "elsewhere"


# -- refused at load: broken weights, out-of-range configs, ambiguous names ----------------------
def test_weights_holding_nan_or_inf_are_refused_naming_the_first_bad_tensor(tmp_path):
    t = _tiny_tensors()
    t["decoder.out_fc.weight"][0, 0, 0, 0] = float("nan")
    t["encoder.in_fc.bias"][1] = float("inf")
    path = _write_with_config(tmp_path / "diverged.safetensors", t, PRESETS["tiny"].to_dict())
    with pytest.raises(UserError) as e:
        load_model(path, device="cpu")
    first = next(k for k in sorted(t) if not torch.isfinite(t[k]).all())  # safetensors stores keys sorted
    assert first == "decoder.out_fc.weight"
    one_line_error(e, str(path), "tensor decoder.out_fc.weight", "1 NaN and 0 inf")
    torch.save({"model": t}, tmp_path / "checkpoint.pth")
    with pytest.raises(UserError) as e:
        convert_upstream(tmp_path / "checkpoint.pth")
    one_line_error(e, "checkpoint.pth", "inf")


@pytest.mark.parametrize(
    "key,value",
    [
        ("resolution", 10**12),
        ("n_iters", 10**9),
        ("n_codes", 2**40),
        ("in_channels", 10**6),
        ("ch", 1 << 20),
        ("epsilon", 1e300),
    ],
)
def test_config_fields_out_of_range_are_refused_naming_file_and_key(tiny_dir, key, value):
    doc = json.loads((tiny_dir / "config.json").read_text())
    doc["model"][key] = value
    (tiny_dir / "config.json").write_text(json.dumps(doc))
    with pytest.raises(UserError) as e:
        load_model(tiny_dir, device="cpu")
    one_line_error(e, str(tiny_dir / "config.json"), f"{key}=", "at most" if key != "epsilon" else "(0, 1e+06]")


def test_a_bare_name_that_is_a_folder_and_a_bundled_model_is_refused(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_dir, tmp_path / "default")
    with pytest.raises(UserError) as e:
        load_model("default", device="cpu")
    one_line_error(e, "default", "./default", "bundled:default")
    local = file_sha256(tiny_dir / "model.safetensors")
    assert load_model("./default", device="cpu").sha256 == local
    assert load_model(Path("default"), device="cpu").sha256 == local  # a Path names a path
    bundled = load_model("bundled:default", device="cpu")
    assert bundled.source == "bundled:default" and bundled.sha256 != local
    with pytest.raises(UserError) as e:
        load_model("bundled:nothing-of-that-name", device="cpu")
    one_line_error(e, "bundled:nothing-of-that-name", "no such bundled model", "default")


def _their_tokens(model, tensors, x: torch.Tensor) -> torch.Tensor:
    """The authors' assignment of a batch, from the raw tensors: one pool of every head chunk of
    every position of every image, the plain Sinkhorn against proj(embedding)."""
    with torch.no_grad():
        z = F.conv2d(model.encoder(x), tensors["model.quant_conv.weight"], tensors["model.quant_conv.bias"])
    codes = tensors["model.quantize.embedding.weight"] @ tensors["model.quantize.proj.weight"].t()
    codes = codes + tensors["model.quantize.proj.bias"]
    b, e, hh, ww = z.shape
    d = e // 2
    pool = z.permute(0, 2, 3, 1).reshape(b * hh * ww * 2, d)  # image, row, column, head: their order
    return sinkhorn_assign_plain(pool, codes, 10.0, 5).reshape(b, hh, ww, 2).permute(0, 3, 1, 2)


def test_the_cli_gives_the_authors_tokens(tmp_path):
    """`optvq encode --assign sinkhorn` over one batch of PNGs: exactly the authors' tokens of the
    same pixels (the CLI's batch layout must not take another convolution path)."""
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    folder = tmp_path / "upstream"
    tensors = write_upstream_tiny(folder)
    model = load_model(str(folder), device="cpu")
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    pixels = ((images(3, 16) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    for i, p in enumerate(pixels):
        Image.fromarray(p.permute(1, 2, 0).numpy()).save(pngs / f"im{i}.png")
    x = pixels.float() / 127.5 - 1
    args = ["encode", str(pngs), str(tmp_path / "tok"), "--model", str(folder), "--assign", "sinkhorn"]
    res = subprocess.run([sys.executable, "-m", "optvq_cli", *args, "-b", "3", "--size", "16", "-q"],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr
    got = torch.stack([torch.from_numpy(np.load(tmp_path / "tok" / f"im{i}.npy").astype(np.int64)) for i in range(3)])
    assert torch.equal(got, _their_tokens(model, tensors, x))
