"""Encoding frames to MP4 (H.264 with imageio-ffmpeg's bundled ffmpeg) or animated GIF/WebP (pillow)."""

from __future__ import annotations

import io
import json
import os
import tempfile

import numpy as np

CONTENT_TYPES = {"mp4": "video/mp4", "gif": "image/gif", "webp": "image/webp"}


def encode_video(frames: np.ndarray, fps: int, output_format: str, metadata: dict) -> bytes:
    """uint8 frames (F, H, W, 3) to a file's bytes, with `metadata` as JSON in the file's comment.

    MP4 is H.264, yuv420p (what browsers play), with the index at the front (faststart) so it
    can start playing before it has fully downloaded.
    """
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 of shape (F, H, W, 3); got {frames.dtype} {frames.shape}")
    comment = json.dumps(metadata, sort_keys=True, separators=(",", ":"))
    if output_format == "mp4":
        return _encode_mp4(frames, fps, comment)
    if output_format in ("gif", "webp"):
        return _encode_animation(frames, fps, output_format, comment)
    raise ValueError(f"output_format must be one of {sorted(CONTENT_TYPES)}; got {output_format!r}")


def _encode_mp4(frames: np.ndarray, fps: int, comment: str) -> bytes:
    import imageio_ffmpeg

    height, width = frames.shape[1:3]
    # ffmpeg writes MP4 to a seekable file (the moov atom is rewritten at the end for faststart).
    handle, path = tempfile.mkstemp(suffix=".mp4")
    os.close(handle)
    try:
        writer = imageio_ffmpeg.write_frames(
            path,
            (width, height),
            fps=fps,
            codec="libx264",
            pix_fmt_in="rgb24",
            pix_fmt_out="yuv420p",
            macro_block_size=16,
            ffmpeg_log_level="error",
            output_params=["-movflags", "+faststart", "-metadata", f"comment={comment}"],
        )
        writer.send(None)  # start ffmpeg
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
        writer.close()
        with open(path, "rb") as file:
            return file.read()
    finally:
        os.unlink(path)


def _encode_animation(frames: np.ndarray, fps: int, output_format: str, comment: str) -> bytes:
    from PIL import Image

    images = [Image.fromarray(frame) for frame in frames]
    buffer = io.BytesIO()
    options = {"save_all": True, "append_images": images[1:], "duration": round(1000 / fps), "loop": 0}
    if output_format == "gif":
        options["comment"] = comment.encode("utf-8")
    else:
        options.update(lossless=False, quality=90)
    images[0].save(buffer, format=output_format.upper(), **options)
    return buffer.getvalue()


# ffmpeg's minterpolate holds back the last frames of a stream (it needs frames after them to
# estimate motion); repeating the last frame this many times lets every source frame come out.
_INTERPOLATION_PADDING = 3


def interpolate_frames(frames: np.ndarray, fps: int, factor: int) -> np.ndarray:
    """Motion-compensated frame interpolation with ffmpeg's `minterpolate` filter (imageio-ffmpeg's
    bundled binary): N frames at `fps` become (N - 1) * factor + 1 frames at factor * fps, so the
    duration stays the same and source frame i is output frame i * factor.

    The frames go to ffmpeg losslessly (FFV1 in a temporary Matroska file) and come back as raw RGB;
    the filter works in YUV, so kept frames may differ from the source by a few levels.
    """
    import imageio_ffmpeg

    if factor == 1:
        return frames
    count, height, width = frames.shape[:3]
    wanted = (count - 1) * factor + 1
    handle, path = tempfile.mkstemp(suffix=".mkv")
    os.close(handle)
    try:
        writer = imageio_ffmpeg.write_frames(
            path, (width, height), fps=fps, codec="ffv1", pix_fmt_in="rgb24", pix_fmt_out="bgr0",
            macro_block_size=1, ffmpeg_log_level="error",
        )
        writer.send(None)
        for frame in [*frames, *[frames[-1]] * _INTERPOLATION_PADDING]:
            writer.send(np.ascontiguousarray(frame))
        writer.close()
        reader = imageio_ffmpeg.read_frames(
            path, pix_fmt="rgb24",
            output_params=["-vf", f"minterpolate=fps={fps * factor}:mi_mode=mci:mc_mode=aobmc:me_mode=bidir"],
        )
        next(reader)  # the stream's metadata
        out = []
        for data in reader:
            if len(out) < wanted:
                out.append(np.frombuffer(data, np.uint8).reshape(height, width, 3))
        reader.close()
    finally:
        os.unlink(path)
    if len(out) != wanted:
        raise RuntimeError(f"ffmpeg minterpolate gave {len(out)} frames; expected {wanted}")
    return np.stack(out)
