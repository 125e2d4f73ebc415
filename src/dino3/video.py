"""Videos: frames out of .mp4 .mov .avi .webm .mkv files, and videos written from frames.

PyAV (FFmpeg, carried in its wheel) decodes and encodes; it is an extra, `pip install
"dino3[video]"`, imported only when a video is met. Frames are chosen by `Sampling` (every Nth
frame, or F frames per second) and named `clip.mp4#t=12.480`: the media-fragment form, the frame's
presentation time in seconds to the millisecond, so that names stay unique.

Damaged videos give what they can. A frame whose data cannot be decoded is an error about that frame
and decoding goes on; a file that ends before its declared duration (a cut download, a recording
that crashed) gives the frames before the cut, then names the cut; a file with no video frames at
all (zero bytes, an audio file, garbage) is a VideoError about the file. The display rotation that
phones record is applied, as players do.

Frames reach dino3's image loader in two ways: `iter_frames` decodes a video from start to end (the
dense commands), and `frame_sources` turns frame names into file-like sources that decode their
frame when read, in whichever thread reads them (the embed job's decoding threads).
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from ._io import atomic_path
from .errors import UsageError, VideoError

VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".webm", ".mkv")
# Muxer and encoder for each suffix: H.264 where the container takes it, VP9 for WebM, MPEG-4 for AVI.
_WRITE_FORMATS = {
    ".mp4": ("mp4", "libx264"),
    ".mov": ("mov", "libx264"),
    ".mkv": ("matroska", "libx264"),
    ".webm": ("webm", "libvpx-vp9"),
    ".avi": ("avi", "mpeg4"),
}
_FRAGMENT = "#t="
_MAX_BAD_IN_A_ROW = 50  # consecutive undecodable packets after which a video is given up


def is_video(path: str | os.PathLike) -> bool:
    return Path(os.fspath(path)).suffix.lower() in VIDEO_SUFFIXES


def frame_name(path: str, time: float) -> str:
    """`clip.mp4#t=12.480`: a frame's name, from its video and presentation time in seconds."""
    return f"{path}{_FRAGMENT}{time:.3f}"


def parse_frame_name(name: str) -> tuple[str, float] | None:
    """(video path, time) of a frame name, or None for anything else (an existing file is never a frame)."""
    path, sep, time = name.rpartition(_FRAGMENT)
    if not sep or not is_video(path) or os.path.exists(name):
        return None
    try:
        value = float(time)
    except ValueError:
        return None
    return (path, value) if math.isfinite(value) else None


def source_file(name: str) -> str:
    """The file a name reads: the video of a frame name, else the name itself."""
    parsed = parse_frame_name(name)
    return parsed[0] if parsed else name


@dataclass(frozen=True)
class Sampling:
    """Which frames of a video to take: every `every`-th frame (1: all of them), or `fps` frames
    per second (the first frame at or after each step of 1/fps s). Only one of the two."""

    every: int | None = None
    fps: float | None = None

    def __post_init__(self) -> None:
        if self.every is not None and self.fps is not None:
            raise UsageError("choose frames by every N frames or by frames per second, not both")
        every, fps = self.every, self.fps
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise UsageError(f"every must be a whole number >= 1, got {every!r}")
        if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps < math.inf):
            raise UsageError(f"fps must be a number > 0, got {fps!r}")

    def selector(self):
        """A fresh function (index, time) -> keep?, called once per frame in presentation order."""
        if self.fps is None:
            every = self.every or 1
            return lambda index, time: index % every == 0
        step = 1.0 / self.fps
        due: list[float | None] = [None]

        def keep(index: int, time: float) -> bool:
            if due[0] is None or time >= due[0] - 1e-6:
                due[0] = (time if due[0] is None else due[0]) + step
                while due[0] <= time:  # a gap in the video: the next frame after it starts again
                    due[0] += step
                return True
            return False

        return keep

    def rate(self, source_rate: Fraction | None) -> Fraction:
        """The frame rate of the sampled frames (for a video written from them)."""
        if self.fps is not None:
            return Fraction(self.fps).limit_denominator(1001)
        return (source_rate or Fraction(25)) / (self.every or 1)


@dataclass
class Frame:
    """One sampled frame: its name and time, and its pixels (H, W, 3) uint8, or why it has none."""

    name: str
    time: float
    pixels: np.ndarray | None = None
    error: str | None = None


def _import_av():
    try:
        import av
    except ImportError:
        raise UsageError('reading and writing videos needs PyAV: pip install "dino3[video]" (or av)') from None
    return av


