"""Images read in place from tar files: WebDataset shards, a plain tar, ImageNet's nested tar;
brace patterns; damaged tars named in one line."""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import pytest
from conftest import SKIMAGE

from optvq_cli.sources.tar import ContainerError, TarReader, expand_braces, find_tars, list_tar

PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg")


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _photo(i: int) -> bytes:
    return (SKIMAGE / PHOTOS[i % len(PHOTOS)]).read_bytes()


def _webdataset(path: Path, start: int, n: int, label_kind: str = "cls", fmt: int = tarfile.GNU_FORMAT) -> None:
    """Samples key.jpg/png + key.cls (or key.json), keys sample{start}..; one with a long name."""
    with tarfile.open(path, "w", format=fmt) as tf:
        for i in range(start, start + n):
            key = f"sample{i:03d}" if i % 3 else f"{'deep/' * 30}sample{i:03d}"  # > 100 chars: long-name headers
            ext = Path(PHOTOS[i % len(PHOTOS)]).suffix
            _add(tf, f"{key}{ext}", _photo(i))
            _add(tf, f"{key}.seg.png", b"not the image")  # another member of the sample, not an image of its own
            if label_kind == "cls":
                _add(tf, f"{key}.cls", f"{i % 5}\n".encode())
            else:
                _add(tf, f"{key}.json", f'{{"label": "class{i % 2}", "w": 3}}'.encode())


def test_webdataset_members_read_back_as_tarfile_extracts_them(tmp_path):
    tar = tmp_path / "train-0000.tar"
    _webdataset(tar, 0, 5)
    records = list(list_tar(tar))
    with tarfile.open(tar) as tf:
        images = [m for m in tf.getmembers() if m.name.endswith((".png", ".jpg")) and ".seg." not in m.name]
        assert [r.member for r in records] == [m.name for m in images]  # tar order
        reader = TarReader()
        for r, m in zip(records, images, strict=True):
            assert reader.read(r) == tf.extractfile(m).read()
    assert [r.label for r in records] == [0, 1, 2, 3, 4]
    assert records[0].member.startswith("deep/deep/") and len(records[0].member) > 100
    assert reader.read(records[2]) == _photo(2)  # the original file's bytes


def test_json_labels_and_pax_headers(tmp_path):
    tar = tmp_path / "a.tar"
    _webdataset(tar, 0, 4, label_kind="json", fmt=tarfile.PAX_FORMAT)
    assert [r.label for r in list_tar(tar)] == ["class0", "class1", "class0", "class1"]


def test_a_plain_tar_of_images_has_no_labels(tmp_path):
    tar = tmp_path / "photos.tar"
    with tarfile.open(tar, "w") as tf:
        for name in PHOTOS:
            tf.add(SKIMAGE / name, arcname=f"photos/{name}")
        _add(tf, "photos/README", b"not an image")
    records = list(list_tar(tar))
    assert [(r.member, r.label) for r in records] == [(f"photos/{n}", None) for n in PHOTOS]
    assert [TarReader().read(r) for r in records] == [(SKIMAGE / n).read_bytes() for n in PHOTOS]


def test_imagenet_nested_tar_labels_are_the_synsets(tmp_path):
    classes = {"n01440764": [0, 1], "n01443537": [2, 3, 1]}
    outer = tmp_path / "ILSVRC2012_img_train.tar"
    with tarfile.open(outer, "w") as out:
        for synset, photos in classes.items():
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as tf:
                for k, i in enumerate(photos):
                    _add(tf, f"{synset}_{k}.JPEG", _photo(i))
            _add(out, f"{synset}.tar", inner.getvalue())
    records = list(list_tar(outer))
    expected = [(f"{s}.tar/{s}_{k}.JPEG", s, i) for s, photos in classes.items() for k, i in enumerate(photos)]
    assert [(r.member, r.label) for r in records] == [(m, s) for m, s, _ in expected]
    reader = pickle.loads(pickle.dumps(TarReader()))  # as a DataLoader worker gets it
    assert [reader.read(r) for r in records] == [_photo(i) for _, _, i in expected]
    assert pickle.loads(pickle.dumps(records)) == records


def test_shards_by_folder_and_by_brace_pattern_in_name_order(tmp_path):
    for s in (2, 0, 1):
        _webdataset(tmp_path / f"train-{s:04d}.tar", s * 3, 3)
    (tmp_path / "notes.txt").write_text("x")
    names = [p.name for p in find_tars(tmp_path)]
    assert names == ["train-0000.tar", "train-0001.tar", "train-0002.tar"]
    assert find_tars(f"{tmp_path}/train-{{0000..0002}}.tar") == find_tars(tmp_path)
    assert [p.name for p in find_tars(f"{tmp_path}/train-{{0002,0000}}.tar")] == names[::2]
    with pytest.raises(ValueError, match=r"train-0003.tar: no such shard"):
        find_tars(f"{tmp_path}/train-{{0000..0003}}.tar")


