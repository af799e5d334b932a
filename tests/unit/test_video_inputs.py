"""Video request validation, input image decoding and video encoding, without Ray."""

import base64
import io
import struct
import subprocess
import zlib

import imageio_ffmpeg
import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from deployments.video.encoding import encode_video
from serve_app.protocol.errors import RequestError
from serve_app.protocol.schemas import VideoRequest
from serve_app.services.inputs import decode_image, fit_image
from tests.helpers import image_b64, image_bytes

RED = Image.new("RGB", (96, 64), (200, 30, 30))


@pytest.mark.parametrize(
    "fields, loc, words",
    [
        ({}, (), "neither was given"),
        ({"prompt": "a fox", "width": 4096}, ("width",), "less than or equal to 2048"),
        ({"prompt": "a fox", "num_frames": 300}, ("num_frames",), "less than or equal to 257"),
        ({"prompt": "a fox", "interpolate": 3}, ("interpolate",), "2 or 4"),
        ({"prompt": "a fox", "fps": 0}, ("fps",), "greater than or equal to 1"),
        ({"prompt": "a fox", "output_format": "avi"}, ("output_format",), "'mp4'"),
        ({"image": "x", "keyframe": {"style": "anime"}}, (), "text-to-video (prompt) only"),
        ({"prompt": "a fox", "keyframe": {"seed": 3}}, ("keyframe", "seed"), "Extra inputs"),
    ],
)
def test_bad_video_requests_name_the_field(fields, loc, words):
    with pytest.raises(ValidationError) as caught:
        VideoRequest(**fields)
    [error] = caught.value.errors()
    assert error["loc"] == loc and words in error["msg"]


def test_decode_accepts_png_jpeg_and_data_urls():
    assert decode_image(image_b64(RED), "image", 10**6).size == (96, 64)
    assert decode_image(image_b64(RED, "JPEG"), "image", 10**6).mode == "RGB"
    assert decode_image("data:image/png;base64," + image_b64(RED), "image", 10**6).size == (96, 64)


def _png_with_declared_size(width: int, height: int) -> str:
    """A real PNG whose IHDR claims another size: a decompression bomb's header, without the bomb."""
    data = bytearray(image_bytes(Image.new("RGB", (8, 8))))
    ihdr = 8 + 8  # signature, then length + type of the IHDR chunk
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])) & 0xFFFFFFFF
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", crc)
    return base64.b64encode(bytes(data)).decode()


@pytest.mark.parametrize(
    "data, words",
    [
        ("not base64!!", "not valid base64"),
        (base64.b64encode(b"hello world").decode(), "not a readable PNG or JPEG"),
        (image_b64(RED, "GIF"), "format GIF is not supported"),
        (image_b64(Image.new("RGB", (300, 300))), "300x300 is 90000 pixels, over the limit"),
        (_png_with_declared_size(5000, 5000), "over the limit"),
        (_png_with_declared_size(100_000, 100_000), "declares more pixels than allowed"),
        (image_b64(RED)[:60], "truncated or corrupt"),
    ],
)
def test_decode_refuses_bad_images_naming_the_field(data, words):
    with pytest.raises(RequestError) as caught:
        decode_image(data, "image", max_pixels=65536)
    assert caught.value.field == "image" and words in caught.value.message
    assert "at most 65536 pixels" in caught.value.allowed


def test_fit_crops_to_size_without_stretching():
    # Quarters green | red | blue | green: a centre crop to a square keeps red | blue only,
    # where stretching would keep the green edges.
    image = Image.new("RGB", (512, 256), (0, 255, 0))
    image.paste((255, 0, 0), (128, 0, 256, 256))
    image.paste((0, 0, 255), (256, 0, 384, 256))
    fitted = fit_image(image, 256, 256)
    assert fitted.shape == (256, 256, 3)
    assert tuple(fitted[128, 2]) == (255, 0, 0) and tuple(fitted[128, 253]) == (0, 0, 255)


FRAMES = np.stack([np.full((64, 96, 3), 20 * i, np.uint8) for i in range(6)])


def _probe(data: bytes, tmp_path) -> tuple[dict, str]:
    path = tmp_path / "video.mp4"
    path.write_bytes(data)
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    frames = list(reader)
    meta["frames"] = len(frames)
    tags = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(path), "-f", "ffmetadata", "-"],
                          capture_output=True, text=True, check=True).stdout
    return meta, tags


def test_mp4_is_h264_yuv420p_with_frames_fps_and_comment(tmp_path):
    data = encode_video(FRAMES, fps=7, output_format="mp4", metadata={"seed": 5, "prompt": "a fox"})
    meta, tags = _probe(data, tmp_path)
    assert meta["frames"] == 6 and meta["size"] == (96, 64) and meta["fps"] == 7
    assert meta["codec"].startswith("h264") and "yuv420p" in meta["pix_fmt"]
    assert 'comment={"prompt":"a fox","seed":5}' in tags.splitlines()


@pytest.mark.parametrize("fmt", ["gif", "webp"])
def test_animations_decode_to_every_frame(fmt):
    data = encode_video(FRAMES, fps=10, output_format=fmt, metadata={"seed": 1})
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == fmt.upper() and image.n_frames == 6 and image.size == (96, 64)
        if fmt == "gif":  # Pillow does not report WebP frame durations back
            assert image.info["duration"] == 100


def test_encode_rejects_bad_frames_and_formats():
    with pytest.raises(ValueError, match="uint8 of shape"):
        encode_video(FRAMES[0], 7, "mp4", {})
    with pytest.raises(ValueError, match="output_format must be one of"):
        encode_video(FRAMES, 7, "avi", {})