def _open(path: str):
    """The container and its first video stream, or a VideoError that says what the file is."""
    av = _import_av()
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        raise VideoError(f"{path}: no such file") from None
    except OSError as e:
        raise VideoError(f"{path}: cannot be read ({e.strerror or e})") from None
    if size == 0:
        raise VideoError(f"{path}: the file is empty (0 bytes): a zero-length video has no frames")
    try:
        container = av.open(path)
    except av.error.FFmpegError as e:
        raise VideoError(f"{path}: cannot be opened as a video ({_reason(e)})") from None
    if not container.streams.video:
        container.close()
        raise VideoError(f"{path}: holds no video stream (audio only, or not a video)")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"  # FFmpeg's own decoding threads
    return container, stream


def _reason(error: BaseException) -> str:
    text = getattr(error, "strerror", None) or str(error)
    return f"{type(error).__name__}: {text.splitlines()[0][:200] if text else 'no details'}"


def _time(pts: int | None, stream) -> float | None:
    return None if pts is None else float(pts * stream.time_base)


def _declared_end(container, stream) -> float | None:
    """Where the file says its video ends, in seconds of presentation time, if it says."""
    if stream.duration and stream.time_base:
        return float(((stream.start_time or 0) + stream.duration) * stream.time_base)
    if container.duration:
        return ((container.start_time or 0) + container.duration) / 1e6  # in AV_TIME_BASE units
    return None


def _cut_short(path: str, container, stream, last: float | None, count: int) -> str | None:
    """Why the frames seen stop before the declared end of the video, or None if they do not."""
    end = _declared_end(container, stream)
    if end is None or last is None:
        return None
    period = 1.0 / float(stream.average_rate) if stream.average_rate else 0.04
    if last + 2 * period >= end:
        return None
    return (
        f"{path}: the video data ends at t={last:.3f} s, before its declared end at {end:.3f} s (the file is cut "
        f"or corrupt there); frames read before it: {count}"
    )


