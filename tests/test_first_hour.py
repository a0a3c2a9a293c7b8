"""A newcomer's first hour (issue 16), checked the way a user meets it: the CLI's help,
version and output, fast and clear failures, one-time warnings, Ctrl-C, thread settings
and the bench command (from an installed wheel, without the source tree)."""
import argparse
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

import distgrad as dg
import distgrad.nn as nn
from distgrad import _backend, _hints, _interrupt
from distgrad.cli import make_parser, tutorial_transcript
from distgrad.errors import ResizeError
from distgrad.scheduler.local import usable_cores

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).resolve().parent / "scripts"


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def _cli(*args, timeout=300, **kw):
    return subprocess.run([sys.executable, "-m", "distgrad.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=kw.pop("env", None) or _env(), **kw)


def _has_gpu():
    try:
        _backend.cupy_module()
        return True
    except _backend.DeviceError:
        return False


# ----------------------------------------------------------------------------- the CLI

def test_version():
    r = _cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"distgrad {dg.__version__}"


def test_every_option_has_help_and_shows_its_default():
    parser = make_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subs.choices) == {"demo", "tutorial", "info", "bench"}
    for name, sub in subs.choices.items():
        formatter = sub._get_formatter()
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"distgrad {name} {action.option_strings}: no help text"
            if action.default is not argparse.SUPPRESS:
                assert "%(default)" in formatter._get_help_string(action), (name, action.option_strings)
        assert "(default: 2)" in subs.choices["demo"].format_help()


def test_tutorial_transcript_shows_each_statement_before_its_output(capsys):
    ns = tutorial_transcript('"""doc"""\nx = 1 + 1\nfor i in range(2):\n    x += i\nprint("x is", x)\n')
    assert ns["x"] == 3
    assert capsys.readouterr().out == (">>> x = 1 + 1\n>>> for i in range(2):\n...     x += i\n"
                                       ">>> print(\"x is\", x)\nx is 3\n")


def test_info_shows_the_thread_settings():
    r = _cli("info")
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("threads:"))
    assert f"{usable_cores()} usable cores" in line and "BLAS in this process" in line


def test_demo_says_what_it_does_and_labels_its_figures():
    r = _cli("demo", "--backend", "local", "--steps", "30")        # stdout is a pipe here
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("distgrad demo: 2 local workers on cpu")
    progress = [ln for ln in lines if ln.startswith("training on 2 local workers: step ")]
    # Without a terminal: a plain line now and then, never a bar redrawn per step.
    assert progress and progress[-1].startswith("training on 2 local workers: step 30/30")
    assert len(progress) <= 3 and "\r" not in r.stdout and "it/s" not in r.stdout
    assert re.search(r"^training accuracy [\d.]+% \(2,400 samples\), held-out accuracy [\d.]+% "
                     r"\(600 samples never trained on\)", r.stdout, re.M)
    bar = float(re.search(r"step 30/30, loss [\d.]+, ([\d,]+) samples/s", r.stdout).group(1).replace(",", ""))
    summary = float(re.search(r"^throughput ([\d,]+) samples/s", r.stdout, re.M).group(1).replace(",", ""))
    assert abs(bar - summary) <= 0.02 * summary          # one figure, measured one way
    assert "(match)" in r.stdout