def test_brace_expansion():
    assert expand_braces("a-{0008..0011}.tar") == ["a-0008.tar", "a-0009.tar", "a-0010.tar", "a-0011.tar"]
    assert expand_braces("{9..11}") == ["9", "10", "11"]  # no padding unless an end is padded
    assert expand_braces("{x,y}-{0..1}") == ["x-0", "x-1", "y-0", "y-1"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    for bad in ("{3..1}", "a{b}", "a{0..2"):
        with pytest.raises(ValueError):
            expand_braces(bad)


@pytest.mark.parametrize("cut", [0.5, "header", "data_end"])
def test_a_truncated_tar_is_one_error_naming_the_file(tmp_path, cut):
    tar = tmp_path / "train-0000.tar"
    _webdataset(tar, 1, 4)
    whole = tar.read_bytes()
    records = list(list_tar(tar))
    if cut == "header":
        at = records[2].offset - 512 + 100  # inside the third image's header
    elif cut == "data_end":
        at = records[-1].offset + records[-1].size - 10  # inside the last image's bytes
    else:
        at = int(len(whole) * cut)
    tar.write_bytes(whole[:at])
    with pytest.raises(ContainerError, match=r"train-0000.tar: .*truncated"):
        list(list_tar(tar))


def test_a_corrupt_header_is_not_taken_for_the_end(tmp_path):
    """tarfile stops quietly at a header with a bad checksum; the listing must not."""
    tar = tmp_path / "a.tar"
    _webdataset(tar, 1, 4)
    records = list(list_tar(tar))
    data = bytearray(tar.read_bytes())
    data[records[1].offset - 512 + 3] ^= 0xFF  # a byte of the second image's name: its checksum fails
    tar.write_bytes(bytes(data))
    with pytest.raises(ContainerError, match=r"a.tar: .*corrupt header"):
        list(list_tar(tar))


def test_a_compressed_tar_is_refused_in_one_line(tmp_path):
    tgz = tmp_path / "train.tar"
    with tarfile.open(tgz, "w:gz") as tf:
        tf.add(SKIMAGE / PHOTOS[0], arcname="a.png")
    with pytest.raises(ContainerError, match=r"train.tar: a gzip-compressed tar"):
        list(list_tar(tgz))


def test_not_a_tar_at_all(tmp_path):
    bad = tmp_path / "x.tar"
    bad.write_bytes(_photo(0)[:4096])
    with pytest.raises(ContainerError, match="x.tar"):
        list(list_tar(bad))


def test_a_bad_label_names_the_member(tmp_path):
    tar = tmp_path / "a.tar"
    with tarfile.open(tar, "w") as tf:
        _add(tf, "k.png", _photo(0))
        _add(tf, "k.json", b"{not json")
    with pytest.raises(ContainerError, match=r"a.tar/k.json"):
        list(list_tar(tar))


def test_reader_keeps_a_bounded_set_of_open_files(tmp_path):
    records = []
    for s in range(3):
        _webdataset(tmp_path / f"s{s}.tar", s * 2, 2)
        records += list(list_tar(tmp_path / f"s{s}.tar"))
    reader = TarReader(max_open=2)
    assert [reader.read(r) for r in records] == [_photo(i) for i in range(6)]
    assert len(reader._fds) == 2
    reader.close()


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_the_header_scan_finds_what_tarfile_finds(tmp_path, fmt):
    """Names (ustar prefix, GNU long names, pax paths with non-ASCII), offsets and sizes against the
    standard library's reading of the same tar; folders, links and non-image members are not images."""
    tar = tmp_path / "a.tar"
    names = ["x.png", f"{'deep/' * 25}y.png", "ünï/cödé.jpg", "z.txt"]
    if fmt == tarfile.USTAR_FORMAT:
        names[2] = "plain/code.jpg"  # ustar holds ASCII names only
    with tarfile.open(tar, "w", format=fmt) as tf:
        tf.addfile(_dir("folder"))
        for i, name in enumerate(names):
            _add(tf, name, _photo(i)[: 1000 + 37 * i])
        link = tarfile.TarInfo("link.png")
        link.type, link.linkname = tarfile.SYMTYPE, "x.png"
        tf.addfile(link)
    with tarfile.open(tar) as tf:
        images = [m for m in tf.getmembers() if m.isreg() and not m.name.endswith(".txt")]
    expected = [(m.name, m.offset_data, m.size) for m in images]
    assert [(r.member, r.offset, r.size) for r in list_tar(tar)] == expected and len(expected) == 3


def _dir(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info
