"""Untrusted peers and bad arguments (issue 12): rogue clients on the TCP ring's
rendezvous, names planted in /dev/shm by another user, and the public entry points'
argument checks."""
import hashlib
import os
import secrets
import socket
import threading
import time

import numpy as np
import pytest

import distgrad as dg
from distgrad.autograd import Variable
from distgrad.workers.collective import (CollectiveError, CollectiveTimeoutError, auth, shm_segment,
                                         tcp, tcp_links)
from distgrad.workers.collective.rendezvous import DictStore
from distgrad.workers.collective.shm import ShmCommunicator
from distgrad.workers.collective.shm_segment import SHM_DIR, cleanup_stale_segments


def _threads(fns, timeout=60):
    """Run each fn in a thread; return their results, re-raising the first error."""
    out, errs = [None] * len(fns), [None] * len(fns)

    def run(i):
        try:
            out[i] = fns[i]()
        except BaseException as e:  # noqa: BLE001  (re-raised below)
            errs[i] = e
    ts = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(fns))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout)
        assert not t.is_alive(), "a rank hung"
    for e in errs:
        if e is not None:
            raise e
    return out


def _closed_by_peer(sock, within=3.0):
    """True if the server closes ``sock`` within ``within`` seconds."""
    sock.settimeout(within)
    try:
        while True:
            if not sock.recv(4096):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


# ---------------------------------------------------------------- rogue clients

def test_rogue_clients_neither_join_nor_stall_the_ring():
    """Silent connect, garbage, a wrong secret, a replayed proof and a claimed rank, all
    against rank 0 before rank 1 arrives: the real group forms at once and sums right."""
    store = DictStore()
    name = f"rogue_{os.getpid()}"
    key = f"distgrad/{name}/tcp"
    digest = hashlib.sha256(name.encode()).digest()[:16]
    comms = {}

    def rank(r):
        comms[r] = tcp.TcpCommunicator(r, 2, store, name, timeout_s=10, init_timeout_s=30)
        x = np.full(1000, r + 1.0)
        comms[r].allreduce(x)
        return x

    t0 = threading.Thread(target=lambda: comms.setdefault("r0", _threads([lambda: rank(0)])))
    t0.start()
    addr = store.wait(f"{key}/0", 10)
    secret = store.wait(f"{key}/secret", 10)
    assert addr and secret
    host, port = addr.decode().rsplit(":", 1)
    conn = lambda: socket.create_connection((host, int(port)), timeout=5)   # noqa: E731

    silent = conn()
    garbage = conn()
    garbage.sendall(os.urandom(auth.HELLO.size + auth.PROOF_BYTES))
    rogues = {}
    for what in ("wrong secret", "replayed proof", "claimed rank"):
        s = conn()
        cn = secrets.token_bytes(32)
        claimed = 1
        ch = tcp_links.CH_RING if what != "claimed rank" else tcp_links.CH_P2P
        s.sendall(auth.HELLO.pack(auth.MAGIC, digest, claimed, ch, cn))
        magic, sn, _ = auth.REPLY.unpack(s.recv(auth.REPLY.size, socket.MSG_WAITALL))
        assert magic == auth.MAGIC           # the server answers a well-formed hello...
        if what == "wrong secret":
            p = auth.proof(os.urandom(32), b"client", digest, claimed, 0, ch, cn, sn)
        elif what == "replayed proof":       # right secret even, but an earlier server nonce
            p = auth.proof(secret, b"client", digest, claimed, 0, ch, cn, os.urandom(32))
        else:                                # a rank claimed with nothing to prove it
            p = bytes(32)
        s.sendall(p)
        rogues[what] = s
    for what, s in dict(rogues, garbage=garbage).items():
        assert _closed_by_peer(s), f"{what}: the server kept the connection"

    start = time.monotonic()
    (x1,) = _threads([lambda: rank(1)])
    formed = time.monotonic() - start
    t0.join(30)
    try:
        (x0,) = comms["r0"]
        assert (x0 == 3.0).all() and (x1 == 3.0).all()
        # the silent client held no one up (its deadline is HANDSHAKE_S), and was dropped
        assert formed < auth.HANDSHAKE_S - 1, formed
        assert _closed_by_peer(silent)
        assert store.get(f"{key}/secret") is None and store.get(f"{key}/0") is None
    finally:
        for c in list(comms.values()):
            if isinstance(c, tcp.TcpCommunicator):
                c.close()
        for s in [silent, garbage, *rogues.values()]:
            s.close()


def test_a_stale_secret_in_the_store_does_not_stop_a_new_group():
    """A crashed earlier group of the same name left its secret: rank 1 reads it before
    rank 0 replaces it, fails its first hello, re-reads, and joins."""
    store = DictStore()
    name = f"stale_{os.getpid()}"
    store.set(f"distgrad/{name}/tcp/secret", os.urandom(32))

    def rank(r, delay):
        time.sleep(delay)
        with tcp.TcpCommunicator(r, 2, store, name, timeout_s=10, init_timeout_s=30) as c:
            x = np.full(10, r + 1.0)
            c.allreduce(x)
            return x
    x0, x1 = _threads([lambda: rank(0, 0.3), lambda: rank(1, 0.0)])
    assert (x0 == 3.0).all() and (x1 == 3.0).all()


