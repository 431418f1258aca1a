"""Where data files are looked for and where derived files are written.

Data directory: the explicit ``data_dir`` argument (the CLI's ``--data-dir``), else the
environment variable ``CSTEP_DATA_DIR``, else the user cache directory. Cache directory (downloads
and generated sets): ``CSTEP_CACHE_DIR``, else ``$XDG_CACHE_HOME/cstep``, else ``~/.cache/cstep``.
Files are looked for in the data directory first, then in the cache; nothing is ever written
into the data directory (it may be read-only, as a shared data folder is).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["resolve_data_dir", "resolve_cache_dir", "search_dirs", "searched", "find_file", "atomic_write"]


def resolve_cache_dir() -> Path:
    """``CSTEP_CACHE_DIR``, else ``$XDG_CACHE_HOME/cstep``, else ``~/.cache/cstep`` (not created)."""
    env = os.environ.get("CSTEP_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "cstep"


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The data directory: ``data_dir`` if given, else ``CSTEP_DATA_DIR``, else the cache dir."""
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    env = os.environ.get("CSTEP_DATA_DIR")
    if env:
        return Path(env).expanduser()
    return resolve_cache_dir()


def search_dirs(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """The directories searched for a data file, in order: the data dir, then the cache dir."""
    dirs = [resolve_data_dir(data_dir), resolve_cache_dir()]
    return dirs if dirs[0] != dirs[1] else dirs[:1]


def searched(subdir: str, data_dir=None) -> str:
    """``"<data dir>/<subdir> or <cache dir>/<subdir>"``, for messages about a missing file."""
    return " or ".join(str(d / subdir) for d in search_dirs(data_dir))


def find_file(subdir: str, names: list[str], data_dir=None) -> Path | None:
    """The first existing ``<dir>/<subdir>/<name>`` or ``<dir>/<name>`` over :func:`search_dirs`,
    trying ``names`` in order within each directory; ``None`` if there is none."""
    for d in search_dirs(data_dir):
        for folder in (d / subdir, d):
            for name in names:
                p = folder / name
                if p.is_file():
                    return p
    return None


def atomic_write(path: Path, write) -> Path:
    """Create ``path`` by calling ``write(fileobj)`` on a temporary file in the same folder, then
    renaming it into place, so a crash never leaves a half-written file under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; cached data is not secret
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path
