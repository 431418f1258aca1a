"""``cstep analyze`` and the training probes: the numbers against a dense Hessian of the same
network, parameters and batch (numpy.linalg.eigh), the outputs (table, JSON, figure), the errors,
and probes that leave training untouched."""

from __future__ import annotations

import json

import numpy
import pytest

import nets
from engine.app.runfile import load_run
from engine.app.runs import load_dataset
from engine.backend import to_host
from engine.curvature import HessianRop
from tests.engine.app.test_cli import SMALL, TINY, _cstep, cache_dir, tiny_presets  # noqa: F401 (fixtures)

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def run_file(tmp_path, capsys):
    path = tmp_path / "run.h5"
    rc, _, err = _cstep(capsys, "train", *SMALL, "--solver", "kbfgs", "--dtype", "float64", "--epochs", 2, "--out", path,
                        "--quiet")
    assert rc == 0, err
    return path


def _dense_hessian(path, batch):
    """The exact Hessian of the run's network at its saved parameters on its first ``batch`` examples."""
    rec = load_run(path)
    model = nets.build(rec.config["net"])
    params = model.unflatten(numpy.concatenate([p.reshape(-1) for p in rec.state["params"]]))
    ds = load_dataset(rec.config["dataset"], None, numpy.float64, 600, 200)
    x = ds.x_train[:batch]
    return to_host(HessianRop(model, params, x, x).dense())


def test_top_eigenvalues_and_trace_match_the_dense_hessian(run_file, tmp_path, capsys):
    out_json, out_png = tmp_path / "a.json", tmp_path / "a.png"
    rc, out, err = _cstep(capsys, "analyze", run_file, "--curvature", "cs,rop,fd-central,fd-forward,gn", "--top-k", 4,
                          "--lanczos-iter", 40, "--trace", "--probes", 40, "--per-layer", "--density", "--batch", 100,
                          "--json", out_json, "--plot", out_png)
    assert rc == 0, err
    exact = numpy.linalg.eigvalsh(_dense_hessian(run_file, 100))[::-1]
    result = json.loads(out_json.read_text())
    curv = result["curvatures"]
    for name in ("cs", "rop"):
        numpy.testing.assert_allclose(curv[name]["top_eigenvalues"]["values"], exact[:4], rtol=1e-10)
        t = curv[name]["trace"]
        assert abs(t["hutchinson"] - exact.sum()) < 5 * t["hutchinson_std_error"] + 1e-9
    numpy.testing.assert_allclose(curv["fd-central"]["top_eigenvalues"]["values"], exact[:4], rtol=1e-5)
    assert curv["gn"]["label"] == "Gauss-Newton" and curv["cs"]["cost"]["product_seconds"] > 0
    assert set(curv["cs"]["layers"]) == {"0", "2", "3", "5"}  # the tiny autoencoder's Dense layers 16-8-3-8-16
    assert len(curv["cs"]["density"]["grid"]) == len(curv["cs"]["density"]["density"])
    assert "relative difference from the R-operator" in out and "complex step (cs)" in out
    assert out_png.read_bytes()[:8] == PNG


def test_a_preset_at_its_initial_point_and_the_errors(tmp_path, capsys):
    rc, out, err = _cstep(capsys, "analyze", "--net", TINY, "--top-k", 2, "--batch", 50, "--quiet", "--json", tmp_path / "p.json")
    assert rc == 0, err
    assert json.loads((tmp_path / "p.json").read_text())["target"].startswith(f"{TINY} at its initial point")
    for argv, message in ((["analyze"], "give a run file"), (["analyze", "--net", TINY, "--top-k", 0], "nothing to compute"),
                          (["analyze", "--net", TINY, "--curvature", "cs,nope"], "unknown curvature 'nope'")):
        rc, _, err = _cstep(capsys, *argv)
        assert rc == 2 and message in err and len(err.strip().splitlines()) == 1


def test_training_probes_are_recorded_plotted_and_leave_training_untouched(tmp_path, capsys):
    plain, probed = tmp_path / "plain.h5", tmp_path / "probed.h5"
    common = [*SMALL, "--solver", "kbfgs", "--epochs", 2, "--quiet"]
    assert _cstep(capsys, "train", *common, "--out", plain)[0] == 0
    rc, _, err = _cstep(capsys, "train", *common, "--out", probed, "--probe-every", 4, "--probe", "top-eig,trace")
    assert rc == 0, err
    a, b = load_run(plain), load_run(probed)
    assert a.history["steps"]["loss"] == b.history["steps"]["loss"]  # bit for bit
    probes = b.history["probes"]
    assert probes["iteration"] == [4, 8, 12] and all(v > 0 for v in probes["top_eig"])
    assert all(numpy.isfinite(probes["trace"])) and all(p > 0 for p in probes["products"])
    assert b.config["probe_every"] == 4 and b.config["probes"] == ["top-eig", "trace"]
    rc, _, err = _cstep(capsys, "plot", probed, "--probes", "-o", tmp_path / "probes.png")
    assert rc == 0, err
    assert (tmp_path / "probes.png").read_bytes()[:8] == PNG
    rc, _, err = _cstep(capsys, "plot", plain, "--probes", "-o", tmp_path / "none.png")
    assert rc == 2 and "recorded no curvature probes" in err
    with pytest.raises(SystemExit) as exc:
        _cstep(capsys, "train", *common, "--out", tmp_path / "bad.h5", "--probe", "top-eig,nope")
    assert exc.value.code == 2 and "unknown probe 'nope'" in capsys.readouterr().err
