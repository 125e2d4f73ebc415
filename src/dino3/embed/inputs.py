"""What a job's inputs name: files, folders, globs, list files, tables, URLs and object storage -> the
image paths, in order. Both engines of the embed job (local and Ray) take their inputs from here.

Folders are searched recursively (symbolic links to folders followed, each real folder once) for
files with an image suffix; list files (.txt, .lst, .list) hold one path or URL per line, relative
to the list file; tables (.parquet, .csv) hold them in a `path` (or `uri`, `url`) column; object
storage (s3://, gs://, ... through pyarrow's file systems) is listed like a folder. Local paths come
out absolute, so that an output names its images from any working folder and a resumed job from
another folder cannot mix two sets of images. Order: as given, folders and globs sorted. What is
found but cannot be an input (a dangling link, a pipe, a name that is not UTF-8) is listed in
`skipped` with the reason, never dropped without a word; a path or pattern that names nothing is a
UsageError before any work starts.

Videos (.mp4 .mov .avi .webm .mkv) are inputs when `video` says which frames to take: each becomes
its frames' names (`clip.mp4#t=12.480`, see dino3.video), listed from the file's packets; a video
that cannot be read, or is cut short, is listed in `skipped` (its readable frames stay inputs).
Without `video`, they are what they were: files without an image suffix.
"""

from __future__ import annotations

import glob
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UsageError, VideoError
from ..fetch import OBJECT_STORE_PREFIXES as URI_SCHEMES
from ..fetch import URL_PREFIXES, object_store
from ..video import VIDEO_SUFFIXES, Sampling, is_video, list_frames

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
LIST_SUFFIXES = {".txt", ".lst", ".list"}
TABLE_SUFFIXES = {".parquet", ".csv"}


@dataclass
class Inputs:
    paths: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, why); print names with escape_field
    ignored: int = 0  # files in the folders without an image suffix

    def none_found(self) -> str:
        """What to say when no input is left: the reasons the skipped ones were skipped."""
        if not self.skipped:
            return "no images found in the inputs"
        shown = "".join(f"\n  {path}: {why}" for path, why in self.skipped[:10])
        more = f"\n  ... and {len(self.skipped) - 10} more" if len(self.skipped) > 10 else ""
        return f"no images found in the inputs ({len(self.skipped)} skipped):{shown}{more}"


def expand_inputs(items: list[str], suffixes: set[str] = IMAGE_SUFFIXES, video: Sampling | None = None) -> Inputs:
    """Files, folders, globs, list files and URLs -> Inputs (see the module docstring)."""
    found = Inputs()
    if video is not None:
        suffixes = suffixes | set(VIDEO_SUFFIXES)
    for item in items:
        item = os.fspath(item)
        if item.startswith(URL_PREFIXES):
            found.paths.append(item)
            continue
        if item.startswith(URI_SCHEMES):
            found.paths.extend(_list_uri(item, suffixes))
            continue
        path = Path(os.path.abspath(os.path.expanduser(item)))
        if path.is_dir():
            _walk(path, suffixes, found, video)
        elif path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
            _read_list(path, found, video)
        elif path.is_file() and path.suffix.lower() in TABLE_SUFFIXES:
            for name in read_table_inputs(path):
                _add_listed(name, path.parent, found, video)
        elif path.exists() or path.is_symlink():
            _add_file(path, found, video)
        elif glob.has_magic(item):
            matches = sorted(os.path.abspath(m) for m in glob.glob(os.path.expanduser(item), recursive=True))
            if not matches:
                raise UsageError(f"{item}: the pattern matches no file")
            for match in matches:
                if Path(match).is_dir():
                    _walk(Path(match), suffixes, found, video)
                else:
                    _add_file(Path(match), found, video)
        else:
            raise UsageError(f"{item}: no such file or folder")
    return found


