"""The architectures: layer trees against the authors' key lists, layer arithmetic against closed
forms and an independent functional implementation, and the model's token paths."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from optvq_cli.core.device import autocast, resolve_device, resolve_dtype
from optvq_cli.core.errors import UserError
from optvq_cli.model import PRESETS, ModelConfig, OptVQModel, build_model
from optvq_cli.model.export import describe
from optvq_cli.model.vqgan import AttnBlock, Downsample, Upsample
from optvq_cli.quant.assign import sinkhorn_assign_plain

DATA = Path(__file__).parent / "data" / "upstream"


def read_key_list(name: str) -> dict[str, tuple[int, ...]]:
    """key -> shape of every tensor the authors' file holds (the 'in_safetensors' column)."""
    out = {}
    for line in (DATA / name).read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape, _dtype, in_file, _alias = line.split("\t")
        if in_file == "yes":
            out[key] = tuple(int(s) for s in shape.strip("()").split(",") if s)
    return out


def photo(size: int = 32, name: str = "astronaut.png") -> torch.Tensor:
    """A real photo from scikit-image's installed data, (1, 3, size, size) in [-1, 1]."""
    import skimage
    from PIL import Image

    img = Image.open(Path(skimage.__file__).parent / "data" / name).convert("RGB").resize((size, size))
    x = torch.from_numpy(__import__("numpy").asarray(img).copy()).permute(2, 0, 1).float()
    return ((x / 255 - 0.5) / 0.5).unsqueeze(0)


# -- layer trees ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "preset,key_list,prefix",
    [
        ("imagenet-f16-h4", "keys_f16_h4.txt", "model."),
        ("imagenet-f16-h8", "keys_f16_h8.txt", "model."),
        ("mnist", "keys_mnist.txt", ""),
        ("cifar10", "keys_cifar10.txt", ""),
    ],
)
def test_preset_tree_matches_the_authors_keys(preset, key_list, prefix):
    theirs = {k: s for k, s in read_key_list(key_list).items() if not k.startswith(prefix + "loss.")}
    model = build_model(preset, device="meta")
    ours = {prefix + k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == theirs
    assert model.param_counts()["total"] == sum(math.prod(s) for s in theirs.values())


def test_downsampling_factors_and_grids():
    assert build_model("tiny", device="meta").downsample == 4
    assert build_model("mnist", device="meta").downsample == 4
    assert build_model("imagenet-f16-h4", device="meta").downsample == 16
    assert build_model("tiny-vqgan", device="meta").downsample == 2
    m = build_model("imagenet-f16-h8", device="meta")
    assert describe(m, 256, 384)["token_grid"] == [8, 16, 24]
    # encode pads to a multiple of f = 16 on the right and bottom: 250 -> 256, 385 -> 400
    d = describe(m, 250, 385)
    assert d["padded_size"] == [256, 400] and d["token_grid"] == [8, 16, 25] and d["tokens_per_image"] == 3200
    with pytest.raises(UserError, match="smaller than one token"):
        describe(m, 15, 64)
    assert (m.config.n_codes, m.config.code_dim) == (16384, 32)


def test_presets_match_the_paper():
    h4 = PRESETS["imagenet-f16-h4"]
    assert (h4.ch, h4.ch_mult, h4.num_res_blocks, h4.attn_resolutions, h4.z_channels) == (
        128,
        (1, 1, 2, 2, 4),
        2,
        (16,),
        256,
    )
    assert (h4.n_codes, h4.e_dim, h4.heads, h4.code_dim) == (16384, 256, 4, 64)
    assert (PRESETS["cifar10"].n_codes, PRESETS["cifar10"].e_dim, PRESETS["cifar10"].heads) == (1024, 8, 4)
    assert PRESETS["mnist"].in_channels == 1


# -- layers against closed forms ------------------------------------------------------------------
def _point_kernel(conv: torch.nn.Conv2d, i: int, j: int) -> None:
    """Make ``conv`` copy each channel from kernel position (i, j): out[c] = in[c] shifted."""
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
        for c in range(conv.out_channels):
            conv.weight[c, c, i, j] = 1.0


def test_downsample_pads_bottom_right_only():
    down = Downsample(1)
    _point_kernel(down.conv, 2, 2)  # reads x_pad[2i + 2, 2j + 2]
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    # x_pad is x with one zero row below and one zero column right: 5 x 5.
    expected = torch.tensor([[[[x[0, 0, 2, 2], 0.0], [0.0, 0.0]]]])
    assert torch.equal(down(x), expected)
    _point_kernel(down.conv, 0, 0)  # reads x[2i, 2j]: no padding on top/left
    assert torch.equal(down(x), x[:, :, ::2, ::2])


def test_upsample_is_nearest_then_conv():
    up = Upsample(1)
    _point_kernel(up.conv, 1, 1)  # the centre tap: identity
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    expected = torch.tensor([[[[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]]]]).float()
    assert torch.equal(up(x), expected)


def test_attention_with_zero_queries_averages_values():
    torch.manual_seed(0)
    attn = AttnBlock(32)
    with torch.no_grad():
        attn.q.weight.zero_()
        attn.q.bias.zero_()  # all scores 0: softmax is uniform over positions
    x = torch.randn(2, 32, 3, 5)
    h = F.group_norm(x, 32, attn.norm.weight, attn.norm.bias, eps=1e-6)
    v = F.conv2d(h, attn.v.weight, attn.v.bias)
    mean_v = v.mean(dim=(2, 3), keepdim=True).expand_as(v)
    expected = x + F.conv2d(mean_v, attn.proj_out.weight, attn.proj_out.bias)
    torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-5)
    assert attn.norm.num_groups == 32 and attn.norm.eps == 1e-6
    assert attn.scale == pytest.approx(32**-0.5)


