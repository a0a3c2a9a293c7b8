"""A TCP group's connections: rendezvous, authenticated links, socket options, raw I/O.

Each rank listens on port 0, publishes ``host:port`` in the rendezvous store, and
holds one socket per link it needs: to its two ring neighbours (collectives,
``ring``) and to every other rank (send/recv, ``p2p``, so point-to-point traffic
never interleaves with a collective). It connects to lower ranks and accepts
higher ones. Every link is authenticated by a challenge-response hello over a
per-group secret from the store (:mod:`.auth`), so a stale address or a rogue
client never becomes a peer. What runs over the links is ``tcp.py``.
"""
from __future__ import annotations

import functools
import hashlib
import socket
import struct
import time
from typing import Dict

from . import auth
from .base import CollectiveTimeoutError
from .rendezvous import Store

__all__ = ["TcpLinks", "PeerFailure", "recv_into", "send_all", "CH_RING", "CH_P2P"]

CH_RING, CH_P2P = 1, 2                   # which of a peer's links a hello asks for
_SOCK_BUF = 4 << 20


class PeerFailure(Exception):
    """Internal: a socket op with ``peer`` failed (timeout or connection lost)."""

    def __init__(self, peer, detail, timed_out):
        super().__init__(detail)
        self.peer, self.detail, self.timed_out = peer, detail, timed_out


def recv_into(sock, peer, view):
    """Fill the writable byte memoryview ``view`` from ``sock`` (rank ``peer``'s socket);
    a timeout or a lost connection raises :class:`PeerFailure`.

    >>> recv_into(sock, 1, memoryview(bytearray(8)))   # doctest: +SKIP
    """
    got, n = 0, len(view)
    try:
        while got < n:
            k = sock.recv_into(view[got:], n - got, socket.MSG_WAITALL)
            if k == 0:
                raise PeerFailure(peer, f"rank {peer} closed the connection (died?)", False)
            got += k
    except socket.timeout:
        raise PeerFailure(peer, "", True) from None
    except OSError as e:
        raise PeerFailure(peer, f"connection to rank {peer} failed: {e}", False) from None

def send_all(sock, peer, bufs):
    """Send each buffer of ``bufs`` on ``sock`` (rank ``peer``'s socket), in full; a
    timeout or a lost connection raises :class:`PeerFailure`.

    >>> send_all(sock, 1, [b"header", payload])   # doctest: +SKIP
    """
    try:
        for b in bufs:
            sock.sendall(b)
    except socket.timeout:
        raise PeerFailure(peer, "send blocked", True) from None
    except OSError as e:
        raise PeerFailure(peer, f"connection to rank {peer} failed: {e}", False) from None


