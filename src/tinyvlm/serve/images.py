"""Images of chat requests: ``image_url`` parts as ``data:`` URLs or ``http(s)://`` addresses -> PIL images,
within the server's limits. Blocking (decoding and fetching): the server runs these in threads.

* a ``data:`` URL must be base64 (``data:image/png;base64,...``); its size is checked before decoding;
* an http(s) address is fetched with a timeout and at most ``max_image_bytes`` read; it is refused at once
  when ``HF_HUB_OFFLINE=1`` is set (the machine is meant to be offline), and any failure to fetch is a 400
  that says to send the image inline instead;
* the pixel count is checked from the image header, before the pixels are decoded.

Too large (bytes or pixels) is a 413; anything else unreadable a 400.
"""

from __future__ import annotations

import base64
import binascii
import io
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from tinyvlm import __version__
from tinyvlm.hub import offline
from tinyvlm.serve.protocol import APIError

CHUNK = 64 * 1024


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int
    max_pixels: int
    fetch_timeout: float


def read_image(url: str, limits: ImageLimits, param: str) -> Image.Image:
    """The decoded RGB-or-other-mode PIL image an ``image_url`` names; `APIError` 400 / 413 otherwise."""
    if url.startswith("data:"):
        data = data_url_bytes(url, limits, param)
    elif url.startswith(("http://", "https://")):
        data = fetch(url, limits, param)
    else:
        scheme = url.split(":", 1)[0] if ":" in url else url[:20]
        raise APIError(
            400, f"{param}: an image URL is a data: URL (data:image/png;base64,...) or an http(s) address, "
            f"not {scheme!r}", param=param,
        )
    return decode(data, limits, param)


def data_url_bytes(url: str, limits: ImageLimits, param: str) -> bytes:
    """The bytes of ``data:[<media type>];base64,<data>``."""
    header, comma, payload = url[len("data:") :].partition(",")
    if not comma or not header.endswith(";base64"):
        raise APIError(400, f"{param}: a data: URL must be base64-encoded: data:image/png;base64,<data>", param=param)
    media_type = header[: -len(";base64")]
    if media_type and not media_type.startswith("image/"):
        raise APIError(400, f"{param}: the data: URL holds {media_type!r}, not an image", param=param)
    if len(payload) * 3 // 4 > limits.max_bytes + 2:  # checked before decoding
        _too_many_bytes(len(payload) * 3 // 4, limits, param)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as error:
        raise APIError(400, f"{param}: the data: URL is not valid base64 ({error})", param=param) from None
    if len(data) > limits.max_bytes:
        _too_many_bytes(len(data), limits, param)
    return data


def fetch(url: str, limits: ImageLimits, param: str) -> bytes:
    """Download an http(s) image: ``fetch_timeout`` seconds in all, ``max_bytes`` at most."""
    inline = "send the image inline as a data: URL (data:image/png;base64,...)"
    if offline():
        raise APIError(
            400, f"{param}: image URLs are not fetched offline (HF_HUB_OFFLINE=1 is set); {inline}", param=param
        )
    deadline = time.monotonic() + limits.fetch_timeout
    request = urllib.request.Request(url, headers={"User-Agent": f"tinyvlm/{__version__}"})
    try:
        with urllib.request.urlopen(request, timeout=limits.fetch_timeout) as response:
            declared = response.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > limits.max_bytes:
                _too_many_bytes(int(declared), limits, param)
            data = bytearray()
            while chunk := response.read1(CHUNK):  # what has arrived: the deadline is checked as bytes come
                data += chunk
                if len(data) > limits.max_bytes:
                    _too_many_bytes(len(data), limits, param)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"not complete after {limits.fetch_timeout:g} s")
            return bytes(data)
    except urllib.error.HTTPError as error:
        raise APIError(400, f"{param}: fetching {url} answered HTTP {error.code}; {inline}", param=param) from None
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", None) or error
        raise APIError(400, f"{param}: cannot fetch {url} ({reason}); {inline}", param=param) from None


def decode(data: bytes, limits: ImageLimits, param: str) -> Image.Image:
    """Bytes -> a loaded PIL image; the pixel limit is checked on the header, before decoding."""
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
    except Image.DecompressionBombError as error:
        raise APIError(413, f"{param}: {error}", param=param) from None
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise APIError(400, f"{param}: not an image that can be read ({error})", param=param) from None
    if width * height > limits.max_pixels:
        raise APIError(
            413, f"{param}: the image is {width}x{height} = {width * height} pixels, more than this server takes "
            f"({limits.max_pixels}, --max-image-pixels); send a smaller image", param=param,
        )
    try:
        image.load()
    except (OSError, ValueError, SyntaxError) as error:  # truncated or corrupt pixel data
        raise APIError(400, f"{param}: the image is broken ({error})", param=param) from None
    return image


def _too_many_bytes(size: int, limits: ImageLimits, param: str) -> None:
    raise APIError(
        413, f"{param}: the image is {size} bytes or more, more than this server takes ({limits.max_bytes}, "
        "--max-image-bytes); send a smaller image", param=param,
    )
