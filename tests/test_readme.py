"""The README's Python example runs as shown, on the active backend (NumPy, or CuPy: in the
stand-in pass it runs on the CuPy stand-in), and its numbers are what it claims."""

from __future__ import annotations

import contextlib
import io
import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_readme_python_example_runs_and_hv_matches_the_r_operator():
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "the README has a Python example"
    out = io.StringIO()
    namespace = {}
    with contextlib.redirect_stdout(out):
        exec(compile(blocks[0], "README.md", "exec"), namespace)
    loss, rel = (float(t) for t in out.getvalue().splitlines()[0].split())
    assert loss > 0 and rel < 1e-12  # complex step against the R-operator
    xp = namespace["xp"]
    assert type(namespace["hv"]) is type(xp.zeros(1))  # the products stayed on the backend
