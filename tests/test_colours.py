"""The model sees the picture a viewer shows: transparency composited onto white (never the hidden
pixels), embedded colour profiles converted to sRGB, iPhone HEIC photos decoded upright. Each case is
checked against an independent reference (numpy compositing, colour arithmetic from the profile's own
primaries) on what the model receives and on what the map draws."""

import io

import numpy as np
import pytest
from PIL import Image

from pipeline import ChatSession
from pipeline.heatmap import layout, render_map
from pipeline.images import load_image
from tests.icc import PROPHOTO_D50, SRGB_D50, rgb_profile, to_srgb_reference

WHITE = np.array([255.0, 255.0, 255.0])


def encoded(image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **options)
    return buf.getvalue()


def over_white(rgba: np.ndarray) -> np.ndarray:
    """The reference: straight alpha over a white page."""
    a = rgba[..., 3:4].astype(np.float64) / 255
    return rgba[..., :3] * a + WHITE * (1 - a)


def logo_rgba() -> np.ndarray:
    """A black disc on a fully transparent (black) background, a half-transparent grey ring around it."""
    yy, xx = np.mgrid[:80, :120]
    r = np.hypot(yy - 40, xx - 60)
    a = np.zeros((80, 120, 4), np.uint8)
    a[r < 25] = (0, 0, 0, 255)
    a[(r >= 25) & (r < 32)] = (40, 40, 40, 128)
    return a


def erased_photo() -> np.ndarray:
    """A red/blue photo whose left half was erased (alpha 0), the colour still stored under it."""
    a = np.zeros((60, 100, 4), np.uint8)
    a[..., 0], a[..., 2], a[..., 3] = 200, 30, 255
    a[:, :50, 3] = 0
    return a