def test_the_hello_needs_the_secret_both_ways():
    """Client and server each prove the secret: a server without it is refused too (a
    stranger now listening on a stale address)."""
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(4)
    digest = bytes(16)
    acc = auth.Acceptor(lst, digest, 0, b"s" * 32, lambda p, c: p == 1)
    try:
        for secret, ok in ((b"x" * 32, False), (b"s" * 32, True)):
            cl = socket.create_connection(lst.getsockname(), timeout=5)
            result = []
            t = threading.Thread(target=lambda: result.append(
                auth.client_handshake(cl, secret, digest, 1, 0, 1)))
            t.start()
            got = []
            deadline = time.monotonic() + 5
            while t.is_alive() or (ok and not got):
                got += acc.poll(0.05)
                assert time.monotonic() < deadline
            t.join()
            assert result == [ok] and bool(got) == ok
            if ok:
                assert got[0][:2] == (1, 1)
                got[0][2].close()
            cl.close()
    finally:
        acc.close()
        lst.close()
    assert auth.proof(b"k", b"client", digest, 1, 0, 1, b"a", b"b") != \
        auth.proof(b"k", b"server", digest, 1, 0, 1, b"a", b"b")


# ---------------------------------------------------------------- shared memory

@pytest.fixture
def planted():
    """Plant names under /dev/shm; remove them afterwards."""
    paths = []

    def plant(name, kind="file", uid=None, mode=0o600, content=b""):
        path = os.path.join(SHM_DIR, name)
        if kind == "dir":
            os.mkdir(path)
        else:
            with open(path, "wb") as f:
                f.write(content)
            os.chmod(path, mode)
            if uid is not None:
                os.chown(path, uid, uid)
        paths.append(path)
        return path
    yield plant
    for p in paths:
        if os.path.isdir(p):
            os.rmdir(p)
        elif os.path.exists(p):
            os.unlink(p)


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="planting another user's file "
                                "needs root (chown)")


def test_cleanup_leaves_other_users_names_and_directories_alone(planted):
    dead = 2 ** 22 + 12345                         # above pid_max: never alive
    d = planted(f"distgrad_tmp_{dead}_dir", "dir")
    s = planted(f"sem.distgrad_{dead}_ab_0", "dir")
    foreign = None
    if os.geteuid() == 0:
        foreign = planted(f"distgrad_tmp_{dead}_foreign", uid=65534)
    removed = cleanup_stale_segments()             # used to raise IsADirectoryError
    assert not any(n.endswith("_dir") or "_ab_" in n or "foreign" in n for n in removed)
    assert os.path.isdir(d) and os.path.isdir(s) and (foreign is None or os.path.exists(foreign))
    with ShmCommunicator(0, 1, f"distgrad_t_cleanup_{os.getpid()}") as c:   # creation works
        assert c.allreduce(np.ones(3)).tolist() == [1.0, 1.0, 1.0]


@needs_root
def test_a_squatted_segment_name(planted):
    """Another user planted a world-writable file with a valid-looking header at the group's
    name. Without a store that is a clear error and nobody maps the planted file; with a
    store the creator picks a fresh random name and the group works."""
    name = f"distgrad_t_squat_{os.getpid()}"
    head = np.zeros(8, np.int64)
    seg = shm_segment
    head[seg._W_MAGIC], head[seg._W_WORLD], head[seg._W_PID] = seg._MAGIC, 2, os.getpid()
    head[seg._W_SIZE] = 1 << 16
    planted(name, uid=65534, mode=0o666, content=head.tobytes() + bytes((1 << 16) - 64))
    with pytest.raises(CollectiveError, match="already exists"):
        ShmCommunicator(0, 2, name, timeout_s=2)
    with pytest.raises(CollectiveTimeoutError, match="never appeared"):
        ShmCommunicator(1, 2, name, timeout_s=0.5)  # the foreign file is never mapped
    store = DictStore()

    def rank(r):
        with ShmCommunicator(r, 2, name, timeout_s=10, store=store) as c:
            return c.allreduce(np.full(5, r + 1.0)), c.name
    (x0, n0), (x1, n1) = _threads([lambda: rank(0), lambda: rank(1)])
    assert (x0 == 3.0).all() and (x1 == 3.0).all() and n0 == n1 != name
    assert store.get(f"{name}/segment") is None     # the name was handed out, then removed


@needs_root
def test_a_taken_temporary_name_is_retried_under_a_fresh_one(planted, monkeypatch):
    taken = "a" * 12
    planted(f"distgrad_tmp_{os.getpid()}_{taken}", uid=65534)
    names = iter([taken])
    real = shm_segment.secrets.token_hex
    monkeypatch.setattr(shm_segment.secrets, "token_hex", lambda n: next(names, None) or real(n))
    with ShmCommunicator(0, 1, f"distgrad_t_tmp_{os.getpid()}") as c:
        assert c.allreduce(np.ones(2)).tolist() == [1.0, 1.0]


