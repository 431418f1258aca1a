"""Fetching data files: try each source in turn, verify the decoded content, store atomically.

A file is verified by the SHA-256 of its *decompressed* content, because mirrors re-compress
(the ``.gz`` wrappers differ, the IDX bytes inside do not). A source that fails (unreachable,
HTTP error, corrupt gzip, wrong checksum) is skipped for the next; the file is written to the
cache only after it verified, so a partial or foreign download never sits under the real name.
"""

from __future__ import annotations

import gzip
import hashlib
import urllib.request
import zlib
from pathlib import Path

from .dataset import DataError
from .paths import atomic_write

__all__ = ["GZIP_MAGIC", "sha256_hex", "decode_gzip", "download_verified"]

GZIP_MAGIC = b"\x1f\x8b"
USER_AGENT = "cstep-data/1 (+https://pypi.org/project/cstep)"


def sha256_hex(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def decode_gzip(raw: bytes, where: str) -> bytes:
    """``raw`` decompressed if it starts with the gzip magic bytes, else ``raw`` itself."""
    if not raw.startswith(GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except EOFError:
        raise DataError(f"{where}: the gzip stream is truncated (the file ended before the end-of-stream marker); "
                        "delete it and download or copy it again") from None
    except (gzip.BadGzipFile, zlib.error, OSError) as exc:
        raise DataError(f"{where}: the gzip stream is corrupt ({exc}); "
                        "delete it and download or copy it again") from None


def _fetch(url: str, timeout: float) -> bytes:
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.read()


def download_verified(filename: str, base_urls, dest_dir, sha256: str, *, timeout: float = 30.0) -> Path:
    """Download ``filename`` from the first of ``base_urls`` (each joined with the filename) whose
    decompressed content has SHA-256 ``sha256``; store the bytes as received in
    ``dest_dir/filename`` and return that path. Raises :class:`DataError` listing every attempt
    when no source delivers the right content (its ``failures`` attribute lists the attempts)."""
    failures = []
    for base in base_urls:
        url = base.rstrip("/") + "/" + filename
        try:
            raw = _fetch(url, timeout)
            digest = sha256_hex(decode_gzip(raw, url))
        except DataError as exc:
            failures.append(str(exc).split(";")[0])  # "<url>: the gzip stream is ..."
            continue
        except (OSError, ValueError) as exc:  # URLError/HTTPError/timeouts are OSErrors
            failures.append(f"{url}: {getattr(exc, 'reason', None) or exc}")
            continue
        if digest != sha256:
            failures.append(f"{url}: SHA-256 of the content is {digest[:12]}..., expected {sha256[:12]}...")
            continue
        return atomic_write(Path(dest_dir) / filename, lambda f, content=raw: f.write(content))
    err = DataError(f"{filename}: could not be downloaded ({'; '.join(failures) or 'no source given'}); "
                    f"check the network or place the file in {dest_dir} yourself")
    err.failures = failures  # for callers that rephrase the message
    raise err