def model_pixels(vlm, source) -> np.ndarray:
    """What a session keeps for the model (the processor's input) for `source`."""
    s = ChatSession(vlm, method="full")
    s.add_image(source, compress=False)
    return s.state.images[s.state.last_image_key].astype(np.float64), s


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
@pytest.mark.parametrize("which", ["logo", "erased"])
def test_transparency_is_composited_onto_white(fmt, which, tiny_llava):
    rgba = logo_rgba() if which == "logo" else erased_photo()
    data = encoded(Image.fromarray(rgba, "RGBA"), fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    got, _ = model_pixels(tiny_llava, data)
    np.testing.assert_allclose(got, over_white(rgba), atol=1.01)
    if which == "erased":  # the hidden colour never comes back: the erased half is the page's white
        assert (got[:, :50] == 255).all() and np.abs(got[:, 50:] - (200, 0, 30)).max() <= 1


def test_greyscale_alpha_palette_and_colour_key_transparency(tiny_llava):
    rgba = logo_rgba()
    la = Image.fromarray(np.stack([rgba[..., 0], rgba[..., 3]], -1), "LA")
    palette = Image.new("P", (40, 20), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.paste(1, (20, 0, 40, 20))  # right half: opaque red; left half: index 0, the transparent colour
    key = Image.new("RGB", (40, 20), (10, 20, 30))
    key.paste((0, 200, 0), (0, 0, 20, 20))
    cases = {
        "LA": (encoded(la, "PNG"), over_white(np.dstack([np.repeat(rgba[..., :1], 3, -1), rgba[..., 3:]]))),
        "P + tRNS": (encoded(palette, "PNG", transparency=0),
                     np.concatenate([np.full((20, 20, 3), 255.0), np.tile([255.0, 0, 0], (20, 20, 1))], 1)),
        "RGB + colour key": (encoded(key, "PNG", transparency=(10, 20, 30)),
                             np.concatenate([np.tile([0, 200.0, 0], (20, 20, 1)), np.full((20, 20, 3), 255.0)], 1)),
    }
    for name, (data, expected) in cases.items():
        got, _ = model_pixels(tiny_llava, data)
        np.testing.assert_allclose(got, expected, atol=1.01, err_msg=name)
    assert model_pixels(tiny_llava, cases["P + tRNS"][0])[0][:, :20].mean() == 255  # not 74% black


COLOURS = np.array([[200, 60, 30], [40, 120, 200], [90, 160, 60], [128, 128, 128], [230, 200, 120]], np.uint8)


def colour_blocks(side=48) -> np.ndarray:
    """Blocks of COLOURS side by side, each `side` pixels square."""
    return np.concatenate([np.full((side, side, 3), c, np.uint8) for c in COLOURS], 1)


@pytest.mark.parametrize("profile", ["swapped red and green", "ProPhoto"])
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_colour_profiles_are_converted_to_srgb(profile, fmt, tiny_llava):
    matrix, gamma = (SRGB_D50[:, [1, 0, 2]], 2.2) if profile.startswith("swapped") else (PROPHOTO_D50, 1.8)
    stored = colour_blocks()
    data = encoded(Image.fromarray(stored), fmt, icc_profile=rgb_profile(matrix, gamma),
                   **({"quality": 100, "subsampling": 0} if fmt == "JPEG" else {}))
    got, _ = model_pixels(tiny_llava, data)
    expected = to_srgb_reference(stored, matrix, gamma)
    centre = (slice(8, 40), slice(None))  # (JPEG blurs block edges)
    err = np.abs(got - expected)[centre]
    assert err.mean() < (1.0 if fmt == "PNG" else 2.0) and err.max() < (3 if fmt == "PNG" else 8), err.max()
    if profile.startswith("swapped"):  # what the browser shows: red and green exchanged back
        block = got[24, 24]
        assert block[1] > 150 and block[0] < 100  # (200, 60, 30) stored -> about (57, 201, 24) seen
    else:  # ProPhoto's wide gamut: its (200, 60, 30) is a red beyond sRGB's, not the dull one the numbers read as
        block = got[24, 24]
        assert block[0] - block[1] > 200 > 140


def test_an_unusable_profile_is_ignored_not_fatal():
    data = encoded(Image.fromarray(colour_blocks()), "PNG", icc_profile=b"not a profile at all" * 10)
    np.testing.assert_array_equal(np.asarray(load_image(data)), colour_blocks())


def test_the_map_draws_what_the_model_sees(tiny_ov_large):
    """Full method, kept view: every patch clear, so the map's photo is the converted, composited image
    (OneVision: the base image shows the whole photo)."""
    stored = colour_blocks(side=64)
    rgba = np.dstack([stored, np.full(stored.shape[:2], 255, np.uint8)])
    rgba[:, :64, 3] = 0  # the first block erased
    data = encoded(Image.fromarray(rgba, "RGBA"), "PNG", icc_profile=rgb_profile(SRGB_D50[:, [1, 0, 2]], 2.2))
    got, s = model_pixels(tiny_ov_large, data)
    comp = s.compression(s.state.last_image_key)
    drawn = np.asarray(render_map(s.image(s.state.last_image_key), comp, "kept"), dtype=np.float64)
    expected = to_srgb_reference(stored, SRGB_D50[:, [1, 0, 2]], 2.2)
    expected[:, :64] = 255
    panel = layout(comp)[0]  # where the image's pixels land on the canvas
    (ox, oy), (sx, sy), (rx0, ry0, rx1, ry1) = panel.origin, panel.scale, panel.region
    checked = 0
    for i in range(len(COLOURS)):  # the centre of each block that the crop shows, on the map
        cx, cy = 64 * i + 32, 32
        if rx0 + 8 <= cx <= rx1 - 8 and ry0 + 8 <= cy <= ry1 - 8:
            pixel = drawn[round(oy + (cy - ry0) * sy), round(ox + (cx - rx0) * sx)]
            assert np.abs(pixel - expected[cy, cx]).max() <= 3, (i, pixel, expected[cy, cx])
            checked += 1
    assert checked >= 3


# ---- iPhone photos ---------------------------------------------------------------------------------
heif = pytest.importorskip("pillow_heif")


def iphone_heic(stored: np.ndarray, orientation: int = 6, profile: bytes | None = None) -> bytes:
    """A HEIC as an iPhone writes it: the sensor's pixels, an EXIF orientation, maybe a colour profile
    (pillow-heif turns the orientation into the container's rotation, as iPhones do)."""
    image = Image.fromarray(stored)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encoded(image, "HEIF", exif=exif.tobytes(), quality=95, **({"icc_profile": profile} if profile else {}))


def test_heic_is_decoded_upright_with_its_profile(tiny_ov_large, tmp_path):
    stored = colour_blocks(side=40)  # (40, 200, 3): stored landscape, shown portrait (orientation 6)
    path = tmp_path / "IMG_0001.HEIC"
    path.write_bytes(iphone_heic(stored, 6, rgb_profile(SRGB_D50[:, [1, 0, 2]], 2.2)))
    got, s = model_pixels(tiny_ov_large, path)
    assert got.shape == (200, 40, 3)  # turned once: upright, not twice
    expected = np.rot90(to_srgb_reference(stored, SRGB_D50[:, [1, 0, 2]], 2.2), -1)
    assert np.abs(got - expected)[:, 8:32].mean() < 6  # (HEVC is lossy)
    assert s.ask("What is it?") is not None and s.last_turn.visual_tokens > 0


def test_premultiplied_grey_with_alpha_is_composited_like_any_transparency():
    """PIL's "La" (grey premultiplied by alpha) converts to no other mode; it reaches the model composited onto
    white: premultiplied grey + (255 - alpha), the compositing rule for premultiplied pixels."""
    from pipeline.images import load_image
    la = np.zeros((30, 40, 2), np.uint8)
    la[..., 1] = np.linspace(0, 255, 40).astype(np.uint8)[None]
    la[..., 0] = la[..., 1].astype(int) * 200 // 255  # grey 200, premultiplied
    image = Image.frombytes("La", (40, 30), la.tobytes())
    got = np.asarray(load_image(image)).astype(int)
    assert got.shape == (30, 40, 3) and (got == got[..., :1]).all()
    assert np.abs(got[..., 0] - (la[..., 0].astype(int) + 255 - la[..., 1])).max() <= 1