class TcpLinks:
    """This rank's authenticated sockets in a group: ``ring[peer]`` to its two ring
    neighbours (when ``ring``), ``p2p[peer]`` to every other rank.

    Construction returns once every link is up, or raises
    :class:`CollectiveTimeoutError` naming the ranks that never connected within
    ``init_timeout_s``. Established sockets time out after ``io_timeout`` seconds.

    Example::

        links = TcpLinks(rank, 2, store, "distgrad/demo/tcp", "demo", host="127.0.0.1",
                         io_timeout=28.0, init_timeout_s=30.0)
        send_all(links.p2p[1 - rank], 1 - rank, [b"hello"])
        links.close()
    """

    def __init__(self, rank: int, world_size: int, store: Store, key: str, group_name: str,
                 host: str, io_timeout: float, init_timeout_s: float, ring: bool = True):
        self._rank, self._world_size, self._group_name = rank, world_size, group_name
        self._store, self._key, self._host = store, key, host
        self._io_timeout, self._init_timeout_s = io_timeout, init_timeout_s
        self._ring_enabled = ring
        self._digest = hashlib.sha256(group_name.encode()).digest()[:16]
        self._next, self._prev = (rank + 1) % world_size, (rank - 1) % world_size
        self.ring: Dict[int, socket.socket] = {}
        self.p2p: Dict[int, socket.socket] = {}
        if world_size > 1:
            self._connect_all()

    def _expected(self):
        """{(peer, channel)} this rank must hold after setup."""
        n, r = self._world_size, self._rank
        need = {(j, CH_P2P) for j in range(n) if j != r}
        if self._ring_enabled:
            need |= {(self._next, CH_RING), (self._prev, CH_RING)}
        return need

    def _connect_all(self):
        deadline = time.monotonic() + self._init_timeout_s
        lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        acceptor = None
        secret_key = f"{self._key}/secret"
        try:
            lst.bind((self._host, 0))
            lst.listen(4 * self._world_size + 8)
            port = lst.getsockname()[1]
            self._secret = auth.group_secret(self._store, secret_key, self._rank, deadline,
                                             self._group_name, self._init_timeout_s)
            self._store.set(f"{self._key}/{self._rank}", f"{self._host}:{port}".encode())
            need = self._expected()
            # connect to lower ranks (rank 0 first: its hello confirms our secret), accept
            # higher ones (the kernel backlog completes TCP handshakes, so connecting
            # before the peer accepts cannot deadlock)
            for peer, ch in sorted(need):
                if peer < self._rank:
                    self._connect(peer, ch, deadline)
            acceptor = auth.Acceptor(
                lst, self._digest, self._rank, self._secret,
                lambda p, c: p > self._rank and (p, c) in need and (p, c) not in self._have(),
                handshake_s=min(auth.HANDSHAKE_S, self._init_timeout_s))
            while True:
                missing = {(p, c) for p, c in need if p > self._rank} - set(self._have())
                if not missing:
                    break
                if time.monotonic() > deadline:
                    raise CollectiveTimeoutError(
                        self._group_name, "init (tcp connect)", self._rank,
                        sorted({p for p, _ in missing}), self._init_timeout_s)
                for peer, ch, sock in acceptor.poll(0.2):
                    self._tune(sock)
                    (self.ring if ch == CH_RING else self.p2p)[peer] = sock
        except BaseException:
            self.close()
            if self._rank == 0:
                self._store.delete(secret_key)
            raise
        finally:
            if acceptor is not None:
                acceptor.close()
            lst.close()
        self._store.delete(f"{self._key}/{self._rank}")
        if self._rank == 0:
            # every rank proved it holds the secret to rank 0 (the p2p mesh is complete),
            # so it can leave the store; a stale one would only slow a later group's hello
            self._store.delete(secret_key)

    def _have(self):
        return [(p, CH_RING) for p in self.ring] + [(p, CH_P2P) for p in self.p2p]

    def _tune(self, sock):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # A fixed size turns Linux's buffer autotuning off for the socket: only worth it
        # when the system lets it be as large as asked; otherwise (the common 208 KiB
        # maximum) autotuning grows the buffers further than a capped fixed size would.
        for opt, limit in ((socket.SO_SNDBUF, "wmem_max"), (socket.SO_RCVBUF, "rmem_max")):
            if _sysctl_net_core(limit) >= _SOCK_BUF:
                sock.setsockopt(socket.SOL_SOCKET, opt, _SOCK_BUF)
        sock.settimeout(self._io_timeout)

    def _connect(self, peer, ch, deadline):
        sleep = 0.01
        while True:
            left = deadline - time.monotonic()
            addr = self._store.wait(f"{self._key}/{peer}", max(0.0, left))
            if addr is None:
                raise CollectiveTimeoutError(self._group_name, "init (tcp rendezvous)",
                                             self._rank, [peer], self._init_timeout_s,
                                             "no address published")
            ok = False
            try:
                host, port = addr.decode().rsplit(":", 1)
                sock = socket.create_connection((host, int(port)), timeout=max(0.1, left))
            except (OSError, ValueError, UnicodeDecodeError):
                sock = None           # stale address of an earlier group, or not listening yet
            if sock is not None:
                self._tune(sock)
                sock.settimeout(max(0.1, deadline - time.monotonic()))
                # a secret read before rank 0 replaced a stale one fails the hello: re-read
                secret = self._store.get(f"{self._key}/secret") or self._secret
                try:
                    ok = auth.client_handshake(sock, secret, self._digest, self._rank, peer, ch)
                except (OSError, struct.error):
                    ok = False
                if ok:
                    self._secret = secret
                    sock.settimeout(self._io_timeout)
                    (self.ring if ch == CH_RING else self.p2p)[peer] = sock
                    return
                sock.close()          # not this group's rank (a stale address): retry
            if time.monotonic() > deadline:
                raise CollectiveTimeoutError(self._group_name, "init (tcp handshake)",
                                             self._rank, [peer], self._init_timeout_s,
                                             f"no authenticated hello from {addr!r:.60}")
            time.sleep(sleep)
            sleep = min(sleep * 2, 0.2)

    def close(self):
        """Close every socket (idempotent); peers blocked on one fail at once."""
        for d in (self.ring, self.p2p):
            for s in d.values():
                try:
                    s.close()
                except OSError:
                    pass
            d.clear()


@functools.lru_cache(maxsize=None)
def _sysctl_net_core(name):
    """/proc/sys/net/core/<name> in bytes (0 where it cannot be read: not Linux)."""
    try:
        with open(f"/proc/sys/net/core/{name}") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0
