"""``cstep`` with the command-line tests' tiny presets and toy data set registered, for the ranks
that ``mpiexec`` starts (tests/engine/app/test_distributed.py). Usage: python -m tests.distributed.cli_child ARGS."""

from __future__ import annotations

import sys

import data
from engine.app import cli
from nets import presets
from tests.engine.app.test_cli import TEST_REGISTRY

if __name__ == "__main__":
    registry: dict = {}
    exec(TEST_REGISTRY, registry)
    presets.PRESETS.update(registry["TEST_PRESETS"])
    data.DATASETS.update(registry["TEST_DATASETS"])
    sys.exit(cli.main(sys.argv[1:]))
