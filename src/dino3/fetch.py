"""The bytes a name points to, for every room: a local path, an http(s) URL, a data URL or an
object-storage URI (s3://, gs://, ...; read through pyarrow.fs), each within a size limit, downloads
within a deadline for the whole transfer and stoppable at their next read.

`fetch_bytes(..., public_only=True)` is for URLs from someone else (the server's clients): it refuses
private, loopback and link-local hosts, connects to the very address it checked (no second DNS lookup
that a rebinding name could answer) and checks every redirect hop the same way.

Every failure is an ImageError naming the input and the reason. dino3.images decodes what this returns.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from pathlib import Path
from typing import Any

from .errors import ImageError, ImageTooLargeError

MAX_DOWNLOAD_BYTES = 100 * 2**20
URL_TIMEOUT_SECONDS = 30.0  # for a whole download, however slowly the server sends it
URL_PREFIXES = ("http://", "https://")
OBJECT_STORE_PREFIXES = ("s3://", "gs://", "gcs://", "hdfs://", "abfs://", "az://")  # read through pyarrow.fs
REMOTE_PREFIXES = URL_PREFIXES + OBJECT_STORE_PREFIXES  # names of images elsewhere: never local paths
MAX_REDIRECTS = 5
IDLE_SECONDS = 10.0  # how long one read of a download may wait for data


def is_url(text: Any) -> bool:
    """Whether `text` is an http(s) URL."""
    return isinstance(text, str) and text.lower().startswith(URL_PREFIXES)


def is_data_url(text: Any) -> bool:
    return isinstance(text, str) and text[:5].lower() == "data:"


def is_object_uri(text: Any) -> bool:
    """Whether `text` names an object in a store (s3://, gs://, ...) rather than a local file."""
    return isinstance(text, str) and text.lower().startswith(OBJECT_STORE_PREFIXES)


def fetch_bytes(
    source: str | os.PathLike,
    *,
    public_only: bool = False,
    max_bytes: int | None = None,
    timeout: float | None = None,
    cancel: threading.Event | None = None,
) -> bytes:
    """The bytes that a local path, an http(s) URL, a data URL or an object-storage URI names, within
    a size limit (default MAX_DOWNLOAD_BYTES) and, for downloads, a deadline for the whole transfer
    (default URL_TIMEOUT_SECONDS); `cancel` stops a download at its next read.

    public_only: for URLs from someone else (a server's clients): refuse hosts on private, loopback or
        link-local networks, connect to the very address that was checked (no second DNS lookup that
        a rebinding name could answer otherwise), and check each redirect hop the same way. Proxies
        from the environment are not used then. Without it, URLs are fetched as urllib does (proxies,
        redirects).
    """
    max_bytes = MAX_DOWNLOAD_BYTES if max_bytes is None else max_bytes
    text = os.fspath(source)
    if not isinstance(text, str):
        text = os.fsdecode(text)
    if is_data_url(text):
        data = decode_data_url(text)
        if len(data) > max_bytes:
            raise ImageTooLargeError(_too_large("the data URL", max_bytes))
        return data
    if is_url(text):
        budget = URL_TIMEOUT_SECONDS if timeout is None else timeout
        if public_only:
            return _download_public(text, max_bytes, budget, cancel)
        return _download(text, max_bytes, budget, cancel)
    if is_object_uri(text):
        return _read_object(text, max_bytes)
    path = Path(text).expanduser()
    check_regular_file(path, text)
    if path.stat().st_size > max_bytes:
        raise ImageTooLargeError(_too_large(text, max_bytes))
    try:
        return path.read_bytes()
    except OSError as e:
        raise ImageError(f"{text}: cannot be read ({e.strerror or e})") from None


def download(
    url: str,
    *,
    max_bytes: int | None = None,
    timeout: float | None = None,
    cancel: threading.Event | None = None,
    public_only: bool = False,
) -> bytes:
    """The bytes at an http(s) URL (see fetch_bytes)."""
    if not is_url(url):
        raise ImageError(f"{url}: not an http(s) URL")
    return fetch_bytes(url, max_bytes=max_bytes, timeout=timeout, cancel=cancel, public_only=public_only)


def decode_data_url(text: str) -> bytes:
    """The bytes of a data URL (`data:image/png;base64,...`, or percent-encoded without ;base64)."""
    import urllib.parse

    header, comma, payload = text.partition(",")
    if not comma:
        raise ImageError("a data URL without a comma: expected data:[<type>][;base64],<data>")
    if header.lower().endswith(";base64"):
        return decode_base64(payload, "the data URL")
    return urllib.parse.unquote_to_bytes(payload)


def decode_base64(text: str, name: str = "the input") -> bytes:
    """Standard base64 (whitespace allowed, as line-wrapped encoders write it) -> bytes."""
    import base64
    import binascii

    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(f"{name} is not valid base64") from None


def _download(url: str, max_bytes: int, budget: float, cancel: threading.Event | None) -> bytes:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + budget
    request = urllib.request.Request(url, headers={"User-Agent": "dino3"})
    try:
        with urllib.request.urlopen(request, timeout=min(IDLE_SECONDS, budget)) as response:
            return _read_response(response, url, max_bytes, deadline, budget, cancel)
    except ImageError:
        raise
    except urllib.error.HTTPError as e:
        raise ImageError(f"{url}: download failed with HTTP {e.code} {e.reason}") from None
    except Exception as e:  # noqa: BLE001  (socket, TLS and protocol errors alike)
        raise _download_error(url, e) from None


def _download_public(url: str, max_bytes: int, budget: float, cancel: threading.Event | None) -> bytes:
    """A download from public addresses only; every hop's host is resolved once, checked, and the
    connection made to that checked address."""
    import urllib.parse

    deadline = time.monotonic() + budget
    current = url
    for _ in range(MAX_REDIRECTS + 1):
        parts = urllib.parse.urlsplit(current)
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise ImageError(f"{url}: redirected to {current}, which is not an http(s) URL")
        try:
            port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
        except ValueError:
            raise ImageError(f"{url}: {current} has an invalid port") from None
        addresses = public_addresses(parts.hostname, port, url)
        target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
        connection = None
        try:
            connection = _connect_pinned(parts.scheme.lower(), parts.hostname, port, addresses, deadline, url)
            connection.request("GET", target, headers={"User-Agent": "dino3", "Accept-Encoding": "identity"})
            response = connection.getresponse()
            if response.status in (301, 302, 303, 307, 308) and response.getheader("Location"):
                current = urllib.parse.urljoin(current, response.getheader("Location"))
                continue
            if response.status >= 400:
                raise ImageError(f"{url}: download failed with HTTP {response.status} {response.reason}")
            return _read_response(response, url, max_bytes, deadline, budget, cancel)
        except ImageError:
            raise
        except Exception as e:  # noqa: BLE001
            raise _download_error(url, e) from None
        finally:
            if connection is not None:
                connection.close()
    raise ImageError(f"{url}: more than {MAX_REDIRECTS} redirects; gave up")


def public_addresses(host: str, port: int, name: str) -> list[str]:
    """The addresses `host` resolves to, all of them public, or an ImageError: a name with any private,
    loopback, link-local or reserved address is refused (whatever the spelling: decimal, octal, IPv6,
    IPv4-mapped)."""
    import ipaddress
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise ImageError(f"{name}: cannot resolve {host!r}") from None
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%")[0])
        mapped = getattr(ip, "ipv4_mapped", None)
        if not ip.is_global or (mapped is not None and not mapped.is_global):
            raise ImageError(f"{name}: {host} is on a private network; only public URLs are fetched")
    if not addresses:
        raise ImageError(f"{name}: cannot resolve {host!r}")
    return addresses


def _connect_pinned(scheme: str, host: str, port: int, addresses: list[str], deadline: float, name: str):
    """An HTTP(S) connection to `host` made to one of the checked `addresses` (the Host header and the
    TLS server name stay `host`)."""
    import http.client
    import socket
    import ssl

    def dial() -> socket.socket:
        last: Exception | None = None
        for address in addresses:
            try:
                wait = max(0.1, min(IDLE_SECONDS, deadline - time.monotonic()))
                return socket.create_connection((address, port), wait)
            except OSError as e:
                last = e
        raise last or OSError("no address to connect to")

    class Pinned(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = dial()

    class PinnedTLS(http.client.HTTPSConnection):
        def connect(self) -> None:
            self.sock = tls.wrap_socket(dial(), server_hostname=host)

    tls = ssl.create_default_context()
    timeout = max(0.1, min(IDLE_SECONDS, deadline - time.monotonic()))
    if scheme == "https":
        return PinnedTLS(host, port, timeout=timeout, context=tls)
    return Pinned(host, port, timeout=timeout)


def _read_response(response, url: str, max_bytes: int, deadline: float, budget: float, cancel) -> bytes:
    """The body of an HTTP response, read within the deadline and the size limit."""
    length = response.getheader("Content-Length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise ImageTooLargeError(_too_large(url, max_bytes))
    chunks, total = [], 0
    while True:
        if cancel is not None and cancel.is_set():
            raise ImageError(f"{url}: download cancelled")
        if time.monotonic() > deadline:
            raise ImageError(f"{url}: download took longer than {budget:.0f} s; gave up")
        chunk = response.read1(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        if total > max_bytes:
            raise ImageTooLargeError(_too_large(url, max_bytes))


def _download_error(url: str, error: Exception) -> ImageError:
    if isinstance(error, TimeoutError):
        return ImageError(f"{url}: the server sent nothing for {IDLE_SECONDS:.0f} s; gave up")
    reason = getattr(error, "reason", None) or error
    return ImageError(f"{url}: download failed ({type(error).__name__}: {first_line(reason)})")


def object_store(uri: str, error: type[Exception] = ImageError):
    """(pyarrow.fs, the file system, the path in it) for an object-storage URI (S3, GCS, HDFS, Azure):
    the one place that opens one, for reading here and for listing inputs. `error` is raised, naming
    the URI, when pyarrow is missing or the store cannot be reached."""
    try:
        import pyarrow.fs as pafs
    except ImportError:
        raise error(f"{uri}: object storage is read through pyarrow: pip install 'dino3[parquet]'") from None
    try:
        filesystem, inner = pafs.FileSystem.from_uri(uri)
    except Exception as e:  # noqa: BLE001  (pyarrow raises its own kinds: an unknown scheme, credentials)
        raise error(f"{uri}: cannot be reached ({type(e).__name__}: {first_line(e)})") from None
    return pafs, filesystem, inner


def _read_object(uri: str, max_bytes: int) -> bytes:
    """An object's bytes from a store that pyarrow.fs reaches."""
    pafs, filesystem, inner = object_store(uri)
    try:
        info = filesystem.get_file_info(inner)
        if info.type == pafs.FileType.NotFound:
            raise ImageError(f"{uri}: no such object")
        if info.size is not None and info.size > max_bytes:
            raise ImageTooLargeError(_too_large(uri, max_bytes))
        chunks, total = [], 0
        with filesystem.open_input_stream(inner) as stream:
            while chunk := stream.read(1 << 20):
                chunks.append(chunk)
                total += len(chunk)
                if total > max_bytes:
                    raise ImageTooLargeError(_too_large(uri, max_bytes))
        return b"".join(chunks)
    except ImageError:
        raise
    except Exception as e:  # noqa: BLE001  (credentials, network, a missing bucket)
        raise ImageError(f"{uri}: cannot be read ({type(e).__name__}: {first_line(e)})") from None


def _too_large(what: str, max_bytes: int) -> str:
    size = f"{max_bytes // 2**20} MiB" if max_bytes >= 2**20 else f"{max_bytes} bytes"
    return f"{what}: larger than {size}, the download limit (dino3.fetch.MAX_DOWNLOAD_BYTES)"


def check_regular_file(path: Path, name: str) -> None:
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file") from None
    except OSError as e:
        raise ImageError(f"{name}: cannot be read ({e.strerror or e})") from None
    if stat.S_ISDIR(mode):
        raise ImageError(f"{name}: is a folder, not an image file")
    if not stat.S_ISREG(mode):  # a FIFO or a device would block or never end
        raise ImageError(f"{name}: not a regular file (a pipe, socket or device)")


def first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:200] if lines else "no details"
