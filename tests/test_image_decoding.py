"""Images decode as a viewer shows them: EXIF orientation, 16-bit, palette, alpha, CMYK; bad files are named."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from xllm.processors.image import open_image


def pixels(path) -> np.ndarray:
    return np.asarray(open_image(path))


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (2, 1))
    image.putpixel((0, 0), (255, 0, 0))
    image.putpixel((1, 0), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to view"
    image.save(tmp_path / "turned.png", exif=exif)
    shown = pixels(tmp_path / "turned.png")
    assert shown.shape == (2, 1, 3)  # a 2-wide image shown 2 high
    assert tuple(shown[0, 0]) == (255, 0, 0) and tuple(shown[1, 0]) == (0, 0, 255)


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    Image.fromarray(np.array([[0, 65535, 32896]], dtype=np.uint16)).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    assert pixels(tmp_path / "deep.png")[0, :, 0].tolist() == [0, 255, 128]


def test_transparency_is_laid_over_white(tmp_path):
    grey = Image.new("LA", (2, 1))
    grey.putpixel((0, 0), (100, 0))
    grey.putpixel((1, 0), (100, 255))
    grey.save(tmp_path / "la.png")
    assert pixels(tmp_path / "la.png").tolist() == [[[255, 255, 255], [100, 100, 100]]]
    palette = Image.new("P", (2, 1))
    palette.putpalette([10, 20, 30, 200, 0, 0] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.putpixel((1, 0), 1)
    palette.save(tmp_path / "p.png", transparency=0)
    assert pixels(tmp_path / "p.png").tolist() == [[[255, 255, 255], [200, 0, 0]]]


def test_cmyk_jpeg_comes_out_as_rgb(tmp_path):
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)
    red = pixels(tmp_path / "cmyk.jpg")[4, 4]
    assert red[0] > 200 and red[1] < 60 and red[2] < 60


def test_bad_files_and_bombs_are_refused_by_name(tmp_path, monkeypatch):
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "whole.png")
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot read image file .*cut.png"):
        open_image(tmp_path / "cut.png")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match="cannot read image file .*text.png"):
        open_image(tmp_path / "text.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # 64 pixels > twice the limit: a bomb
    with pytest.raises(ValueError, match="image file .*whole.png refused: .*decompression bomb"):
        open_image(tmp_path / "whole.png")