def _pixels(frame) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a decoded frame, turned as its display rotation says."""
    array = frame.to_ndarray(format="rgb24")
    turns = round((getattr(frame, "rotation", 0) or 0) / 90) % 4  # counter-clockwise quarter turns
    return np.ascontiguousarray(np.rot90(array, k=turns)) if turns else array


def _decoded(container, stream) -> Iterator[tuple[float | None, Any, BaseException | None]]:
    """(time, frame, None) per decoded frame and (packet time, None, error) per packet that
    cannot be decoded, in presentation order; stops after too many bad packets in a row."""
    av = _import_av()
    bad_in_a_row = 0
    packets = container.demux(stream)
    while True:
        try:
            packet = next(packets)
        except StopIteration:
            return
        except av.error.FFmpegError as e:  # the container itself breaks off
            yield None, None, e
            return
        try:
            frames = stream.decode(packet)
        except av.error.FFmpegError as e:
            bad_in_a_row += 1
            yield _time(packet.pts, stream), None, e
            if bad_in_a_row >= _MAX_BAD_IN_A_ROW:
                return
            continue
        bad_in_a_row = 0
        for frame in frames:
            yield (frame.time if frame.pts is not None else None), frame, None


def iter_frames(path: str | os.PathLike, sampling: Sampling | None = None) -> Iterator[Frame]:
    """The sampled frames of a video, decoded in order, as `Frame`s. A frame that cannot be decoded
    comes as a Frame with `error` set, and decoding goes on; a file cut short ends with a Frame
    named after the file whose `error` says where. A file with no frames raises VideoError."""
    path = os.fspath(path)
    keep = (sampling or Sampling()).selector()
    container, stream = _open(path)
    index, last, seen = 0, None, 0
    try:
        for time, frame, error in _decoded(container, stream):
            if error is not None and time is None:  # the container broke off: what came before stands
                why = f"{path}: reading stopped after t={last or 0:.3f} s ({_reason(error)})"
                yield Frame(path, last or 0.0, error=why)
                return
            if time is None:
                time = (last or 0.0) + 1.0 / float(stream.average_rate or 25)
            seen, last = seen + 1, time
            if keep(index, time):
                name = frame_name(path, time)
                if error is None:
                    yield Frame(name, time, pixels=_pixels(frame))
                else:
                    yield Frame(name, time, error=f"{name}: this frame cannot be decoded ({_reason(error)})")
            index += 1
        if seen == 0:
            raise VideoError(f"{path}: the video has no frames that can be decoded")
        cut = _cut_short(path, container, stream, last, seen)
        if cut:
            yield Frame(path, last, error=cut)
    finally:
        container.close()


def frame_rate(path: str | os.PathLike) -> Fraction | None:
    """The average frame rate a video declares, if it declares one."""
    container, stream = _open(os.fspath(path))
    try:
        return Fraction(stream.average_rate) if stream.average_rate else None
    finally:
        container.close()


def list_frames(path: str | os.PathLike, sampling: Sampling | None = None) -> tuple[list[str], list[tuple[str, str]]]:
    """The names of a video's sampled frames, from its packets (fast: nothing is decoded), and the
    problems found on the way ((name, why): a file cut short). Raises VideoError for a file with
    no frames."""
    av = _import_av()
    path = os.fspath(path)
    container, stream = _open(path)
    times, problems = [], []
    try:
        try:
            for packet in container.demux(stream):
                pts = packet.pts if packet.pts is not None else packet.dts
                if packet.size and pts is not None and not packet.is_discard:
                    times.append(_time(pts, stream))
        except av.error.FFmpegError as e:
            problems.append((path, f"{path}: reading stopped after {len(times)} frames ({_reason(e)})"))
        if not times:
            raise VideoError(f"{path}: the video has no frames")
        times.sort()  # packets come in decoding order; frames are wanted in presentation order
        keep = (sampling or Sampling()).selector()
        names = [frame_name(path, t) for i, t in enumerate(times) if keep(i, t)]
        cut = _cut_short(path, container, stream, times[-1], len(times))
        if cut and not problems:
            problems.append((path, cut))
        return list(dict.fromkeys(names)), problems  # two frames in one millisecond keep one name
    finally:
        container.close()


class _Reader:
    """Decodes one video forward for the frames a job wants, from any thread (one at a time).

    Frames decoded before they are asked for (another thread asked for a later one first) wait in
    `ready`; a frame behind the decoder, or far ahead of it, is reached by seeking to the key frame
    before it."""

    def __init__(self, path: str, wanted: set[str]) -> None:
        self.path = path
        self.wanted = wanted
        self.ready: dict[str, np.ndarray | str] = {}  # name -> pixels, or why there are none
        self.lock = threading.Lock()
        self.container = self.stream = None
        self.frames: Iterator | None = None
        self.position: float | None = None  # time of the last frame decoded
        self.sought = False  # whether the decoder was positioned by a seek
        self.closed = False

    def frame(self, name: str, time: float) -> np.ndarray:
        with self.lock:
            if name not in self.ready:
                self._decode_until(name, time)
            found = self.ready.pop(name, None)
        if isinstance(found, np.ndarray):
            return found
        raise VideoError(found or f"{name}: the video has no frame at this time")

    def _decode_until(self, name: str, time: float) -> None:
        if self.closed:
            self.ready[name] = f"{name}: the video was closed before this frame was read"
            return
        if not (self.frames is not None and self.position is not None and self.position < time <= self.position + 10):
            self._seek(time)
        while not self._decode_forward(name, time):
            self._seek(0.0)  # the seek landed after the frame: decode from the start instead

    def _decode_forward(self, name: str, time: float) -> bool:
        """Decode up to `time`, keeping the wanted frames met; False if a seek overshot it."""
        for frame_time, frame, error in self.frames:
            if error is not None and frame_time is None:  # the container broke off
                self.ready[name] = f"{name}: reading the video stopped before this frame ({_reason(error)})"
                self.frames = iter(())
                return True
            if frame_time is None:
                continue
            if self.position is None and self.sought and frame_time > time + 5e-4:
                return False
            self.position = frame_time
            current = frame_name(self.path, frame_time)
            if current in self.wanted:
                self.ready[current] = (
                    _pixels(frame) if error is None else f"{current}: this frame cannot be decoded ({_reason(error)})"
                )
            if frame_time >= time - 5e-4:
                return True
        return True

    def _seek(self, time: float) -> None:
        """Position the decoder before `time`: at the key frame before it, or at the start."""
        av = _import_av()
        self._close_container()
        self.container, self.stream = _open(self.path)
        self.sought = False
        if time > 0:
            try:
                self.container.seek(int(time / self.stream.time_base), stream=self.stream, backward=True)
                self.sought = True
            except av.error.FFmpegError:
                self._close_container()
                self.container, self.stream = _open(self.path)
        self.position = None
        self.frames = _decoded(self.container, self.stream)

    def close(self) -> None:
        """Close the file, once a thread still decoding from it is done."""
        with self.lock:
            self._close_container()
            self.frames = None
            self.closed = True

    def _close_container(self) -> None:
        if self.container is not None:
            with contextlib.suppress(Exception):
                self.container.close()
            self.container = None


class FrameFile:
    """A video frame that dino3's image loader opens like a file: the first read decodes the frame
    (in the reading thread) and returns all of it as a PPM image. `name` is the frame's name."""

    def __init__(self, name: str, time: float, reader: _Reader) -> None:
        self.name = name
        self.time = time
        self.reader = reader
        self.done = False

    def read(self, size: int = -1) -> bytes:
        if self.done:
            return b""
        pixels = self.reader.frame(self.name, self.time)
        self.done = True
        height, width = pixels.shape[:2]
        return b"P6\n%d %d\n255\n" % (width, height) + pixels.tobytes()

    def __repr__(self) -> str:
        return f"FrameFile({self.name!r})"