def _add_file(path: Path, found: Inputs, video: Sampling | None = None) -> None:
    name = str(path)
    if not _is_utf8(name):
        found.skipped.append((name, "the file name is not valid UTF-8; rename the file"))
        return
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        found.skipped.append((name, "a symbolic link to nothing (dangling)"))
        return
    except OSError as e:
        found.skipped.append((name, f"cannot be read ({e.strerror or e})"))
        return
    if not stat.S_ISREG(mode):
        found.skipped.append((name, "not a regular file (a pipe, socket or device)"))
        return
    if video is not None and is_video(name):
        _add_video(name, found, video)
        return
    found.paths.append(name)


def _add_video(name: str, found: Inputs, video: Sampling) -> None:
    try:
        frames, problems = list_frames(name, video)
    except VideoError as e:
        found.skipped.append((name, str(e)))
        return
    found.paths.extend(frames)
    found.skipped.extend(problems)


def _walk(root: Path, suffixes: set[str], found: Inputs, video: Sampling | None = None) -> None:
    seen: set[str] = set()
    for folder, dirs, files in os.walk(root, followlinks=True, onerror=lambda e: _walk_error(e, found)):
        real = os.path.realpath(folder)
        if real in seen:  # a link back to a folder already searched
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        for name in sorted(files):  # a dangling link is listed with the files
            path = Path(folder) / name
            if path.suffix.lower() in suffixes:
                _add_file(path, found, video)
            elif path.is_symlink() and not path.exists():
                found.skipped.append((str(path), "a symbolic link to nothing (dangling)"))
            else:
                found.ignored += 1


def _walk_error(error: OSError, found: Inputs) -> None:
    found.skipped.append((str(error.filename), f"cannot be searched ({error.strerror or error})"))


def _read_list(path: Path, found: Inputs, video: Sampling | None = None) -> None:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: a list file must be UTF-8 text ({e.reason} at byte {e.start})") from None
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            _add_listed(line, path.parent, found, video)


def _add_listed(name: str, base: Path, found: Inputs, video: Sampling | None) -> None:
    """A name from a list file or table: a URL or URI as it is, a path relative to the list's folder."""
    if not name.startswith(URL_PREFIXES + URI_SCHEMES):
        name = os.path.abspath(base / name)
    if video is not None and is_video(name) and os.path.isfile(name):
        _add_video(name, found, video)
    else:
        found.paths.append(name)


def read_table_inputs(path: str | os.PathLike) -> list[str]:
    """The `path` (or `uri`, `url`) column of a Parquet or CSV table of inputs."""
    try:
        import pyarrow.csv as pacsv
        import pyarrow.parquet as pq
    except ImportError:
        raise UsageError(f"{path}: reading a table of inputs needs pyarrow: pip install 'dino3[parquet]'") from None
    try:
        table = pq.read_table(path) if str(path).endswith(".parquet") else pacsv.read_csv(path)
    except Exception as e:  # noqa: BLE001  (pyarrow raises its own kinds)
        raise UsageError(f"{path}: not a readable table of inputs ({type(e).__name__}: {e})") from None
    for name in ("path", "uri", "url"):
        if name in table.column_names:
            return [str(v) for v in table.column(name).to_pylist() if v]
    raise UsageError(f"{path}: the table has no path column (found {table.column_names}); name it 'path'")


def _list_uri(uri: str, suffixes: set[str]) -> list[str]:
    """An object-storage URI: itself if it names an object, else the images under it as a prefix."""
    pafs, filesystem, inner = object_store(uri, UsageError)
    try:
        info = filesystem.get_file_info(inner)
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"{uri}: cannot be listed ({type(e).__name__}: {e})") from None
    if info.type == pafs.FileType.File:
        return [uri]
    if info.type == pafs.FileType.NotFound:
        raise UsageError(f"{uri}: no such object or prefix")
    scheme = uri.split("://", 1)[0] + "://"
    files = filesystem.get_file_info(pafs.FileSelector(inner, recursive=True))
    return sorted(scheme + f.path for f in files if f.type == pafs.FileType.File and _suffix(f.path) in suffixes)


def _suffix(name: str) -> str:
    return os.path.splitext(name)[1].lower()


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