def test_demo_checks_optional_dependencies_before_training(tmp_path):
    hide = tmp_path / "hide"
    (hide / "matplotlib").mkdir(parents=True)
    (hide / "matplotlib" / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    env = _env(PYTHONPATH=os.pathsep.join([str(hide), str(ROOT)]))
    r = _cli("demo", "--backend", "local", "--plot", str(tmp_path / "loss.png"), env=env)
    assert r.returncode == 2
    assert r.stderr.strip() == ("distgrad demo: error: --plot needs matplotlib: pip install matplotlib "
                                "(or pip install '.[plot]' in the distgrad checkout)")
    assert "training on" not in r.stdout                   # it failed before training


# ----------------------------------------------------------------------------- fast, clear failures

def test_a_second_init_fails_at_once_and_works_after_shutdown():
    with dg.init(workers=2, backend="local"):
        for backend in ("local", "ray"):          # nothing is started before the check
            with pytest.raises(RuntimeError, match="a cluster is already active in this process"):
                dg.init(workers=2, backend=backend, timeout_s=20)
    with dg.init(workers=1, backend="local") as c:
        assert c.shard(np.ones((3, 1), np.float32)).sum().item() == 3.0


@pytest.mark.parametrize("backend", ["ray", "local"])
def test_gpu_request_without_cupy_or_gpu_says_so_before_starting_ray(backend):
    if _has_gpu():
        pytest.skip("this machine has cupy and a GPU: the request would succeed")
    code = ("import sys, distgrad as dg\n"
            f"try:\n    dg.init(workers=2, device='cuda', backend={backend!r})\n"
            "except Exception as e:\n    print(type(e).__name__ + ':', e)\n"
            "print('ray started:', 'ray' in sys.modules and sys.modules['ray'].is_initialized())\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(),
                       timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("DeviceError: device='cuda'") and "cupy" in r.stdout
    assert r.stdout.rstrip().endswith("ray started: False")


@pytest.mark.ray
def test_resource_errors_are_sentences_and_come_at_once_on_a_local_ray(ray_session):
    with pytest.raises(ResizeError) as err:
        dg.init(workers=64, backend="ray", timeout_s=600)     # a local instance cannot grow
    msg = str(err.value)
    assert msg.startswith("could not place 64 workers (1 CPU each): this Ray instance has ")
    assert "room for" in msg and "{" not in msg and msg.endswith(".")
    if not _has_gpu():
        with pytest.raises(ResizeError, match=r"device='cuda' takes a GPU per worker: use device='cpu'"):
            dg.init(workers=1, backend="ray", device="cuda", timeout_s=600)


@pytest.mark.ray
def test_timeout_s_bounds_the_wait_for_placement_on_a_cluster(ray_session):
    import ray
    with pytest.raises(ResizeError) as err:
        dg.init(workers=64, backend="ray", address="auto", timeout_s=1)   # a cluster might grow
    msg = str(err.value)
    assert "within 1 s" in msg and "free, of" in msg and "{" not in msg
    assert all(pg["state"] != "PENDING" for pg in ray.util.placement_group_table().values())


# ----------------------------------------------------------------------------- warnings, once each

@pytest.fixture
def fresh_hints(monkeypatch):
    monkeypatch.setattr(_hints, "_shown", set())


def test_float64_data_with_a_float32_model_warns_once_at_the_users_line(fresh_hints):
    with dg.init(workers=2, backend="local") as c:
        model = c.replicate(nn.Linear(3, 2))
        X = np.ones((8, 3))                                   # float64
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model(c.shard(X.astype(np.float32))).sum().item()
        with pytest.warns(UserWarning, match="the data is float64 but the model is float32") as seen:
            model(c.shard(X)).sum().item()
            model(c.shard(X)).sum().item()
        assert len(seen) == 1 and seen[0].filename == __file__


def test_float64_data_with_a_float64_model_is_quiet(fresh_hints):
    with dg.init(workers=2, backend="local") as c:
        w = c.replicate(dg.autograd.Variable(dg.tensor(np.ones((3, 1))), requires_grad=True))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            (c.shard(np.ones((8, 3))) @ w).sum().item()


def test_a_batch_copied_whole_to_every_worker_warns_once(fresh_hints):
    X = np.ones((512, 3), np.float32)
    with dg.init(workers=2, backend="local") as c:
        model = c.replicate(nn.Linear(3, 2))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model(c.shard(X)).sum().item()                    # sharded: the intended way
            model(c.replicate(dg.tensor(X))).sum().item()     # replicated on purpose
        with pytest.warns(UserWarning, match=r"every worker computes the whole batch; did you mean "
                          r"cluster\.shard\(x\)\?") as seen:
            model(dg.tensor(X)).sum().item()
            model(dg.tensor(X + 1)).sum().item()
        assert len(seen) == 1 and seen[0].filename == __file__


class _Lines:
    """A child's output lines, read by a thread: select() on a buffered text pipe can miss
    lines already read into the buffer."""

    def __init__(self, stream):
        self.queue, self.seen = queue.Queue(), []
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream):
        for line in stream:
            self.queue.put(line)
        self.queue.put(None)

    def next(self, timeout):
        """The next line; None at the end of the output or after ``timeout`` seconds."""
        try:
            line = self.queue.get(timeout=timeout)
        except queue.Empty:
            return None
        if line is not None:
            self.seen.append(line)
        return line

    def text(self):
        return "".join(self.seen)


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.parametrize("forward", [True, False], ids=["forwarded", "off"])
def test_worker_output_reaches_the_driver_prefixed_with_the_rank(forward):
    code = ("import sys, ray, distgrad as dg\n"
            f"c = dg.init(workers=2, log_to_driver={forward})\n"
            "ray.get([a.__ray_call__.remote(lambda self: print(f'hello from rank {self.rank}', flush=True))"
            " for a in c.gang.actors])\n"
            "print('SENT', flush=True)\n"
            "sys.stdin.readline()\n"
            "c.shutdown()\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env=_env(), cwd=ROOT)
    lines = _Lines(p.stdout)
    try:
        while (line := lines.next(300)) is not None and not line.startswith("SENT"):
            pass
        # Forwarding goes through Ray's log monitor: wait for both lines (or, when it is
        # off, long enough that they would have come).
        deadline = time.monotonic() + (60 if forward else 5)
        while time.monotonic() < deadline and not all(f"hello from rank {r}" in lines.text() for r in (0, 1)):
            lines.next(max(deadline - time.monotonic(), 0.01))
        p.stdin.write("\n")
        p.stdin.flush()
        p.wait(timeout=120)
        while lines.next(30) is not None:
            pass
    finally:
        if p.poll() is None:
            p.kill()
    out = re.sub(r"\x1b\[[0-9;]*m", "", lines.text())        # Ray colours the prefix
    assert p.returncode == 0, out
    for r in (0, 1):
        if forward:
            assert re.search(rf"^\(rank {r} pid=\d+\) hello from rank {r}$", out, re.M), out
        else:
            assert f"hello from rank {r}" not in out


# ----------------------------------------------------------------------------- Ctrl-C

def interrupt_lands_after(fn):
    """Whether an interrupt deferred while ``fn()`` ran is delivered within a minute after."""
    try:
        fn()
        for _ in range(6000):            # the re-delivered interrupt lands in this loop
            time.sleep(0.01)
    except KeyboardInterrupt:
        return True
    return False


def test_an_interrupt_inside_a_finalizer_is_delivered_after_it():
    class Finalized:
        def __del__(self):
            _interrupt._handler(signal.SIGINT, sys._getframe())     # SIGINT arriving right here

    assert interrupt_lands_after(Finalized)


def test_an_interrupt_inside_an_atomic_function_is_delivered_after_it():
    returned = []

    @_interrupt.atomic
    def bookkeeping():
        assert _interrupt.must_defer(sys._getframe())
        _interrupt._handler(signal.SIGINT, sys._getframe())    # SIGINT arriving right here
        returned.append(True)                                  # ...does not stop this

    assert interrupt_lands_after(bookkeeping) and returned
    assert not _interrupt.must_defer(sys._getframe())


def _new_segments(before):
    from distgrad.workers.collective.shm_segment import list_segments
    return sorted(set(list_segments()) - before)


def _ray_processes(tmpdir):
    """Processes of the Ray instance whose temp dir is ``tmpdir`` (raylet, GCS, workers)."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if str(tmpdir).encode() in (d / "cmdline").read_bytes():
                    found.append(int(d.name))
            except OSError:
                pass
    return found


def _interrupt_run(args, ready, tmp_path, until_gone=60):
    """Start ``args`` in a session of its own (as a terminal would: Ctrl-C goes to the whole
    group), wait for a line starting with ``ready``, send SIGINT, and return
    (returncode, stdout lines, stderr)."""
    from distgrad.workers.collective.shm_segment import list_segments
    before = set(list_segments())
    ray_tmp = Path(tempfile.mkdtemp(prefix="dgint-", dir="/tmp"))
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                         env=_env(RAY_TMPDIR=str(ray_tmp)), start_new_session=True)
    lines = _Lines(p.stdout)
    try:
        while (line := lines.next(300)) is not None and not line.startswith(ready):
            pass
        assert line is not None, lines.text()
        os.killpg(p.pid, signal.SIGINT)
        p.wait(timeout=120)
        err = p.stderr.read()
        while lines.next(30) is not None:
            pass
        deadline = time.monotonic() + until_gone
        while (_ray_processes(ray_tmp) or _new_segments(before)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _ray_processes(ray_tmp), "Ray processes left behind"
        assert not _new_segments(before), "shared-memory segments left behind"
        return p.returncode, lines.seen, err
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["ray", "local"])
def test_ctrl_c_stops_the_demo_and_exits_130(backend, tmp_path):
    rc, lines, err = _interrupt_run(
        [sys.executable, "-m", "distgrad.cli", "demo", "--backend", backend, "--steps", "1000000"],
        f"training on 2 {backend} workers: step 1/", tmp_path)
    assert rc == 130, err
    assert err.rstrip().endswith("distgrad demo: interrupted")
    assert "Traceback" not in err and "Exception ignored" not in err
    out = "".join(lines)
    assert "step 1000000/" not in out
    if backend == "ray":
        # The start-up said what it did, in order, and Ray's own start-up warnings stayed quiet.
        order = ["distgrad demo:", "starting a local Ray instance", "Ray is up", "placing 2 workers",
                 "2 workers ready", "training on 2 ray workers: step 1/"]
        starts = [next(i for i, ln in enumerate(lines) if ln.startswith(s)) for s in order]
        assert starts == sorted(starts), out
        assert "Token authentication" not in out + err


@pytest.mark.slow
@pytest.mark.parametrize("backend,interrupts", [("ray", 15), ("local", 40)])
def test_every_ctrl_c_lands_and_the_last_one_ends_the_program(backend, interrupts, tmp_path):
    """The README's loop, interrupted again and again at random moments: each Ctrl-C must
    stop it at once (none swallowed by a finalizer); the last, uncaught, ends the process
    by SIGINT (a shell shows 130) with the workers gone, though it never calls shutdown()."""
    script = SCRIPTS / "interrupted_training.py"
    from distgrad.workers.collective.shm_segment import list_segments
    before = set(list_segments())
    ray_tmp = Path(tempfile.mkdtemp(prefix="dgint-", dir="/tmp"))
    p = subprocess.Popen([sys.executable, str(script), backend, str(interrupts)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                         env=_env(RAY_TMPDIR=str(ray_tmp)), start_new_session=True)
    rng = np.random.default_rng(0)
    lines = _Lines(p.stdout)
    try:
        assert (lines.next(300) or "").startswith("READY"), lines.text()
        for i in range(interrupts + 1):
            time.sleep(rng.uniform(0.02, 0.3))
            os.killpg(p.pid, signal.SIGINT)
            if i < interrupts:
                line = lines.next(60)
                assert line is not None, f"Ctrl-C number {i + 1} was swallowed: training went on"
                assert line.startswith(f"INTERRUPTED {i + 1}"), lines.text()
        p.wait(timeout=120)
        err = p.stderr.read()
        assert p.returncode == -signal.SIGINT, err
        assert "Exception ignored" not in err and err.rstrip().endswith("KeyboardInterrupt")
        deadline = time.monotonic() + 60
        while (_ray_processes(ray_tmp) or _new_segments(before)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _ray_processes(ray_tmp) and not _new_segments(before)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- threads

def _blas_threads():
    from threadpoolctl import threadpool_info
    return [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]


def test_local_backend_divides_the_cores_among_its_workers():
    before = _blas_threads()
    with dg.init(workers=2, backend="local") as c:
        assert c.gang.blas_threads == max(1, usable_cores() // 2)
        assert _blas_threads() and set(_blas_threads()) == {c.gang.blas_threads}
    assert _blas_threads() == before


@pytest.mark.ray
def test_ray_workers_pin_their_blas_to_their_cpu_share(ray_session):
    import ray
    with dg.init(workers=2, backend="ray") as c:
        pools = ray.get([a.threads.remote() for a in c.gang.actors])
    blas = [p["threads"] for worker in pools for p in worker if p["api"] == "blas"]
    assert len(blas) >= 2 and set(blas) == {1}


# ----------------------------------------------------------------------------- bench

def _hide_torch(tmp_path):
    hide = tmp_path / "hide"
    (hide / "torch").mkdir(parents=True)
    (hide / "torch" / "__init__.py").write_text("raise ImportError(\"No module named 'torch'\")\n")
    return _env(PYTHONPATH=os.pathsep.join([str(hide), str(ROOT)]))


def test_bench_lists_its_scripts_and_refuses_an_unknown_one():
    r = _cli("bench", "--list")
    assert r.returncode == 0 and {"allreduce", "bench_nn", "recovery"} <= set(r.stdout.split())
    r = _cli("bench", "--only", "nosuch")
    assert r.returncode == 2 and "no benchmark matches --only 'nosuch'" in r.stderr


@pytest.mark.parametrize("script", ["bench_nn", "allreduce", "engine_overhead"])
def test_bench_without_its_baseline_refuses_in_one_line(script, tmp_path):
    r = subprocess.run([sys.executable, "-m", f"distgrad.bench.{script}", "--quick"], capture_output=True,
                       text=True, timeout=300, env=_hide_torch(tmp_path), cwd=tmp_path)
    assert r.returncode == 3, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert "cannot measure the baseline" in r.stderr and "pip install torch==2.13.0" in r.stderr
    assert r.stdout == ""                                                   # no ratio printed
    assert list(tmp_path.iterdir()) == [tmp_path / "hide"]                  # and nothing written


def test_engine_overhead_baseline_computes_what_distgrad_computes():
    # The hand-written NumPy MLP is the floor the engine is measured against: it must give
    # distgrad's loss gradients (mlp_case asserts it), or the ratio means nothing.
    from distgrad.bench import engine_overhead
    d_step, n_step = engine_overhead.mlp_case(np.random.default_rng(1))
    x = np.random.default_rng(2).standard_normal((3, 5)).astype(np.float64)
    y = np.array([0, 2, 1])
    r = np.random.default_rng(3)
    layers = [(r.standard_normal((4, 5)), r.standard_normal(4)),
              (r.standard_normal((3, 4)), r.standard_normal(3))]
    loss, grads = engine_overhead.numpy_mlp_step(x, y, layers)
    torch = pytest.importorskip("torch")
    tx = torch.tensor(x)
    ws = [torch.tensor(w, requires_grad=True) for w, _ in layers]
    bs = [torch.tensor(b, requires_grad=True) for _, b in layers]
    h = torch.relu(tx @ ws[0].T + bs[0])
    tl = torch.nn.functional.cross_entropy(h @ ws[1].T + bs[1], torch.tensor(y))
    tl.backward()
    assert np.isclose(loss, tl.item())
    for (gw, gb), w, b in zip(grads, ws, bs):
        np.testing.assert_allclose(gw, w.grad.numpy(), rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(gb, b.grad.numpy(), rtol=1e-10, atol=1e-14)


def test_distgrad_bench_reports_the_scripts_that_could_not_run(tmp_path):
    r = _cli("bench", "--only", "bench_nn", "--quick", env=_hide_torch(tmp_path), cwd=tmp_path)
    assert r.returncode == 1
    assert "1 of 1 did not complete: bench_nn" in r.stderr


def test_bench_writes_result_files_only_with_save(tmp_path):
    pytest.importorskip("torch")
    committed = {p: p.stat().st_mtime_ns for p in (ROOT / "bench" / "results").iterdir()}
    quick = ["--quick", "--seconds", "0.05", "--rounds", "1", "--threads", "1"]
    r = subprocess.run([sys.executable, "-m", "distgrad.bench.bench_nn", *quick], capture_output=True,
                       text=True, timeout=600, env=_env(), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert re.search(r"MLP .* [\d.]+x", r.stdout) and list(tmp_path.iterdir()) == []
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "distgrad.bench.bench_nn", *quick, "--save", str(out)],
                       capture_output=True, text=True, timeout=600, env=_env(), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert re.search(r"MLP .* [\d.]+x", (out / "bench_nn.md").read_text())
    assert committed == {p: p.stat().st_mtime_ns for p in (ROOT / "bench" / "results").iterdir()}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """distgrad built into a wheel and installed into a folder of its own (its dependencies
    come from this environment); commands run outside the source tree."""
    tmp = tmp_path_factory.mktemp("installed")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp / "wheel"), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = (tmp / "wheel").glob("distgrad-*.whl")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                        str(tmp / "site"), str(wheel)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(tmp / "site")
    work = tmp / "work"
    work.mkdir()
    return {"env": env, "cwd": work, "bin": tmp / "site" / "bin"}


@pytest.mark.slow
def test_distgrad_bench_runs_from_an_installed_wheel(installed):
    env, cwd = installed["env"], installed["cwd"]
    where = subprocess.run([sys.executable, "-c", "import distgrad.bench, distgrad; print(distgrad.__file__)"],
                           capture_output=True, text=True, env=env, cwd=cwd, timeout=120)
    assert where.returncode == 0 and where.stdout.startswith(str(installed["bin"].parent)), where
    r = subprocess.run([str(installed["bin"] / "distgrad"), "--version"], capture_output=True, text=True,
                       env=env, cwd=cwd, timeout=120)
    assert r.stdout.strip() == f"distgrad {dg.__version__}", r.stderr
    pytest.importorskip("torch")
    r = subprocess.run([str(installed["bin"] / "distgrad"), "bench", "--only", "bench_nn", "--quick"],
                       capture_output=True, text=True, env=env, cwd=cwd, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "== distgrad.bench.bench_nn" in r.stdout and re.search(r"LeNet .* [\d.]+x", r.stdout)
    assert list(cwd.iterdir()) == []                         # nothing written without --save


def test_every_package_folder_is_in_the_wheel():
    # `pip install .` ships only the packages pyproject.toml lists: a new package folder
    # missing there works in an editable checkout and breaks every installed copy.
    import tomllib
    root = Path(__file__).resolve().parent.parent
    setup = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setup["packages"])
    folders = {pkg: root / path for pkg, path in setup["package-dir"].items()}
    found = set()
    for pkg, folder in folders.items():
        for init in folder.rglob("__init__.py"):
            rel = init.parent.relative_to(folder).parts
            if not any(part.startswith((".", "_")) or part == "results" for part in rel):
                found.add(".".join((pkg, *rel)))
    missing = sorted(found - listed)
    assert not missing, f"add {missing} to [tool.setuptools] packages in pyproject.toml"
