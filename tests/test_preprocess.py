import io

import numpy as np
import pytest
from PIL import Image

from model_store import InputSpec
from service.errors import Unprocessable, UnsupportedMediaType
from service.preprocess import decode_image, to_rows

GREY = InputSpec(channels=1, height=4, width=4, colour_mode="L", mean=[0.5], std=[0.25])
RGB = InputSpec(channels=3, height=2, width=2, colour_mode="RGB", mean=[0.0, 0.5, 1.0], std=[1.0, 1.0, 1.0])


def encoded(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array.astype(np.uint8)).save(buf, fmt)
    return buf.getvalue()


def test_grey_png_at_model_size_is_only_normalised():
    pixels = np.arange(16, dtype=np.uint8).reshape(4, 4) * 16
    rows = to_rows([decode_image(encoded(pixels), "a")], GREY)
    np.testing.assert_allclose(rows[0, 0], (pixels / 255.0 - 0.5) / 0.25, atol=1e-6)  # float32


def test_colour_image_is_converted_and_resized_per_spec():
    image = decode_image(encoded(np.full((10, 6, 3), (255, 0, 128))), "b")
    rows = to_rows([image], RGB)
    assert rows.shape == (1, 3, 2, 2) and rows.dtype == np.float32
    np.testing.assert_allclose(rows[0, :, 0, 0], [1.0, -0.5, 128 / 255 - 1.0], atol=1e-6)
    grey = to_rows([image], GREY)
    assert grey.shape == (1, 1, 4, 4)


def test_jpeg_decodes():
    assert decode_image(encoded(np.zeros((8, 8, 3)), "JPEG"), "c").format == "JPEG"


@pytest.mark.parametrize("data, error, message", [
    (b"", Unprocessable, "x is empty"),
    (b"hello world", UnsupportedMediaType, "not an image"),
])
def test_unusable_bytes_name_the_image_and_the_problem(data, error, message):
    with pytest.raises(error, match=message):
        decode_image(data, "x")


def test_truncated_image_is_unprocessable():
    data = encoded(np.random.default_rng(0).integers(0, 256, (64, 64)))
    with pytest.raises(Unprocessable, match="truncated or corrupt"):
        decode_image(data[: len(data) * 2 // 3], "y")


def test_formats_outside_the_list_are_refused():
    buf = io.BytesIO()
    Image.new("L", (4, 4)).save(buf, "PPM")
    with pytest.raises(UnsupportedMediaType, match="is PPM; accepted formats"):
        decode_image(buf.getvalue(), "z")
