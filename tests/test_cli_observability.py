"""The distgrad command and the observability API (timeline, stats)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import distgrad as dg
import distgrad.nn as nn
import distgrad.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "distgrad.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_demo_local_backend_trains_and_checks_gradients(tmp_path):
    trace = tmp_path / "trace.json"
    proc = _run("demo", "--backend", "local", "--steps", "60", "--no-progress",
                "--timeline", str(trace))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "(match)" in proc.stdout
    accuracy = float(proc.stdout.split("accuracy ")[1].split("%")[0])
    assert accuracy > 60                      # 60 steps on the spiral set; 300 reach ~99%
    names = {e["name"] for e in json.loads(trace.read_text())["traceEvents"]}
    assert {"forward", "backward", "optimizer step", "driver wait"} <= names


def test_demo_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "loss.png"
    proc = _run("demo", "--backend", "local", "--steps", "10", "--no-progress", "--plot", str(png))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_info_and_bad_device_messages():
    proc = _run("info")
    assert proc.returncode == 0 and "distgrad 0.1.0" in proc.stdout and "numpy" in proc.stdout
    try:
        dg._backend.cupy_module()
        pytest.skip("this machine has a GPU")
    except dg._backend.DeviceError:
        pass
    proc = _run("demo", "--device", "cuda", "--backend", "local")
    assert proc.returncode == 2 and "needs cupy" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.ray
def test_timeline_has_a_track_per_worker_and_every_phase(ray_session, tmp_path):
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((64, 8)).astype(np.float32), rng.integers(0, 3, 64)
    with dg.init(workers=2, backend="ray", bucket_cap_mb=0.001) as cluster:
        model = cluster.replicate(nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3)))
        opt = dg.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(3):
            loss = F.cross_entropy(model(cluster.shard(X)), cluster.shard(y))
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss.item()
        path = cluster.timeline(str(tmp_path / "t.json"))
        stats = cluster.stats()
    trace = json.loads(open(path).read())
    procs = {e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "process_name"}
    assert procs == {"driver", "worker 0", "worker 1"}
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    names = {e["name"] for e in spans}
    assert {"decode", "forward", "backward", "optimizer step", "driver wait"} <= names
    assert any(n.startswith("allreduce bucket") for n in names)
    assert all(e["dur"] >= 0 for e in spans)
    assert len(stats) == 2 and all(len(s["step_times"]) >= 3 and s["bytes_communicated"] > 0
                                   for s in stats)


@pytest.mark.ray
def test_describe_nodes_lists_the_connected_cluster(ray_session):
    from distgrad.scheduler.ray_gang import describe_nodes
    nodes = describe_nodes("auto")          # already connected: reuses the session's Ray
    assert nodes and all(n["alive"] for n in nodes) and sum(n["cpus"] for n in nodes) >= 1
    assert ray_session.is_initialized()


@pytest.mark.parametrize("script", sorted(f for f in os.listdir(os.path.join(ROOT, "bench"))
                                          if f.endswith(".py") and not f.startswith("_")))
def test_every_bench_script_takes_the_flags_distgrad_bench_passes(script):
    """``distgrad bench --quick`` runs each script with ``--quick``: each must accept it."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", script), "--help"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--quick" in proc.stdout


def test_demo_pin_cpus_needs_ray():
    proc = _run("demo", "--backend", "local", "--pin-cpus")
    assert proc.returncode == 2 and "--pin-cpus pins Ray workers" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.ray
@pytest.mark.skipif(len(getattr(os, "sched_getaffinity", lambda _: [])(0)) < 2,
                    reason="needs 2 cores")
def test_demo_pin_cpus_pins_the_workers(ray_session, monkeypatch):
    from distgrad import demo
    seen, init = [], dg.init

    def spy(*args, **kwargs):          # the real init; it notes what the demo got
        cluster = init(*args, **kwargs)
        seen.append(cluster.gang.pinned)
        return cluster
    monkeypatch.setattr(dg, "init", spy)
    res = demo.run(workers=2, backend="ray", steps=5, progress=False, pin_cpus=True)
    cores = sorted(os.sched_getaffinity(0))
    assert seen == [[[cores[0]], [cores[1]]]]
    assert res["grad_max_diff"] <= 1e-4
