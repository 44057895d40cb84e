"""Image loading refuses unreadable files with a ValueError naming the file."""
import os

import numpy as np
import pytest
from PIL import Image

from tokenreduce.images import load_images


@pytest.fixture
def folder(tmp_path):
    Image.fromarray(np.full((20, 30, 3), 7, np.uint8)).save(tmp_path / "ok.png")
    good = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image\n")
    (tmp_path / "corrupt.png").write_bytes(good[: len(good) // 2] + os.urandom(len(good)))
    return tmp_path


@pytest.mark.parametrize("name,why", [("empty", "is empty"), ("text", "not an image"),
                                      ("corrupt", "cannot read")])
def test_unreadable_image_is_a_value_error_naming_the_file(folder, name, why):
    with pytest.raises(ValueError, match=f"tokenreduce.images: .*{name}.png.*") as e:
        load_images([folder / f"{name}.png"])
    assert why in str(e.value)


def test_readable_image(folder):
    (name, im), = load_images([folder / "ok.png"])
    assert name == "ok" and im.size == (30, 20) and im.mode == "RGB"


def test_missing_path(folder):
    with pytest.raises(FileNotFoundError, match="is not a file or directory"):
        load_images([folder / "nope.png"])