# -- an independent functional VQGAN, written from the state dict --------------------------------
def _gn(x, sd, name):
    return F.group_norm(x, 32, sd[name + ".weight"], sd[name + ".bias"], eps=1e-6)


def _conv(x, sd, name, stride=1, padding=1):
    return F.conv2d(x, sd[name + ".weight"], sd[name + ".bias"], stride=stride, padding=padding)


def _res(x, sd, name):
    h = _conv(F.silu(_gn(x, sd, name + ".norm1")), sd, name + ".conv1")
    h = _conv(F.silu(_gn(h, sd, name + ".norm2")), sd, name + ".conv2")
    if name + ".nin_shortcut.weight" in sd:
        x = _conv(x, sd, name + ".nin_shortcut", padding=0)
    return x + h


def _attn(x, sd, name):
    b, c, hh, ww = x.shape
    h = _gn(x, sd, name + ".norm")
    q, k, v = (_conv(h, sd, f"{name}.{p}", padding=0).flatten(2) for p in "qkv")  # (b, c, n)
    w = torch.einsum("bci,bcj->bij", q, k) / math.sqrt(c)
    out = torch.einsum("bij,bcj->bci", w.softmax(-1), v).reshape(b, c, hh, ww)
    return x + _conv(out, sd, name + ".proj_out", padding=0)


def _level(h, sd, name):
    j = 0
    while f"{name}.block.{j}.conv1.weight" in sd:
        h = _res(h, sd, f"{name}.block.{j}")
        if f"{name}.attn.{j}.q.weight" in sd:
            h = _attn(h, sd, f"{name}.attn.{j}")
        j += 1
    return h


def reference_encoder(x, sd, levels):
    h = _conv(x, sd, "encoder.conv_in")
    for i in range(levels):
        h = _level(h, sd, f"encoder.down.{i}")
        if f"encoder.down.{i}.downsample.conv.weight" in sd:
            h = _conv(F.pad(h, (0, 1, 0, 1)), sd, f"encoder.down.{i}.downsample.conv", stride=2, padding=0)
    h = _res(h, sd, "encoder.mid.block_1")
    h = _attn(h, sd, "encoder.mid.attn_1")
    h = _res(h, sd, "encoder.mid.block_2")
    return _conv(F.silu(_gn(h, sd, "encoder.norm_out")), sd, "encoder.conv_out")