@contextlib.contextmanager
def frame_sources(names: Sequence[str]) -> Iterator[list[Any]]:
    """The names as sources for dino3's image loader: frame names (`clip.mp4#t=12.480`) become
    FrameFiles that share one decoder per video; other names stay as they are. The decoders are
    closed on leaving the block."""
    parsed = [parse_frame_name(name) for name in names]
    readers: dict[str, _Reader] = {}
    for name, found in zip(names, parsed):
        if found is not None:
            readers.setdefault(found[0], _Reader(found[0], set())).wanted.add(name)
    try:
        yield [FrameFile(name, found[1], readers[found[0]]) if found else name for name, found in zip(names, parsed)]
    finally:
        for reader in readers.values():
            reader.close()


class VideoWriter:
    """Writes (H, W, 3) uint8 frames to a video file at a constant frame rate; the codec follows the
    suffix (H.264 for .mp4 .mov .mkv, VP9 for .webm, MPEG-4 for .avi). The file appears whole when
    the writer is closed without an error, and not at all otherwise."""

    def __init__(self, path: str | os.PathLike, rate: Fraction | float, quality: int = 20) -> None:
        suffix = Path(os.fspath(path)).suffix.lower()
        if suffix not in _WRITE_FORMATS:
            raise UsageError(f"{path}: a video is written as one of {', '.join(VIDEO_SUFFIXES)}")
        self.av = _import_av()
        self.path = Path(path)
        self.format, self.codec = _WRITE_FORMATS[suffix]
        self.rate = Fraction(rate).limit_denominator(1001)
        self.quality = quality
        self._atomic = atomic_path(self.path)
        self._tmp: Path | None = None
        self.container = None
        self.stream = None
        self.count = 0

    def __enter__(self) -> VideoWriter:
        self._tmp = self._atomic.__enter__()
        self.container = self.av.open(str(self._tmp), "w", format=self.format)
        return self

    def write(self, pixels: np.ndarray) -> None:
        height, width = pixels.shape[:2]
        if self.stream is None:
            self.stream = self.container.add_stream(self.codec, rate=self.rate)
            self.stream.width, self.stream.height = width + width % 2, height + height % 2  # 4:2:0 needs even sides
            self.stream.pix_fmt = "yuv420p"
            if self.codec == "libx264":
                self.stream.options = {"crf": str(self.quality), "preset": "medium"}
            elif self.codec == "libvpx-vp9":
                self.stream.options = {"crf": str(self.quality + 11), "b": "0", "row-mt": "1"}
        if (height + height % 2, width + width % 2) != (self.stream.height, self.stream.width):
            raise UsageError(
                f"{self.path}: every frame of a video has one size; got {width}x{height} after "
                f"{self.stream.width}x{self.stream.height}"
            )
        if height % 2 or width % 2:
            pixels = np.pad(pixels, ((0, height % 2), (0, width % 2), (0, 0)), mode="edge")
        frame = self.av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels, dtype=np.uint8), format="rgb24")
        frame.pts = self.count
        frame.time_base = 1 / self.rate
        for packet in self.stream.encode(frame):
            self.container.mux(packet)
        self.count += 1

    def __exit__(self, kind, error, trace) -> None:
        try:
            if kind is None:
                if self.stream is None:
                    raise UsageError(f"{self.path}: no frame to write")
                for packet in self.stream.encode():
                    self.container.mux(packet)
            self.container.close()
        except BaseException as e:
            with contextlib.suppress(Exception):
                self.container.close()
            self._atomic.__exit__(type(e), e, e.__traceback__)
            raise
        self._atomic.__exit__(kind, error, trace)