def test_segments_and_semaphores_are_private():
    store = DictStore()
    name = f"t_mode_{os.getpid()}"
    modes = {}

    def creator():
        with ShmCommunicator(0, 2, name, timeout_s=10, store=store) as c:
            return c.allreduce(np.ones(2))

    def watcher_then_rank1():
        seg = store.wait(f"{name}/segment", 10).decode()
        modes[seg] = os.stat(os.path.join(SHM_DIR, seg)).st_mode & 0o777
        for n in os.listdir(SHM_DIR):
            if n.startswith(f"sem.distgrad_{os.getpid()}_"):
                modes[n] = os.stat(os.path.join(SHM_DIR, n)).st_mode & 0o777
        with ShmCommunicator(1, 2, name, timeout_s=10, store=store) as c:
            return c.allreduce(np.ones(2))
    x0, x1 = _threads([creator, watcher_then_rank1])
    assert (x0 == 2.0).all() and (x1 == 2.0).all()
    assert len(modes) >= 3 and set(modes.values()) == {0o600}, modes


# ---------------------------------------------------------------- public entry points

@pytest.mark.parametrize("kw,exc,match", [
    ({"workers": "2"}, TypeError, "workers must be an int >= 1, got str"),
    ({"workers": None}, TypeError, "workers must be an int >= 1, got NoneType"),
    ({"workers": 2.5}, TypeError, "workers must be an int >= 1, got float"),
    ({"workers": True}, TypeError, "workers must be an int >= 1, got bool"),
    ({"workers": 0}, ValueError, "workers must be >= 1, got 0"),
    ({"bucket_cap_mb": -1}, ValueError, "bucket_cap_mb must be a finite number > 0"),
    ({"bucket_cap_mb": "25"}, TypeError, "bucket_cap_mb must be a number"),
    ({"timeout_s": float("inf")}, ValueError, "timeout_s must be a finite number > 0"),
    ({"backend": "mpi"}, ValueError, "backend must be one of 'ray', 'local'"),
    ({"collective": "gloo"}, ValueError, "collective must be one of"),
    ({"compress": "int8"}, ValueError, "compress must be one of None, 'fp16'"),
    ({"device": 0}, TypeError, "device must be 'cpu', 'cuda' or 'cuda:N'"),
    ({"num_cpus_per_worker": 0}, ValueError, "num_cpus_per_worker must be a finite number"),
    ({"pin_cpus": True}, TypeError, "pin_cpus only apply to backend='ray'"),
    ({"strategy": "SPREAD", "log_to_driver": False}, TypeError,
     "log_to_driver, strategy only apply to backend='ray'"),
])
def test_init_names_the_bad_argument(kw, exc, match):
    kw.setdefault("backend", "local")
    with pytest.raises(exc, match=match):
        dg.init(**kw)


def test_shard_replicate_resize_name_the_bad_argument():
    a = np.ones((4, 3), np.float32)
    with dg.init(workers=2, backend="local") as old:
        stale = old.shard(Variable(dg.ones(4, 2)))      # stays on the old cluster
    with dg.init(workers=2, backend="local") as c:
        for dim in (5, -3, 2):
            with pytest.raises(ValueError, match=rf"shard: dim must be in \[-2, 1\], got {dim}"):
                c.shard(a, dim=dim)
        with pytest.raises(TypeError, match="shard: dim must be an int in"):
            c.shard(a, dim="0")
        with pytest.raises(TypeError, match="shard: data has dtype object"):
            c.shard(np.array([object(), object()]))
        with pytest.raises(TypeError, match="shard: data has dtype <U1"):
            c.shard(["a", "b"])
        with pytest.raises(TypeError, match=r"shard: sizes\[1\] must be an int"):
            c.shard(a, sizes=[2, 2.0])
        with pytest.raises(ValueError, match="one entry per worker"):
            c.shard(a, sizes=[4])
        assert c.shard(a, dim=-1).sum().item() == 12.0        # negative dims still work
        with pytest.raises(TypeError, match="replicate: expected a Tensor, Variable or Module"):
            c.replicate(a)
        with pytest.raises(TypeError, match="resize: n must be an int >= 1, got str"):
            c.resize("3")
        with pytest.raises(ValueError, match="lives on another cluster"):
            c.replicate(stale)
        assert c.replicate(Variable(dg.ones(3))).sum().item() == 3.0   # still usable


def test_save_and_load_name_the_bad_argument(tmp_path):
    with pytest.raises(TypeError, match="dg.save: f must be a path"):
        dg.save({"a": 1}, 123)
    with pytest.raises(TypeError, match="dg.load: f must be a path"):
        dg.load(None)
    with pytest.raises(ValueError, match="map_location must be None, 'cpu', 'cuda'"):
        dg.load(tmp_path / "x.dgt", map_location="gpu")
