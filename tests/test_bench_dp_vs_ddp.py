"""bench/dp_vs_ddp.py: the transport check that gates its ratio, and the 2-node mode end to end."""
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "dp_vs_ddp.py")


def test_tcp_links_counts_connections_between_the_given_processes_only():
    pytest.importorskip("ray")
    from distgrad.bench.dp_vs_ddp import _tcp_links
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        child = subprocess.Popen([sys.executable, "-c",
                                  "import socket, sys; s = socket.create_connection(('127.0.0.1', "
                                  f"{port})); sys.stdin.read()"], stdin=subprocess.PIPE)
        try:
            conn, _ = listener.accept()
            with conn:
                assert _tcp_links([os.getpid(), child.pid]) == (1, ["127.0.0.1"])
                assert _tcp_links([os.getpid()]) == (0, [])      # the peer is not in the set
        finally:
            child.stdin.close()
            child.wait(30)


def test_nodes_must_divide_the_workers():
    r = subprocess.run([sys.executable, SCRIPT, "--nodes", "2", "--workers", "3"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--nodes" in r.stderr


@pytest.mark.slow
@pytest.mark.ray
def test_two_simulated_nodes_talk_tcp_and_report_a_ratio(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("ray")
    r = subprocess.run([sys.executable, SCRIPT, "--nodes", "2", "--quick", "--models", "cnn",
                        "--rounds", "1"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "| cnn (batch 256) |" in r.stdout and "x |" in r.stdout
    assert "distgrad: tcp collective on 2 Ray node(s)" in r.stdout
    assert not os.listdir(tmp_path)                        # nothing written without --save
