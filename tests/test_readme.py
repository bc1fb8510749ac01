"""The README's Python examples run as written."""

import re
from pathlib import Path

import pytest
import skimage
from PIL import Image

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_examples():
    assert BLOCKS


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_example_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # the photograph the examples name: one that ships inside scikit-image
    Image.open(Path(skimage.__file__).parent / "data" / "chelsea.png").convert("RGB").save("photo.jpg")
    exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})


def test_the_python_api_comes_first():
    assert "OptVQModel.from_pretrained" in BLOCKS[0] and ".tokenize(" in BLOCKS[0]
    assert len([line for line in BLOCKS[0].splitlines() if line.strip()]) <= 4
