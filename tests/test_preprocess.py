import io
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from model_store import InputSpec
from service.errors import PayloadTooLarge, Unprocessable, UnsupportedMediaType
from service.preprocess import PixelLimits, images_to_rows

GREY = InputSpec(channels=1, height=4, width=4, colour_mode="L", mean=[0.5], std=[0.25])
RGB = InputSpec(channels=3, height=2, width=2, colour_mode="RGB", mean=[0.0, 0.5, 1.0], std=[1.0, 1.0, 1.0])
ROOMY = PixelLimits(per_image=10**8, per_request=10**9)


def encoded(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array.astype(np.uint8)).save(buf, fmt)
    return buf.getvalue()


def blank_png(width: int, height: int) -> bytes:
    """A bomb in miniature: a few KB of PNG that decode into width x height pixels."""
    buf = io.BytesIO()
    Image.new("L", (width, height)).save(buf, "PNG", optimize=True)
    return buf.getvalue()


def test_grey_png_at_model_size_is_only_normalised():
    pixels = np.arange(16, dtype=np.uint8).reshape(4, 4) * 16
    rows = images_to_rows([("a", encoded(pixels))], GREY, ROOMY)
    np.testing.assert_allclose(rows[0, 0], (pixels / 255.0 - 0.5) / 0.25, atol=1e-6)  # float32


def test_colour_image_is_converted_and_resized_per_spec():
    data = encoded(np.full((10, 6, 3), (255, 0, 128)))
    rows = images_to_rows([("b", data)], RGB, ROOMY)
    assert rows.shape == (1, 3, 2, 2) and rows.dtype == np.float32
    np.testing.assert_allclose(rows[0, :, 0, 0], [1.0, -0.5, 128 / 255 - 1.0], atol=1e-6)
    assert images_to_rows([("b", data)], GREY, ROOMY).shape == (1, 1, 4, 4)


def test_large_jpeg_decodes_in_draft_mode_to_the_same_answer():
    # a flat colour survives any scale: draft mode must not change what the model sees
    data = encoded(np.full((800, 800, 3), (200, 100, 50)), "JPEG")
    rows = images_to_rows([("c", data)], RGB, ROOMY)
    np.testing.assert_allclose(rows[0, :, 0, 0], [200 / 255, 100 / 255 - 0.5, 50 / 255 - 1.0], atol=0.02)


@pytest.mark.parametrize("data, error, message", [
    (b"", Unprocessable, "x is empty"),
    (b"hello world", UnsupportedMediaType, "not an image"),
])
def test_unusable_bytes_name_the_image_and_the_problem(data, error, message):
    with pytest.raises(error, match=message):
        images_to_rows([("x", data)], GREY, ROOMY)


def test_truncated_image_is_unprocessable():
    data = encoded(np.random.default_rng(0).integers(0, 256, (64, 64)))
    with pytest.raises(Unprocessable, match="truncated or corrupt"):
        images_to_rows([("y", data[: len(data) * 2 // 3])], GREY, ROOMY)


def test_formats_outside_the_list_are_refused():
    buf = io.BytesIO()
    Image.new("L", (4, 4)).save(buf, "PPM")
    with pytest.raises(UnsupportedMediaType, match="is PPM; accepted formats"):
        images_to_rows([("z", buf.getvalue())], GREY, ROOMY)


def peak_memory_growth(images: list[tuple[str, bytes]], limits: PixelLimits) -> tuple[int, str]:
    """Run ``images_to_rows`` in a fresh process; return how far its peak RSS rose (bytes) and the
    error's type name ('' when it returned). Pillow allocates outside Python's tracked heap, so the
    operating system's peak (VmHWM, which unlike ru_maxrss is not inherited across exec) is the
    honest measure."""
    code = textwrap.dedent("""
        import pickle, re, sys
        from service.preprocess import PixelLimits, images_to_rows
        from tests.test_preprocess import GREY

        def peak():
            with open("/proc/self/status") as f:
                return int(re.search(r"VmHWM:\\s+(\\d+) kB", f.read()).group(1)) * 1024

        images, limits = pickle.load(sys.stdin.buffer)
        before = peak()
        try:
            images_to_rows(images, GREY, limits)
            error = ""
        except Exception as exc:
            error = type(exc).__name__
        print(peak() - before, error)
    """)
    out = subprocess.run([sys.executable, "-c", code], input=pickle.dumps((images, limits)), capture_output=True, check=True)
    growth, _, error = out.stdout.decode().strip().partition(" ")
    return int(growth), error


def test_an_image_over_the_pixel_limit_is_refused_from_its_header_alone():
    bomb = blank_png(8000, 7500)  # 60 megapixels in tens of KB
    with pytest.raises(PayloadTooLarge, match="8000x7500 = 60,000,000 pixels; the limit is 16,777,216 per image"):
        images_to_rows([("bomb", bomb)], GREY, PixelLimits(per_image=4096 * 4096, per_request=10**9))
    growth, error = peak_memory_growth([("bomb", bomb)] * 20, PixelLimits(per_image=4096 * 4096, per_request=10**9))
    assert error == "PayloadTooLarge" and growth < 20_000_000  # decoding one would take 60 MB


def test_many_images_under_the_per_image_limit_are_refused_by_the_request_limit_before_decoding():
    images = [(f"i{k}", blank_png(4000, 4000)) for k in range(5)]
    with pytest.raises(PayloadTooLarge, match="80,000,000 pixels together; the limit is 40,000,000 per request"):
        images_to_rows(images, GREY, PixelLimits(per_image=20_000_000, per_request=40_000_000))
    growth, error = peak_memory_growth(images, PixelLimits(per_image=20_000_000, per_request=40_000_000))
    assert error == "PayloadTooLarge" and growth < 10_000_000  # refused before the first 16 MB decode


def test_images_are_decoded_one_at_a_time():
    images = [(f"i{k}", blank_png(4000, 4000)) for k in range(6)]  # 16 MB each once decoded, 96 MB together
    assert images_to_rows(images, GREY, ROOMY).shape == (6, 1, 4, 4)
    growth, error = peak_memory_growth(images, ROOMY)
    assert error == "" and 10_000_000 < growth < 45_000_000
