"""Reading every kind of image Pillow opens, and the model's preprocessing."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from optvq_cli.core.images import (
    ImageDataset,
    ImageError,
    Placement,
    Preprocess,
    collate,
    read_image,
    read_size,
    to_pixels,
    to_tensor,
    unpad,
)
from optvq_cli.sources import Item


def _save(path: Path, image: Image.Image, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kw)
    return path


def _rgb(w: int = 16, h: int = 16, color=(10, 20, 30)) -> Image.Image:
    return Image.new("RGB", (w, h), color)


# ---------------------------------------------------------------- reading


def test_exif_orientation_is_applied(tmp_path):
    im = _rgb(40, 20, (255, 0, 0))
    im.paste((0, 0, 255), (20, 0, 40, 20))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": the left half ends on top
    p = _save(tmp_path / "o.png", im, exif=exif)
    out = read_image(p, 3)
    assert out.size == (20, 40)
    assert out.getpixel((10, 5)) == (255, 0, 0)
    assert out.getpixel((10, 35)) == (0, 0, 255)
    assert read_size(p) == (20, 40)


def test_grayscale_is_replicated_to_rgb_and_rgb_is_luma_for_one_channel(tmp_path):
    p = _save(tmp_path / "g.png", Image.new("L", (4, 4), 77))
    assert read_image(p, 3).getpixel((0, 0)) == (77, 77, 77)
    q = _save(tmp_path / "r.png", _rgb(4, 4, (255, 0, 0)))
    out = read_image(q, 1)
    assert out.mode == "L" and out.getpixel((0, 0)) == 76  # ITU-R 601: 0.299 * 255


def test_rgba_is_composited_on_white(tmp_path):
    a = np.zeros((1, 3, 4), np.uint8)
    a[0, 0] = (255, 0, 0, 0)  # fully transparent: white
    a[0, 1] = (255, 0, 0, 255)  # opaque red
    a[0, 2] = (255, 0, 0, 128)  # half red on white: 255 * (1 - 128/255) = 127 in G and B
    p = _save(tmp_path / "t.png", Image.fromarray(a, "RGBA"))
    px = np.asarray(read_image(p, 3))[0]
    assert px[0].tolist() == [255, 255, 255]
    assert px[1].tolist() == [255, 0, 0]
    assert px[2, 0] == 255 and abs(int(px[2, 1]) - 127) <= 1 and abs(int(px[2, 2]) - 127) <= 1


def test_palette_with_transparency_and_la_are_composited_on_white(tmp_path):
    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.putpixel((1, 0), 1)
    p = _save(tmp_path / "p.png", pal, transparency=0)
    assert np.asarray(read_image(p, 3))[0].tolist() == [[255, 255, 255], [0, 255, 0]]
    la = Image.fromarray(np.array([[[0, 0], [0, 255]]], np.uint8), "LA")
    q = _save(tmp_path / "la.png", la)
    assert np.asarray(read_image(q, 1))[0].tolist() == [255, 0]


def test_cmyk_is_converted_to_rgb(tmp_path):
    p = _save(tmp_path / "c.tif", Image.new("CMYK", (3, 3), (255, 0, 0, 0)))
    assert read_image(p, 3).getpixel((1, 1)) == (0, 255, 255)  # pure cyan: no red


def test_sixteen_bit_is_scaled_to_eight_bits(tmp_path):
    a = np.array([[0, 257 * 100, 65535]], np.uint16)
    p = _save(tmp_path / "d.png", Image.fromarray(a))
    assert Image.open(p).mode.startswith("I")
    assert np.asarray(read_image(p, 3))[0, :, 0].tolist() == [0, 100, 255]


def test_first_frame_of_a_gif(tmp_path):
    frames = [Image.new("P", (8, 8), 0), Image.new("P", (8, 8), 1)]
    for f in frames:
        f.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    p = tmp_path / "anim.gif"
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=50)
    assert read_image(p, 3).getpixel((4, 4)) == (255, 0, 0)


@pytest.mark.parametrize("fmt, ext", [("JPEG", "jpg"), ("WEBP", "webp"), ("BMP", "bmp"), ("TIFF", "tif")])
def test_common_formats_are_read(tmp_path, fmt, ext):
    p = _save(tmp_path / f"x.{ext}", _rgb(12, 10, (200, 100, 50)), format=fmt)
    out = read_image(p, 3)
    assert out.size == (12, 10) and out.mode == "RGB"
    assert np.abs(np.asarray(out, np.int16) - np.array([200, 100, 50])).max() <= 8  # lossy formats


def test_bad_files_raise_image_error_with_the_reason(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "text.jpg"
    text.write_text("hello, I am not a JPEG")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(buf, "PNG")
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    for path, reason in [(empty, "empty file"), (text, "not an image"), (trunc, "truncated")]:
        with pytest.raises(ImageError, match=reason):
            read_image(path, 3)


# ---------------------------------------------------------------- preprocessing


def test_center_crop_placement_by_hand():
    pl = Preprocess(size=32, crop=True, multiple=8).place(100, 60)
    assert pl == Placement((100, 60), (20, 0, 80, 60), (32, 32), (0, 0, 0, 0))
    pl = Preprocess(size=32, crop=True, multiple=8).place(61, 100)  # odd margin: floor on the left/top
    assert pl.crop_box == (0, 19, 61, 80)


def test_center_crop_keeps_the_middle():
    a = np.zeros((60, 100, 3), np.uint8)
    a[:, 20:80] = 255  # white centre square, black margins
    pixels, pl = Preprocess(size=60, crop=True, multiple=4).apply(Image.fromarray(a))
    assert pixels.shape == (60, 60, 3) and (pixels == 255).all()


def test_no_crop_keeps_the_aspect_and_pads_to_a_multiple_of_f():
    pre = Preprocess(size=32, crop=False, multiple=8)
    pl = pre.place(100, 60)
    # shorter side 60 -> 32, longer 100 * 32 / 60 = 53.3 -> 53, padded to 56 on the right
    assert pl == Placement((100, 60), (0, 0, 100, 60), (53, 32), (0, 0, 3, 0))
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (60, 100, 3), np.uint8))
    pixels, _ = pre.apply(img)
    assert pixels.shape == (32, 56, 3)
    assert (pixels[:, 53:] == pixels[:, 52:53]).all()  # edge repeated
    assert unpad(pixels, pl.padding).shape == (32, 53, 3)


def test_crop_size_not_a_multiple_of_f_is_padded():
    pl = Preprocess(size=30, crop=True, multiple=8).place(50, 50)
    assert pl.resized == (30, 30) and pl.padding == (0, 0, 2, 2)


def test_image_smaller_than_one_token_is_refused():
    with pytest.raises(ImageError, match="5x100 px, smaller than one token"):
        Preprocess(size=32, crop=True, multiple=8).place(5, 100)
    Preprocess(size=32, crop=True, multiple=8).place(8, 8)  # exactly one token is fine


def test_placement_json_round_trip():
    pl = Placement((100, 60), (20, 0, 80, 60), (32, 32), (0, 0, 1, 2))
    assert Placement.from_json(pl.to_json()) == pl


def test_tensor_round_trip_is_exact():
    a = np.random.default_rng(2).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    t = to_tensor(a)
    assert t.shape == (3, 5, 7) and float(t.min()) >= -1 and float(t.max()) <= 1
    assert float(to_tensor(np.full((1, 1, 1), 255, np.uint8))) == 1.0
    assert float(to_tensor(np.zeros((1, 1, 1), np.uint8))) == -1.0
    assert (to_pixels(t[None])[0] == a).all()


# ---------------------------------------------------------------- dataset


def test_dataset_returns_errors_as_data_even_in_workers(tmp_path):
    from torch.utils.data import DataLoader

    good = _save(tmp_path / "good.png", _rgb(20, 20))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"")
    tiny = _save(tmp_path / "tiny.png", _rgb(3, 3))
    items = [
        Item("good.png", good),
        Item("bad.png", bad),
        Item("tiny.png", tiny),
        Item("again.png", good),
    ]
    ds = ImageDataset(items, 3, Preprocess(16, True, 8), header_only={3})
    batches = list(DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate))
    assert len(batches) == 1
    s = batches[0]
    assert s[0].error is None and s[0].pixels.shape == (16, 16, 3)
    assert "empty file" in s[1].error and s[1].pixels is None
    assert "smaller than one token" in s[2].error
    assert s[3].pixels is None and s[3].error is None and s[3].placement.original_size == (20, 20)


# ---------------------------------------------------------------- hostile and unusual inputs


def test_permission_denied_is_named_not_called_corrupt(tmp_path, monkeypatch):
    p = _save(tmp_path / "locked.png", _rgb())

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(p))

    monkeypatch.setattr(Image, "open", denied)  # chmod 000 does not stop root, who runs CI
    for read in (lambda: read_image(p, 3), lambda: read_size(p)):
        with pytest.raises(ImageError, match=r"^cannot read \(permission denied\)$"):
            read()


def test_no_crop_judges_the_size_after_resizing():
    pre = Preprocess(size=16, crop=False, multiple=8)
    # 3 x 100 px: a sliver before resizing, 16 x 533 px after: plenty of tokens
    assert pre.place(3, 100) == Placement((3, 100), (0, 0, 3, 100), (16, 533), (0, 0, 0, 3))
    with pytest.raises(ImageError, match="3x100 px, smaller than one token"):
        Preprocess(size=16, crop=True, multiple=8).place(3, 100)  # the crop square is 3 x 3 px
    with pytest.raises(ImageError, match="resized to 4x133 px: smaller than one token"):
        Preprocess(size=4, crop=False, multiple=8).place(3, 100)