def reference_decoder(z, sd, levels):
    h = _conv(z, sd, "decoder.conv_in")
    h = _res(h, sd, "decoder.mid.block_1")
    h = _attn(h, sd, "decoder.mid.attn_1")
    h = _res(h, sd, "decoder.mid.block_2")
    for i in reversed(range(levels)):
        h = _level(h, sd, f"decoder.up.{i}")
        if f"decoder.up.{i}.upsample.conv.weight" in sd:
            h = _conv(F.interpolate(h, scale_factor=2, mode="nearest"), sd, f"decoder.up.{i}.upsample.conv")
    return _conv(F.silu(_gn(h, sd, "decoder.norm_out")), sd, "decoder.conv_out")


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial norms and biases too, so a wrong eps / order / missing bias shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".norm" in name and name.endswith(".weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif not name.startswith("quantize."):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def test_vqgan_computes_what_the_reference_computes():
    cfg = PRESETS["tiny-vqgan"].replace(ch_mult=(1, 2, 2), resolution=16, attn_resolutions=(8,), num_res_blocks=2)
    model = build_model(cfg).eval()
    _randomize(model)
    sd = model.state_dict()
    # The tree has attention at the 8 x 8 level only, a nin_shortcut where widths change.
    assert "encoder.down.1.attn.1.q.weight" in sd and "encoder.down.0.attn.0.q.weight" not in sd
    assert "encoder.down.1.block.0.nin_shortcut.weight" in sd and "decoder.up.0.block.0.nin_shortcut.weight" in sd
    x = torch.cat([photo(16), photo(16, "coffee.png")])
    with torch.no_grad():
        z = model.encoder(x)
        torch.testing.assert_close(z, reference_encoder(x, sd, 3), rtol=1e-4, atol=1e-5)
        zz = torch.randn(2, cfg.z_channels, 4, 6)  # non-square grid
        torch.testing.assert_close(model.decoder(zz), reference_decoder(zz, sd, 3), rtol=1e-4, atol=1e-5)


def test_plain_cnn_computes_table4_layers():
    model = build_model("cifar10").eval()
    sd = model.state_dict()
    x = photo(32)
    with torch.no_grad():
        h = F.relu(_conv(x, sd, "encoder.in_fc"))
        h = F.relu(_conv(_conv(h, sd, "encoder.down1", 2, 0), sd, "encoder.conv1"))
        h = F.relu(_conv(_conv(h, sd, "encoder.down2", 2, 0), sd, "encoder.conv2"))
        h = _conv(h, sd, "encoder.out_fc")  # no activation at the end
        torch.testing.assert_close(model.encoder(x), h)
        z = torch.randn(1, 32, 5, 3)
        d = _conv(z, sd, "decoder.in_fc")
        d = F.conv_transpose2d(F.relu(d), sd["decoder.up1.weight"], sd["decoder.up1.bias"], stride=2)
        d = _conv(d, sd, "decoder.conv1")
        d = F.conv_transpose2d(F.relu(d), sd["decoder.up2.weight"], sd["decoder.up2.bias"], stride=2)
        d = _conv(F.relu(_conv(d, sd, "decoder.conv2")), sd, "decoder.out_fc")
        torch.testing.assert_close(model.decoder(z), d)
    assert model.decoder(z).shape == (1, 3, 20, 12)


# -- the token paths -----------------------------------------------------------------------------
def _pool(z: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, e_dim, h, w) -> rows ordered (b, i, j, head), written with explicit loops."""
    b, e, hh, ww = z.shape
    d = e // heads
    rows = [
        z[n, k * d : (k + 1) * d, i, j] for n in range(b) for i in range(hh) for j in range(ww) for k in range(heads)
    ]
    return torch.stack(rows)


def _grid(idx: torch.Tensor, b: int, hh: int, ww: int, heads: int) -> torch.Tensor:
    out = torch.empty(b, heads, hh, ww, dtype=torch.long)
    it = iter(idx.tolist())
    for n in range(b):
        for i in range(hh):
            for j in range(ww):
                for k in range(heads):
                    out[n, k, i, j] = next(it)
    return out


def test_encode_indices_nearest_and_sinkhorn_match_plain_computation():
    torch.manual_seed(1)
    model = build_model("tiny").eval()
    x = torch.cat([photo(32), photo(32, "chelsea.png"), photo(32, "coffee.png")])
    z = model.features(x)
    codes = model.quantize.embedding.weight @ model.quantize.proj.weight.t() + model.quantize.proj.bias
    pool = _pool(z.detach(), 2)
    near = _grid(torch.cdist(pool, codes.detach()).argmin(1), 3, 8, 8, 2)
    assert torch.equal(model.encode_indices(x, assign="nearest"), near)
    sink = _grid(sinkhorn_assign_plain(pool, codes.detach(), 10.0, 5), 3, 8, 8, 2)
    assert torch.equal(model.encode_indices(x, assign="sinkhorn"), sink)
    # nearest does not depend on the batch
    assert torch.equal(model.encode_indices(x[1:2], assign="nearest"), near[1:2])


def test_decode_indices_is_exact_lookup_on_non_square_grids():
    torch.manual_seed(2)
    model = build_model("tiny").eval()
    idx = torch.randint(0, 64, (2, 2, 3, 5))
    codes = model.quantize.codes().detach()
    z = torch.zeros(2, 8, 3, 5)  # head k of position (i, j) holds channels 4k..4k+3
    for n in range(2):
        for k in range(2):
            for i in range(3):
                for j in range(5):
                    z[n, 4 * k : 4 * k + 4, i, j] = codes[idx[n, k, i, j]]
    out = model.decode_indices(idx)
    assert out.shape == (2, 3, 12, 20)
    with torch.no_grad():
        torch.testing.assert_close(out, model.decoder(model.post_quant_conv(z)))
    x = photo(32)
    z_q, _, ind = model.encode(x)
    # straight-through z_q decodes like the looked-up codes, up to float rounding
    torch.testing.assert_close(model.decode_indices(ind), model.decode(z_q), rtol=1e-4, atol=1e-5)


def test_bad_inputs_are_user_errors():
    model = build_model("tiny").eval()
    with pytest.raises(UserError, match="heads"):
        model.decode_indices(torch.zeros(1, 3, 2, 2, dtype=torch.long))
    with pytest.raises(UserError, match="0..63"):
        model.decode_indices(torch.full((1, 2, 2, 2), 64))
    with pytest.raises(UserError, match="multiple"):
        model.encode_indices(torch.zeros(1, 3, 30, 32))
    with pytest.raises(UserError, match=r"\(B, 3, H, W\)"):
        model.encode_indices(torch.zeros(1, 1, 32, 32))


def test_autocast_keeps_quantizer_fp32():
    model = build_model("tiny-vqgan").eval()
    model.compute_dtype = torch.bfloat16
    x = photo(16)
    z_q, loss, idx = model.encode(x)
    assert z_q.dtype == torch.float32 and torch.isfinite(loss)
    out = model.decode(z_q)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    with autocast("cpu", torch.bfloat16):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


def test_config_round_trip_and_validation():
    for name, cfg in PRESETS.items():
        back = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
        assert back == cfg, name
    with pytest.raises(ValueError, match="unknown config field"):
        ModelConfig.from_dict({"arch": "vqgan", "colour": 3})
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(e_dim=10, heads=4)
    with pytest.raises(ValueError, match="multiples of 32"):
        ModelConfig(ch=48)
    with pytest.raises(UserError, match="unknown preset"):
        build_model("huge")
    assert build_model("tiny", in_channels=1).config.out_channels == 1


@pytest.mark.parametrize(
    "change,field",
    [
        ({"n_codes": 0}, "n_codes"),
        ({"n_codes": 2.5}, "n_codes"),
        ({"e_dim": 0}, "e_dim"),
        ({"heads": 0}, "heads"),
        ({"in_channels": 0}, "in_channels"),
        ({"out_channels": -1}, "out_channels"),
        ({"n_iters": 0}, "n_iters"),
        ({"epsilon": 0}, "epsilon"),
        ({"epsilon": float("nan")}, "epsilon"),
        ({"beta": -0.1}, "beta"),
        ({"dropout": 1.0}, "dropout"),
        ({"loss_type": "l3"}, "loss_type"),
        ({"commitment": "both"}, "commitment"),
        ({"assign": "greedy"}, "assign"),
        ({"use_proj": "yes"}, "use_proj"),
        ({"resolution": 0}, "resolution"),
        ({"resolution": 42}, "resolution"),  # no multiple of the plain CNN's f = 4
        ({"ch_mult": "12"}, "ch_mult"),
        ({"num_res_blocks": 0}, "num_res_blocks"),
        ({"attn_resolutions": [24]}, "attn_resolutions"),
        ({"cnn_widths": [8, 8]}, "cnn_widths"),
        ({"z_channels": True}, "z_channels"),
        ({"resolution": 10**12}, "resolution"),  # bounded: no overflow later, blamed on an image
        ({"n_iters": 10**9}, "n_iters"),  # bounded: no Sinkhorn loop that never ends
        ({"n_codes": 2**30}, "n_codes"),
        ({"cnn_widths": [8, 8, 10**6]}, "cnn_widths"),
        ({"ch_mult": [1] * 13}, "ch_mult"),
        ({"beta": 1e9}, "beta"),
    ],
)
def test_every_config_field_is_validated(change, field):
    base = PRESETS["tiny-vqgan"] if field in ("ch_mult", "num_res_blocks", "attn_resolutions") else PRESETS["tiny"]
    d = {**base.to_dict(), **change}
    with pytest.raises(ValueError, match=field):
        ModelConfig.from_dict(d)


def test_config_json_holds_only_the_fields_of_its_architecture():
    plain, vqgan = PRESETS["tiny"].to_dict(), PRESETS["tiny-vqgan"].to_dict()
    assert "cnn_widths" in plain and not {"ch", "ch_mult", "num_res_blocks", "attn_resolutions", "z_channels"} & set(
        plain
    )
    assert "ch_mult" in vqgan and "cnn_widths" not in vqgan
    # files written before carry every field: still read, to the same config
    full = {**PRESETS["tiny"].to_dict(), "ch": 128, "ch_mult": [1, 1, 2, 2, 4], "z_channels": 256}
    assert ModelConfig.from_dict(full) == PRESETS["tiny"]
    assert ModelConfig.from_dict({**plain, "epsilon": 10}).epsilon == 10.0  # JSON 10 and 10.0: one value


def test_model_is_the_one_class():
    m = build_model("tiny")
    assert isinstance(m, OptVQModel)
    with pytest.warns(DeprecationWarning, match="model.quantize"):
        assert m.quantizer is m.quantize  # one module, one name; the old one warns
    assert m.source is None and m.sha256 is None


def test_device_and_dtype_flags():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UserError, match="--device gpu"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            resolve_device("cuda:1")
    else:
        with pytest.raises(UserError, match="CUDA device"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")
    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype("fp16") is torch.float16
    assert resolve_dtype("fp32") is None and resolve_dtype(None) is None
    with pytest.raises(UserError, match="--dtype"):
        resolve_dtype("int8")


# -- the Python API ------------------------------------------------------------------------------
def _pool_batch() -> torch.Tensor:
    """Four photos at 32 px: a batch on which the Sinkhorn plan and the nearest code disagree."""
    return torch.cat([photo(32, n) for n in ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg")])


def test_encode_is_nearest_unless_told_and_forward_trains_with_the_config_assignment():
    torch.manual_seed(3)
    model = build_model("tiny").eval()
    assert model.config.assign == "sinkhorn"
    x = _pool_batch()
    near = model.encode_indices(x, assign="nearest")
    sink = model.encode_indices(x, assign="sinkhorn")
    assert not torch.equal(near, sink)  # the batch tells the two apart
    with torch.no_grad():
        assert torch.equal(model.encode(x)[2], near)
        assert torch.equal(model.encode(x, assign="sinkhorn")[2], sink)
        assert torch.equal(model(x)[2], near)  # eval mode: nearest
        model.train()
        assert torch.equal(model(x)[2], sink)  # the training step: the config's assignment


def _reference_pixels(path: Path, size: int, channels: int) -> torch.Tensor:
    """Centre square, bicubic resize, [-1, 1]: the protocol written out with Pillow alone."""
    from PIL import Image

    im = Image.open(path).convert("RGB" if channels == 3 else "L")
    w, h = im.size
    s = min(w, h)
    box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
    a = torch.from_numpy(__import__("numpy").array(im.resize((size, size), Image.Resampling.BICUBIC, box=box)))
    a = a[:, :, None] if a.dim() == 2 else a
    return (a.permute(2, 0, 1).float() / 127.5 - 1)[None]


def test_preprocess_gives_the_tensor_the_model_takes(tmp_path):
    import skimage
    from PIL import Image

    src = Path(skimage.__file__).parent / "data" / "chelsea.png"  # 451 x 300 RGB
    model = build_model("tiny").eval()
    x = model.preprocess(src)
    assert x.shape == (1, 3, 32, 32) and x.device == model.device
    torch.testing.assert_close(x, _reference_pixels(src, 32, 3), atol=1e-6, rtol=0)
    gray = build_model("tiny", in_channels=1)
    assert gray.preprocess(Image.open(src)).shape == (1, 1, 32, 32)  # an RGB image for a 1-channel model
    assert model.preprocess([src, str(src)], size=20).shape == (2, 3, 20, 20)  # 20: padded to a multiple of 4
    whole = model.preprocess(src, size=30, crop=False)  # 451 x 300 -> 45 x 30 -> padded to 48 x 32
    assert whole.shape == (1, 3, 32, 48)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        model.preprocess(tmp_path / "missing.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="bad.png"):
        model.preprocess(tmp_path / "bad.png")


def test_tokenize_and_detokenize():
    import numpy as np
    import skimage

    src = Path(skimage.__file__).parent / "data" / "astronaut.png"
    torch.manual_seed(4)
    model = build_model("tiny").eval()
    x = _pool_batch()
    tokens = model.tokenize(x)
    assert tokens.dtype == torch.int64 and tokens.shape == (4, 2, 8, 8)
    assert torch.equal(tokens, model.encode_indices(x, assign="nearest"))
    assert torch.equal(model.tokenize(x, assign="sinkhorn"), model.encode_indices(x, assign="sinkhorn"))
    assert torch.equal(model.tokenize(src), model.encode_indices(model.preprocess(src), assign="nearest"))
    with pytest.raises(ValueError, match="assign='greedy'"):
        model.tokenize(x, assign="greedy")
    images = model.detokenize(tokens)
    assert images.shape == (4, 3, 32, 32)
    torch.testing.assert_close(images, model.decode_indices(tokens))
    grid = tokens[1].numpy().astype(np.uint16)  # one grid as `optvq encode` stores it
    torch.testing.assert_close(model.detokenize(grid), images[1:2])
    with pytest.raises(ValueError, match="integers"):
        model.detokenize(grid.astype(np.float32))


def _imports(path: Path) -> set[str]:
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_the_library_imports_point_one_way():
    """Nothing imports the CLI; model, quant and checkpoints import no job (tokenize, eval, train)."""
    package = Path(__file__).resolve().parents[1] / "optvq_cli"
    jobs = ("optvq_cli.cli", "optvq_cli.tokenize", "optvq_cli.eval", "optvq_cli.train")
    bad = []
    for path in package.rglob("*.py"):
        rel = path.relative_to(package).parts
        if rel[0] in ("cli", "__main__.py"):
            continue
        up = jobs if rel[0] in ("model", "quant", "checkpoints", "core") else jobs[:1]
        bad += [f"{'/'.join(rel)} imports {m}" for m in _imports(path) if m.startswith(up)]
        if rel[0] in ("checkpoints", "quant", "core"):
            bad += [f"{'/'.join(rel)} imports {m}" for m in _imports(path) if m.startswith("optvq_cli.model")]
    assert bad == []


def test_library_errors_are_value_and_file_errors(tmp_path):
    from optvq_cli import OptVQModel

    model = build_model("tiny").eval()
    for call in (
        lambda: model.tokenize(torch.zeros(1, 3, 30, 32)),
        lambda: model.detokenize(torch.full((1, 2, 2, 2), 64)),
        lambda: model.tokenize(torch.zeros(1, 3, 32, 32), assign="greedy"),
        lambda: OptVQModel.from_pretrained(tmp_path, device="cpu"),  # a folder without weights
        lambda: build_model("huge"),
    ):
        with pytest.raises(ValueError):
            call()
    with pytest.raises(FileNotFoundError):
        model.preprocess(tmp_path / "none.png")
