"""Faults a long run meets: progress off a terminal, checkpoints by time, SIGINT/SIGTERM, two
writers of one run file, stale temporaries, a full disk, a read-only folder, and an interrupted
comparison. Real processes where the fault is a process's (signals, concurrent writers)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from engine.app.plots import seed_curves
from engine.app.progress import Progress, format_duration
from engine.app.runfile import load_run
from tests.engine.app.test_cli import (SMALL, TINY, _assert_same_run, _cstep, _saved_iterations, _start_child,  # noqa: F401
                                       cache_dir, tiny_presets)

SLOW = {"CSTEP_TEST_STEP_SLEEP": "0.05"}  # 6 iterations per epoch: about 0.3 s of training per epoch


def _wait_saved(proc, log, at_least: int = 1, timeout: float = 60) -> list[int]:
    deadline = time.monotonic() + timeout
    while len(_saved_iterations(log)) < at_least and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return _saved_iterations(log)


def _log_text(log) -> str:
    log.flush()
    log.seek(0)
    return log.read()


# --- 2. progress off a terminal ---------------------------------------------------------------------
def test_progress_lines_off_a_terminal_carry_rate_and_eta(tmp_path, capsys):
    rc, _, err = _cstep(capsys, "train", *SMALL, "--solver", "sgd", "--epochs", 2, "--log-every", 2,
                        "--out", tmp_path / "a.h5")
    assert rc == 0
    lines = [ln for ln in err.splitlines() if " it/s" in ln]
    assert len(lines) == 6  # iterations 2, 4, 6 of each epoch
    assert lines[0].startswith("epoch 1/2  iter 2/6 (2 total)  loss ") and "ETA " in lines[0]
    epoch_lines = [ln for ln in err.splitlines() if ln.startswith("epoch 1/2  iter 6 ")]
    assert epoch_lines and "ETA" in epoch_lines[0]


def test_eta_counts_the_iterations_left_at_the_measured_rate():
    class It:
        batches_per_epoch = 10

    class Tr:
        iterator, iteration, epoch, cpu_time = It(), 1, 0, 0.0

    p = Progress(quiet=True, max_time=None)
    tr = Tr()
    p.step(tr, {"loss": 1.0}, 3)
    p._start -= 2.0  # two seconds ago
    tr.iteration = 11  # 11 iterations (the first one's included) in 2 s: 5.5 it/s, 19 left of 30
    assert p.eta(tr, 3) == pytest.approx(19 / 5.5, rel=1e-3)
    p.max_time, tr.cpu_time = 5.0, 4.0  # the CPU budget ends first
    assert p.eta(tr, 3) == pytest.approx(1.0)
    assert [format_duration(s) for s in (7.2, 95, 3725)] == ["7s", "1m35s", "1h02m"]


# --- 3. checkpoints by time, signals -------------------------------------------------------------------
def test_checkpoints_by_time(tmp_path, capsys):
    for every_s, name in ((1e-9, "often.h5"), (0, "epochs.h5")):
        rc, _, err = _cstep(capsys, "train", *SMALL, "--solver", "sgd", "--epochs", 1, "--checkpoint-every-s", every_s,
                            "--out", tmp_path / name, "--quiet")
        assert rc == 0, err
    often, epochs = load_run(tmp_path / "often.h5"), load_run(tmp_path / "epochs.h5")
    assert often.config["checkpoint_every_s"] == 1e-9
    # the first, epoch 0's evaluation, one per iteration, the epoch end and the final one; against all but the iterations
    assert often.progress["checkpoints"] == 4 + 6 and epochs.progress["checkpoints"] == 4


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_a_checkpoint_at_the_next_iteration_and_resume_is_exact(sig, tmp_path, capsys):
    common = [*SMALL, "--solver", "kbfgs", "--quiet", "--checkpoint-every-s", "0"]
    ref = tmp_path / "ref.h5"
    assert _cstep(capsys, "train", *common, "--epochs", 3, "--out", ref)[0] == 0
    run = tmp_path / "run.h5"
    proc, log = _start_child(["train", *common, "--epochs", 3, "--out", run], tmp_path, SLOW)
    _wait_saved(proc, log, 3)  # the initial file, epoch 0's evaluation and the end of epoch 1
    time.sleep(0.12)
    proc.send_signal(sig)
    assert proc.wait(timeout=60) == 128 + sig
    text = _log_text(log)
    name = signal.Signals(sig).name
    assert f"interrupted by {name}; saved a checkpoint at iteration" in text and f"cstep resume {run}" in text
    rec = load_run(run)
    assert rec.progress["status"] == "interrupted" and 6 < rec.progress["iteration"] < 18
    assert rec.progress["iteration"] == _saved_iterations(log)[-1]
    rc, _, err = _cstep(capsys, "resume", run, "--quiet")
    assert rc == 0, err
    _assert_same_run(ref, run)


def test_a_second_signal_exits_at_once_and_keeps_the_last_checkpoint(tmp_path):
    run = tmp_path / "run.h5"
    proc, log = _start_child(["train", *SMALL, "--solver", "sgd", "--epochs", 50, "--out", run, "--quiet"], tmp_path,
                             {"CSTEP_TEST_STEP_SLEEP": "0.5"})
    _wait_saved(proc, log, 1)
    time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # inside the same half-second step: no waiting for its end
    assert proc.wait(timeout=30) == 130
    assert "keeps its last checkpoint" in _log_text(log)
    assert load_run(run).progress["iteration"] == 0


# --- 10. two writers, stale temporaries -----------------------------------------------------------------
def test_a_second_writer_of_the_same_run_file_gets_one_clear_line(tmp_path, capsys):
    run = tmp_path / "same.h5"
    proc, log = _start_child(["train", *SMALL, "--solver", "sgd", "--epochs", 50, "--out", run, "--quiet"], tmp_path,
                             {"CSTEP_TEST_STEP_SLEEP": "0.2"})
    try:
        _wait_saved(proc, log, 1)
        for argv in (["train", *SMALL, "--epochs", 1, "--out", run, "--overwrite"], ["resume", run]):
            rc, _, err = _cstep(capsys, *argv)
            assert rc == 2 and len(err.strip().splitlines()) == 1
            assert f"is being written by another cstep process (PID {proc.pid})" in err
        # a process started 0.2 s after another with the same --out: one of them wins, the other says why
        out2 = tmp_path / "race.h5"
        procs = [_start_child(["train", *SMALL, "--solver", "sgd", "--epochs", 1, "--out", out2, "--quiet"], tmp_path)]
        time.sleep(0.2)
        procs.append(_start_child(["train", *SMALL, "--solver", "sgd", "--epochs", 1, "--out", out2, "--quiet"], tmp_path))
        codes = sorted(p.wait(timeout=120) for p, _ in procs)
        assert codes == [0, 2], [_log_text(lg) for _, lg in procs]
        loser = next(_log_text(lg) for p, lg in procs if p.returncode == 2)
        assert "being written by another cstep process" in loser or "already exists" in loser
        assert "No such file" not in loser and "Traceback" not in loser
        assert load_run(out2).progress["status"] == "complete"
    finally:
        proc.kill()
        proc.wait()


def test_stale_temporaries_of_dead_writers_go_but_a_live_writers_stay(tmp_path, capsys):
    run = tmp_path / "t.h5"
    live = subprocess.Popen(["sleep", "30"])
    try:
        alive = tmp_path / f".t.h5.{live.pid}.tmp"
        dead = tmp_path / ".t.h5.999999999.tmp"
        alive.write_bytes(b"partial")
        dead.write_bytes(b"partial")
        rc, _, err = _cstep(capsys, "train", *SMALL, "--solver", "sgd", "--epochs", 1, "--out", run, "--quiet")
        assert rc == 0, err
        assert alive.exists() and not dead.exists()
    finally:
        live.kill()
        live.wait()


# --- 9. a full disk, a read-only folder -----------------------------------------------------------------
def _mount_tmpfs(where: Path, options: str) -> bool:
    if os.geteuid() != 0:
        return False
    where.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True).returncode == 0


def test_a_full_disk_is_one_line_and_the_previous_checkpoint_survives(tmp_path):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "size=2m"):
        pytest.skip("needs root and tmpfs mounts (a tiny file system to fill)")
    try:
        run = disk / "run.h5"
        proc, log = _start_child(["train", *SMALL, "--solver", "kbfgs", "--epochs", 20, "--out", run, "--quiet"], tmp_path,
                                 {"CSTEP_TEST_STEP_SLEEP": "0.1"})
        saved = _wait_saved(proc, log, 1)
        assert saved == [0]
        subprocess.run(["dd", "if=/dev/zero", f"of={disk / 'filler'}", "bs=4k"], capture_output=True)  # until ENOSPC
        rc = proc.wait(timeout=120)
        text = _log_text(log)
        assert rc == 1, text  # not 139 (a segfault), not a traceback
        errors = [ln for ln in text.splitlines() if ln.startswith("cstep train: error")]
        assert len(errors) == 1 and "No space left on device" in errors[0] and "previous checkpoint is intact" in errors[0]
        assert "Traceback" not in text
        assert load_run(run).progress["iteration"] == 0
        assert not list(disk.glob(".run.h5.*.tmp"))
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_a_read_only_folder_is_one_line(tmp_path, capsys):
    ro = tmp_path / "ro"
    if not _mount_tmpfs(ro, "ro,size=64k"):
        pytest.skip("needs root and tmpfs mounts (a read-only folder that root cannot write either)")
    try:
        rc, _, err = _cstep(capsys, "train", *SMALL, "--epochs", 1, "--out", ro / "run.h5")
        assert rc == 1 and len(err.strip().splitlines()) == 1
        assert "cannot write run file" in err and "Read-only file system" in err
    finally:
        subprocess.run(["umount", str(ro)], capture_output=True)


# --- 4. an interrupted comparison ------------------------------------------------------------------------
def test_an_interrupted_comparison_is_finished_by_compare_resume(tmp_path, capsys):
    common = ["compare", "--net", TINY, "--n-train", 600, "--n-test", 200, "--batch-size", 100, "--solvers", "sgd,adam",
              "--epochs", 2, "--quiet", "--checkpoint-every-s", "0"]
    ref_dir, dir_ = tmp_path / "ref", tmp_path / "cmp"
    rc, out, err = _cstep(capsys, *common, "--out-dir", ref_dir, "--json")
    assert rc == 0, err
    reference = {r["solver"]: r["run"] for r in json.loads(out)["runs"]}
    proc, log = _start_child([*map(str, common), "--out-dir", dir_], tmp_path, SLOW)
    _wait_saved(proc, log, 5)  # both initial files, then sgd's epochs 0 and 1
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    manifest = next(dir_.glob("compare-*.json"))
    assert f"cstep compare --resume {manifest}" in _log_text(log)
    rc, out, err = _cstep(capsys, "compare", "--resume", dir_, "--json")
    assert rc == 0, err
    result = json.loads(out)
    assert [r["status"] for r in result["runs"]] == ["complete", "complete"] and Path(result["plot"]).exists()
    for r in result["runs"]:
        _assert_same_run(reference[r["solver"]], r["run"])
    assert [e["status"] for e in json.loads(manifest.read_text())["runs"]] == ["complete", "complete"]


# --- cstep compare over seeds, with a CPU budget ------------------------------------------------------
def test_compare_over_seeds_reports_median_and_range(tmp_path, capsys):
    rc, out, err = _cstep(capsys, "compare", "--net", TINY, "--n-train", 600, "--n-test", 200, "--batch-size", 100,
                          "--solvers", "sgd,adam", "--seeds", "1,2,3", "--budget", "epochs=2", "--quiet", "--json",
                          "--out-dir", tmp_path)
    assert rc == 0, err
    result = json.loads(out)
    assert len(result["runs"]) == 6 and sorted({r["seed"] for r in result["runs"]}) == [1, 2, 3]
    for solver in ("sgd", "adam"):
        stats = result["by_solver"][solver]
        finals = sorted(r["train_loss"][-1] for r in result["runs"] if r["solver"] == solver)
        assert stats["train_loss"] == {"median": finals[1], "min": finals[0], "max": finals[2]}
        assert stats["diverged"] == 0 and stats["seeds"] == [1, 2, 3]
    assert Path(result["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    seeds_used = {load_run(r["run"]).config["seed"] for r in result["runs"]}
    assert seeds_used == {1, 2, 3}
    rc, out, err = _cstep(capsys, "compare", "--net", TINY, "--n-train", 600, "--n-test", 200, "--batch-size", 100,
                          "--solvers", "sgd", "--seeds", "4,5", "--budget", "cpu=0.05", "--out-dir", tmp_path / "b")
    assert rc == 0, err
    assert "median [range]" in out and "sgd" in out
    assert all(load_run(p).config["max_time"] == 0.05 for p in (tmp_path / "b").glob("*.h5"))
    rc, _, err = _cstep(capsys, "compare", "--net", TINY, "--solvers", "sgd", "--budget", "gpu=3", "--out-dir", tmp_path)
    assert rc == 2 and "cpu=SECONDS or epochs=N" in err


def test_compare_over_seeds_counts_diverged_runs_and_draws_the_others(tmp_path, capsys):
    """SGD at lr 1e6 blows up on every seed: the table counts the diverged runs and their CPU time is
    what they spent (not the 0 s of the initial checkpoint they keep); the figure's median curve and
    min-max band are those of the finished runs, recomputed here from the run files."""
    rc, out, err = _cstep(capsys, "compare", "--net", TINY, "--n-train", 600, "--n-test", 200, "--batch-size", 100,
                          "--solvers", "sgd,adam", "--seeds", "1,2,3", "--budget", "epochs=2", "--set", "sgd.lr=1e6",
                          "--quiet", "--json", "--out-dir", tmp_path)
    assert rc == 0, err
    result = json.loads(out)
    sgd, adam = result["by_solver"]["sgd"], result["by_solver"]["adam"]
    assert sgd["diverged"] == 3 and adam["diverged"] == 0
    spent = sorted(r["cpu_seconds_spent"] for r in result["runs"] if r["solver"] == "sgd")
    assert all(r["training_cpu_seconds"] == 0 for r in result["runs"] if r["solver"] == "sgd")
    assert spent[0] > 0 and sgd["cpu_seconds"] == {"median": spent[1], "min": spent[0], "max": spent[2]}
    records = [load_run(r["run"]) for r in result["runs"] if r["solver"] == "adam"]
    curves = seed_curves(records + [load_run(r["run"]) for r in result["runs"] if r["solver"] == "sgd"])
    assert (curves["drawn"], curves["diverged"]) == (3, 3)
    for key in ("train_loss", "test_loss"):
        ys = [[float(v) for v in rec.history["epochs"][key]] for rec in records]
        columns = list(zip(*ys))
        assert list(curves[key][0]) == [sorted(c)[1] for c in columns]
        assert list(curves[key][1]) == [min(c) for c in columns] and list(curves[key][2]) == [max(c) for c in columns]
    assert len(curves["epochs"]) == 3  # epochs 0, 1, 2 of the finished runs, not cut by the diverged ones


def test_compare_reports_runs_that_all_diverged_in_their_first_epoch(tmp_path, capsys):
    """Nothing to draw is no reason to drop the table: the diverged runs are still reported (it failed
    with 'no completed epoch to plot' and printed nothing)."""
    for seeds in ("1", "1,2"):
        rc, out, err = _cstep(capsys, "compare", "--net", TINY, "--n-train", 600, "--n-test", 200, "--batch-size", 100,
                              "--solvers", "sgd", "--seeds", seeds, "--budget", "epochs=1", "--set", "sgd.lr=1e6",
                              "--quiet", "--json", "--out-dir", tmp_path / seeds.replace(",", "-"))
        assert rc == 0, err
        result = json.loads(out)
        assert result["plot"] is None and "no figure drawn" in err
        assert [r["status"] for r in result["runs"]] == ["diverged"] * len(seeds.split(","))
        if "," in seeds:
            assert result["by_solver"]["sgd"]["diverged"] == 2
    rc, out, err = _cstep(capsys, "compare", "--net", TINY, "--n-train", 600, "--n-test", 200, "--batch-size", 100,
                          "--solvers", "sgd", "--budget", "epochs=1", "--set", "sgd.lr=1e6", "--out-dir", tmp_path / "t")
    assert rc == 0 and "diverged" in out and "plot: none (no run completed an epoch)" in out
