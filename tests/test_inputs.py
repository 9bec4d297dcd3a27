"""The images people have reach the model as they see them: phone photos turned by their EXIF
orientation (from a path, bytes, or a PIL image carrying the tag), 16-bit and 32-bit images and numpy
arrays of any dtype mapped to 8 bits without washing out or wrapping."""

import io

import numpy as np
import pytest
from PIL import Image

from pipeline import ChatSession, InputError
from pipeline.images import load_image

# What a viewer shows for each EXIF orientation, as an operation on the stored pixels (the EXIF spec)
DISPLAYED = {3: lambda a: np.rot90(a, 2), 6: lambda a: np.rot90(a, -1), 8: lambda a: np.rot90(a, 1),
             5: lambda a: np.transpose(a, (1, 0, 2)), 7: lambda a: np.rot90(np.transpose(a, (1, 0, 2)), 2)}


def stored_pixels():
    """60x30 blocks of distinct colours, so any turn or mirror is visible after JPEG."""
    a = np.zeros((30, 60, 3), np.uint8)
    a[:15, :30], a[:15, 30:], a[15:, :30], a[15:, 30:] = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)
    return a


def phone_jpeg(orientation: int) -> bytes:
    image = Image.fromarray(stored_pixels())
    exif = image.getexif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=95, exif=exif)
    return buf.getvalue()


@pytest.mark.parametrize("orientation", sorted(DISPLAYED))
def test_exif_orientation_is_applied_wherever_an_image_enters(orientation, tmp_path):
    data = phone_jpeg(orientation)
    path = tmp_path / "phone.jpg"
    path.write_bytes(data)
    expected = DISPLAYED[orientation](stored_pixels()).astype(float)
    for source in (path, str(path), data, Image.open(io.BytesIO(data))):
        got = np.asarray(load_image(source)).astype(float)
        assert got.shape == expected.shape, (orientation, type(source))
        assert np.abs(got - expected).mean() < 8, (orientation, type(source))  # JPEG noise, not a turn


def test_a_phone_photo_reaches_the_model_upright(tiny_ov_large, tmp_path):
    path = tmp_path / "phone.jpg"
    path.write_bytes(phone_jpeg(6))
    s = ChatSession(tiny_ov_large, method="visionzip")
    comp = s.add_image(path)
    assert comp.image_size == (60, 30)  # (height, width) as displayed, not the stored 30x60
    assert s.state.images[s.state.last_image_key].shape == (60, 30, 3)


def test_16_bit_greyscale_png_keeps_its_tones(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (32, 1))  # (32, 256), 0..65535
    path = tmp_path / "scan16.png"
    Image.fromarray(ramp).save(path)  # PIL writes mode I;16
    assert Image.open(path).mode.startswith("I;16")
    got = np.asarray(load_image(path))
    assert got.dtype == np.uint8 and got.shape == (32, 256, 3)
    np.testing.assert_allclose(got[..., 0].astype(float), ramp / 257.0, atol=1)
    assert (got == 255).mean() < 0.01  # not washed out to white


@pytest.mark.parametrize("mode", ["I;16B", "I;16L"])
def test_16_bit_byte_orders(mode):
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (8, 1))
    image = Image.frombytes(mode, (64, 8), ramp.astype(">u2" if mode.endswith("B") else "<u2").tobytes())
    np.testing.assert_allclose(np.asarray(load_image(image))[..., 1].astype(float), ramp / 257.0, atol=1)


@pytest.mark.parametrize("mode, values", [("I", np.linspace(-70000, 900000, 64)), ("F", np.linspace(-1.5, 2.5, 64))])
def test_32_bit_images_are_stretched_over_their_range(mode, values):
    image = Image.fromarray(np.tile(values, (8, 1)).astype(np.int32 if mode == "I" else np.float32), mode)
    got = np.asarray(load_image(image))[0, :, 0].astype(float)
    np.testing.assert_allclose(got, (values - values.min()) / (values.max() - values.min()) * 255, atol=1)


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.float32, np.float64, np.int8])
def test_arrays_of_any_dtype_do_not_wrap(dtype):
    info = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else None
    low, high = (info.min, info.max) if info else (-3.0, 7.0)
    values = np.linspace(low, high, 50)
    a = np.repeat(np.tile(values, (6, 1))[..., None], 3, -1).astype(dtype)
    got = np.asarray(load_image(a))[0, :, 0].astype(float)
    reference = (a[0, :, 0].astype(float) - float(a.min())) / (float(a.max()) - float(a.min())) * 255
    np.testing.assert_allclose(got, reference, atol=1)
    assert np.all(np.diff(got) >= 0)  # monotone: nothing wrapped round


def test_arrays_of_other_shapes_are_refused():
    for bad in (np.zeros((4, 4, 2), np.uint8), np.zeros((2, 2, 2, 3), np.uint8), np.zeros((0, 3), np.uint8)):
        with pytest.raises(InputError, match="not an image"):
            load_image(bad)
    assert load_image(np.zeros((5, 7, 1), np.uint8)).size == (7, 5)
    assert np.asarray(load_image(np.eye(4, dtype=bool)))[0, 0, 0] == 255
