"""Where a run ran: versions, host, platform, backend and device, the BLAS library and its threads
(the ``/environment`` group of a run file)."""

from __future__ import annotations

import os
import platform
import sys

import numpy

from .. import __version__
from ..backend import GEMM_MATH, backend_name, get_xp


def _version(module: str) -> str:
    try:
        from importlib.metadata import version  # noqa: PLC0415
        return version(module)
    except Exception:
        return ""


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def blas_info() -> dict:
    """The BLAS library NumPy calls and how many threads it runs now (threadpoolctl)."""
    from threadpoolctl import threadpool_info  # noqa: PLC0415 (third-party: read when a run file is written)

    pools = [p for p in threadpool_info() if p.get("user_api") == "blas"]
    if not pools:
        return {"blas": "unknown", "blas_threads": 0}
    p = pools[0]
    layer = f" ({p['threading_layer']})" if p.get("threading_layer") else ""
    return {"blas": f"{p.get('internal_api')} {p.get('version')}{layer}", "blas_threads": int(p.get("num_threads") or 0)}


def environment_info() -> dict:
    """Where a run ran: versions, host, platform, backend and device (flat dict of strings/ints)."""
    import h5py  # noqa: PLC0415 (third-party: loaded when a run file is written)
    import scipy  # noqa: PLC0415

    xp = get_xp()
    env = {
        "cstep_version": __version__,
        "python": sys.version.split()[0],
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "h5py": h5py.__version__,
        "hdf5": h5py.version.hdf5_version,
        "cupy": "",
        "host": platform.node(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count() or 0,
        "backend": backend_name(),
        "device": _cpu_name(),
        **blas_info(),
    }
    if xp.__name__ == "cupy":
        env["cupy"] = xp.__version__
        env.update(GEMM_MATH)  # the GEMM math mode engine.backend pinned (no TF32, no 3M)
        try:
            props = xp.cuda.runtime.getDeviceProperties(xp.cuda.Device().id)
            name = props["name"]
            env["device"] = name.decode() if isinstance(name, bytes) else str(name)
        except Exception:  # the device name is informative only
            env["device"] = "CUDA device"
    else:
        env["cupy"] = _version("cupy") or _version("cupy-cuda12x") or _version("cupy-cuda13x")
    return env
