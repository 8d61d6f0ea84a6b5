"""The one PNG codec of the serving path: Render's PNG encoding, generated samples, sinks, the client.

Encoding settings are fixed (OpenCV, zlib level 3), so the same array always gives the same bytes
(samples are compared byte for byte across runs and deployments). RGB arrays are stored as RGB
(OpenCV's BGR order is converted here and only here); label maps keep their integer type
(uint8 class ids, uint16 instance ids). Encoding takes milliseconds to seconds for large fields:
callers on an event loop run it in a worker thread (``asyncio.to_thread``).
"""

from __future__ import annotations

from typing import Final

import cv2
import numpy as np

PNG_COMPRESSION: Final = 3  # zlib level: a fair size/speed trade for 8-bit tissue images
LABEL_DTYPES: Final = (np.dtype(np.uint8), np.dtype(np.uint16))


def encode_png(array: np.ndarray) -> bytes:
    """uint8 RGB [H, W, 3] -> PNG (RGB); uint8/uint16 [H, W] label map -> grey PNG of that depth.

    Raises ValueError naming the shape and dtype for anything else (e.g. a float image).
    """
    array = np.ascontiguousarray(array)
    if array.ndim == 3 and array.shape[2] == 3 and array.dtype == np.uint8:
        data = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    elif array.ndim == 2 and array.dtype in LABEL_DTYPES:
        data = array
    else:
        raise ValueError(
            f"PNG encoding takes uint8 RGB [H, W, 3] or uint8/uint16 [H, W] maps, got {array.dtype} {list(array.shape)}"
        )
    ok, buffer = cv2.imencode(".png", data, [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION])
    if not ok:
        raise RuntimeError(f"PNG encoding failed for {array.dtype} {list(array.shape)}")
    return buffer.tobytes()


def encode_label_png(array: np.ndarray, dtype: type[np.integer]) -> bytes:
    """A label map cast to ``dtype`` (uint8 classes, uint16 instances), as a lossless PNG."""
    return encode_png(np.ascontiguousarray(array, dtype=dtype))


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes -> uint8 RGB [H, W, 3] for colour images, or the stored [H, W] map (uint8/uint16) unchanged.

    For trusted bytes (our own outputs, files written by the sink); servers decoding untrusted
    uploads check sizes first (services.scoring.images). Raises ValueError when not a PNG.
    """
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if decoded is None:
        raise ValueError(f"not a decodable PNG ({len(data)} bytes)")
    if decoded.ndim == 3:
        if decoded.shape[2] == 4:
            decoded = decoded[..., :3]
        return cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)
    return decoded
