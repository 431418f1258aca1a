"""download_verified: sources tried in order, content verified by decompressed SHA-256 before
anything is written, a failure lists every attempt (all against local file:// sources)."""

import gzip
import hashlib

import pytest

from data import DataError
from data.download import decode_gzip, download_verified

CONTENT = b"\x00\x00\x08\x01\x00\x00\x00\x03\x01\x02\x03"
SHA = hashlib.sha256(CONTENT).hexdigest()


def source(folder, payload, name="f.gz"):
    folder.mkdir(parents=True)
    (folder / name).write_bytes(payload)
    return folder.as_uri() + "/"


def test_downloads_and_verifies_decompressed_content(tmp_path):
    url = source(tmp_path / "src", gzip.compress(CONTENT, mtime=0))
    path = download_verified("f.gz", [url], tmp_path / "dest", SHA)
    assert path == tmp_path / "dest" / "f.gz"
    assert gzip.decompress(path.read_bytes()) == CONTENT


def test_falls_back_to_the_next_source(tmp_path):
    missing = (tmp_path / "missing").as_uri() + "/"
    wrong = source(tmp_path / "wrong", gzip.compress(CONTENT + b"x"))
    truncated = source(tmp_path / "trunc", gzip.compress(CONTENT)[:-6])
    good = source(tmp_path / "good", gzip.compress(CONTENT))
    path = download_verified("f.gz", [missing, wrong, truncated, good], tmp_path / "dest", SHA)
    assert gzip.decompress(path.read_bytes()) == CONTENT


def test_all_sources_failing_lists_them_and_writes_nothing(tmp_path):
    wrong = source(tmp_path / "wrong", gzip.compress(b"something else"))
    missing = (tmp_path / "missing").as_uri() + "/"
    with pytest.raises(DataError) as e:
        download_verified("f.gz", [wrong, missing], tmp_path / "dest", SHA)
    msg = str(e.value)
    assert msg.startswith("f.gz: could not be downloaded") and "SHA-256 of the content" in msg
    assert wrong in msg and missing in msg and str(tmp_path / "dest") in msg
    assert len(e.value.failures) == 2
    assert not (tmp_path / "dest").exists() or not any((tmp_path / "dest").iterdir())


def test_decode_gzip_passes_raw_content_through():
    assert decode_gzip(CONTENT, "x") == CONTENT
    assert decode_gzip(gzip.compress(CONTENT), "x") == CONTENT
