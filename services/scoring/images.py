"""Image sets for scoring: PNG decoding, shape checks, and float model input; numpy only.

An image set is a list of uint8 RGB arrays [H, W, 3]; sizes may differ between images (PNGs
of several sizes), and the models that take them run one batch per size. A uint8 tensor
[N, H, W, 3] is the special case where every image has the same size.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Sequence
from typing import Final

import cv2
import numpy as np

from services.core.errors import InvalidInputError

PNG_SIGNATURE: Final = b"\x89PNG\r\n\x1a\n"
# Refuse images whose header claims more pixels than this before decoding them (a small PNG can
# claim a gigapixel canvas); 8192 x 8192 RGB is 192 MiB decoded.
MAX_PIXELS_PER_IMAGE: Final = 8192 * 8192

ImageList = list[np.ndarray]


# All PNGs of one request together decode to at most this many bytes (uint8 RGB, 3 bytes per pixel),
# checked from their headers before any is decoded: a 1 MB request of all-zero 8192 x 8192 PNGs would
# otherwise decode to gigabytes. 512 MiB is e.g. 2700 images of 256 x 256, or two of 8192 x 8192.
MAX_DECODED_BYTES_PER_REQUEST: Final = 512 * 1024 * 1024
DECODED_BYTES_PER_PIXEL: Final = 3


def png_size(data: bytes, name: str) -> tuple[int, int]:
    """(height, width) from a PNG's IHDR chunk; InvalidInputError when ``data`` is not a PNG."""
    if len(data) < 24 or not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        raise InvalidInputError(f"{name}: not a PNG (missing PNG signature / IHDR header)")
    width, height = struct.unpack(">II", data[16:24])
    return int(height), int(width)


def check_png_headers(
    pngs: Sequence[bytes], name: str, max_total_bytes: int = MAX_DECODED_BYTES_PER_REQUEST
) -> list[tuple[int, int]]:
    """Every PNG's (height, width) from its header, refusing any image, or the set, too large to decode.

    Reads 24 bytes per image, so a request is judged by what it would cost before a single pixel
    is decoded.
    """
    sizes = []
    for index, data in enumerate(pngs):
        height, width = png_size(data, f"{name}[{index}]")
        if height * width > MAX_PIXELS_PER_IMAGE or height == 0 or width == 0:
            raise InvalidInputError(
                f"{name}[{index}]: PNG is {height} x {width}; images must have 1 to {MAX_PIXELS_PER_IMAGE} pixels"
            )
        sizes.append((height, width))
    total = sum(height * width for height, width in sizes) * DECODED_BYTES_PER_PIXEL
    if total > max_total_bytes:
        raise InvalidInputError(
            f"{name}: {len(sizes)} PNGs decode to {total / 2**20:.0f} MiB, more than the limit of "
            f"{max_total_bytes / 2**20:.0f} MiB per request; send fewer or smaller images, or stream them "
            "with ScoreImageStream"
        )
    return sizes


def decode_png(data: bytes, name: str) -> np.ndarray:
    """PNG bytes -> uint8 RGB [H, W, 3]; 8-bit grey and RGBA are converted, 16-bit is refused."""
    height, width = png_size(data, name)
    if height * width > MAX_PIXELS_PER_IMAGE or height == 0 or width == 0:
        raise InvalidInputError(
            f"{name}: PNG is {height} x {width}; images must have 1 to {MAX_PIXELS_PER_IMAGE} pixels"
        )
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if decoded is None:
        raise InvalidInputError(f"{name}: the PNG could not be decoded (truncated or corrupt data)")
    if decoded.dtype != np.uint8:
        raise InvalidInputError(f"{name}: PNG has {decoded.dtype} samples; send 8-bit images")
    if decoded.ndim == 2:
        return cv2.cvtColor(decoded, cv2.COLOR_GRAY2RGB)
    if decoded.shape[2] == 4:
        return cv2.cvtColor(decoded, cv2.COLOR_BGRA2RGB)
    if decoded.shape[2] == 3:
        return cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)
    raise InvalidInputError(f"{name}: PNG has {decoded.shape[2]} channels; send grey, RGB or RGBA")


def decode_pngs(pngs: Sequence[bytes], name: str) -> ImageList:
    """Decode every PNG after checking all their headers (sizes and total bytes) first."""
    check_png_headers(pngs, name)
    return [decode_png(data, f"{name}[{index}]") for index, data in enumerate(pngs)]


async def decode_pngs_off_loop(pngs: Sequence[bytes], name: str) -> ImageList:
    """decode_pngs with the cheap header checks inline and the decoding in a worker thread.

    Decoding a large PNG takes seconds; on the event loop it would stall every other call of the
    server, health checks included.
    """
    check_png_headers(pngs, name)
    return await asyncio.to_thread(lambda: [decode_png(data, f"{name}[{index}]") for index, data in enumerate(pngs)])


def as_image_list(images: np.ndarray | Sequence[np.ndarray], name: str, *, allow_empty: bool = False) -> ImageList:
    """uint8 [N, H, W, 3], [H, W, 3] or a sequence of [H, W, 3] -> list of uint8 [H, W, 3]."""
    if isinstance(images, np.ndarray):
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4:
            raise InvalidInputError(f"{name}: expected uint8 [N, H, W, 3], got shape {list(images.shape)}")
        items = list(images)
    else:
        items = [np.asarray(image) for image in images]
    for index, image in enumerate(items):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise InvalidInputError(
                f"{name}[{index}]: expected uint8 RGB [H, W, 3], got {image.dtype} {list(image.shape)}"
            )
        if image.shape[0] == 0 or image.shape[1] == 0:
            raise InvalidInputError(f"{name}[{index}]: image is empty (shape {list(image.shape)})")
    if not items and not allow_empty:
        raise InvalidInputError(f"{name}: no images; send at least one")
    return items


def groups_by_size(images: Sequence[np.ndarray]) -> dict[tuple[int, int], list[int]]:
    """Image indices grouped by (H, W), in first-seen order: one model batch per size."""
    groups: dict[tuple[int, int], list[int]] = {}
    for index, image in enumerate(images):
        groups.setdefault((int(image.shape[0]), int(image.shape[1])), []).append(index)
    return groups


def to_model_input(
    images: Sequence[np.ndarray], input_range: tuple[float, float], dtype: np.dtype = np.dtype(np.float32)
) -> np.ndarray:
    """Same-size uint8 RGB [H, W, 3] images -> [N, 3, H, W] with 0..255 mapped linearly onto ``input_range``."""
    low, high = input_range
    batch = np.stack(images).astype(np.float32).transpose(0, 3, 1, 2)
    if (low, high) != (0.0, 255.0):
        batch = batch * np.float32((high - low) / 255.0) + np.float32(low)
    return np.ascontiguousarray(batch, dtype=dtype)


def resize_images(images: Sequence[np.ndarray], size: tuple[int, int]) -> ImageList:
    """Bilinear resize to (height, width) (for extractors whose graph takes one fixed size)."""
    height, width = size
    return [
        image if image.shape[:2] == (height, width)
        else cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
        for image in images
    ]
