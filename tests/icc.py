"""ICC profiles the tests build themselves (a matrix/TRC display profile, ICC v2), and the colour
arithmetic that says what such a profile means in sRGB: an independent reference for the conversion."""

import struct

import numpy as np

D50 = (0.9642, 1.0, 0.8249)  # the profile connection space's white
# sRGB's primaries adapted to D50 (Bradford), as columns R, G, B of the RGB -> XYZ(D50) matrix
SRGB_D50 = np.array([[0.4361, 0.3851, 0.1431], [0.2225, 0.7169, 0.0606], [0.0139, 0.0971, 0.7141]])
PROPHOTO_D50 = np.array([[0.7977, 0.1352, 0.0313], [0.2880, 0.7119, 0.0001], [0.0, 0.0, 0.8249]])


def _s15(v: float) -> bytes:
    return struct.pack(">i", round(v * 65536))


def _xyz(x, y, z) -> bytes:
    return b"XYZ " + bytes(4) + _s15(x) + _s15(y) + _s15(z)


def _curve(gamma: float) -> bytes:
    return b"curv" + bytes(4) + struct.pack(">IH", 1, round(gamma * 256)) + bytes(2)


def _desc(text: str) -> bytes:
    ascii_ = text.encode() + b"\0"
    return b"desc" + bytes(4) + struct.pack(">I", len(ascii_)) + ascii_ + bytes(4 + 4 + 2 + 1 + 67)


def rgb_profile(matrix: np.ndarray, gamma: float, name: str = "zipchat test profile") -> bytes:
    """An RGB display profile: linear = (value / 255) ** gamma per channel, XYZ(D50) = matrix @ linear."""
    tags = [(b"desc", _desc(name)), (b"wtpt", _xyz(*D50)), (b"cprt", b"text" + bytes(4) + b"none\0")]
    tags += [(sig, _xyz(*matrix[:, i])) for i, sig in enumerate((b"rXYZ", b"gXYZ", b"bXYZ"))]
    tags += [(sig, _curve(gamma)) for sig in (b"rTRC", b"gTRC", b"bTRC")]
    table_end = 128 + 4 + 12 * len(tags)
    offsets, data, at = [], b"", table_end
    for _, body in tags:
        body += bytes(-len(body) % 4)
        offsets.append((at, len(body)))
        data += body
        at += len(body)
    table = struct.pack(">I", len(tags)) + b"".join(sig + struct.pack(">II", o, n) for (sig, _), (o, n)
                                                     in zip(tags, offsets))
    header = struct.pack(">I", at) + bytes(4) + struct.pack(">I", 0x02100000) + b"mntrRGB XYZ " + bytes(12)
    header += b"acsp" + bytes(4 + 4 + 4 + 4 + 8 + 4) + b"".join(_s15(v) for v in D50) + bytes(4 + 16 + 28)
    assert len(header) == 128
    return header + table + data


def to_srgb_reference(pixels: np.ndarray, matrix: np.ndarray, gamma: float) -> np.ndarray:
    """uint8 (..., 3) in the profile rgb_profile(matrix, gamma) -> float sRGB 0..255 (colorimetric, clipped)."""
    linear = (pixels.astype(np.float64) / 255) ** gamma
    xyz = linear @ matrix.T
    srgb_linear = np.clip(xyz @ np.linalg.inv(SRGB_D50).T, 0, 1)
    encoded = np.where(srgb_linear <= 0.0031308, 12.92 * srgb_linear, 1.055 * srgb_linear ** (1 / 2.4) - 0.055)
    return encoded * 255
