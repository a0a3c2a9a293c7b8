"""Authenticated set-up of the TCP ring's connections.

Every group has a random 32-byte secret: rank 0 creates it and puts it in the
rendezvous store (inside Ray: Ray's internal KV, which Ray's token authentication
protects), the other ranks read it there. It never crosses the ring's sockets.

A connection is accepted only after a challenge-response hello that proves both
ends hold the secret::

    client -> server   HELLO  magic, sha256(group)[:16], client rank, channel, client nonce
    server -> client   REPLY  magic, server nonce, HMAC(secret, "server", ..., both nonces)
    client -> server   PROOF  HMAC(secret, "client", ..., both nonces)

Both proofs cover the group, both ranks, the channel and both fresh nonces, so a
recorded hello cannot be replayed, a proof cannot be reflected back (the roles
differ), and a claimed rank means nothing without the secret. The server drives
every pending hello from one selector loop with a per-connection deadline, so a
client that connects and stays silent (or sends garbage) is dropped without
delaying anyone else.

What this does not give: confidentiality (the data is plaintext on the wire) and
integrity of the frames that follow the hello against an attacker who can inject
into an established TCP connection; see README "Security".
"""
from __future__ import annotations

import hmac
import secrets
import selectors
import socket
import struct
import time
from typing import Callable, List, Optional, Tuple

from .base import CollectiveError, CollectiveTimeoutError

__all__ = ["MAGIC", "HELLO", "REPLY", "PROOF_BYTES", "HANDSHAKE_S", "proof",
           "group_secret", "client_handshake", "Acceptor"]

MAGIC = b"DGTCP002"
HELLO = struct.Struct("<8s16sqq32s")     # magic, group digest, client rank, channel, nonce
REPLY = struct.Struct("<8s32s32s")       # magic, server nonce, server proof
PROOF_BYTES = 32
SECRET_BYTES = 32
HANDSHAKE_S = 5.0                        # a pending hello must complete within this
MAX_PENDING = 64                         # hellos in flight; the oldest is dropped beyond it


def proof(secret: bytes, role: bytes, digest: bytes, client: int, server: int, channel: int,
          client_nonce: bytes, server_nonce: bytes) -> bytes:
    """HMAC-SHA256 proof that ``role`` (b"server" or b"client") holds ``secret``.

    >>> len(proof(b"k" * 32, b"client", b"g" * 16, 1, 0, 1, b"a" * 32, b"b" * 32))
    32
    """
    msg = b"|".join([b"distgrad-tcp-v2", role, digest,
                     struct.pack("<qqq", client, server, channel), client_nonce, server_nonce])
    return hmac.new(secret, msg, "sha256").digest()


def group_secret(store, key: str, rank: int, deadline: float, group_name: str,
                 init_timeout_s: float) -> bytes:
    """Rank 0: create the group's secret and publish it under ``key``; others: wait for it.

    >>> from .rendezvous import DictStore
    >>> s = DictStore(); k = group_secret(s, "g/secret", 0, time.monotonic() + 1, "g", 1)
    >>> group_secret(s, "g/secret", 1, time.monotonic() + 1, "g", 1) == k
    True
    """
    if rank == 0:
        secret = secrets.token_bytes(SECRET_BYTES)
        store.set(key, secret)
        return secret
    secret = store.wait(key, max(0.0, deadline - time.monotonic()))
    if secret is None:
        raise CollectiveTimeoutError(group_name, "init (tcp group secret)", rank, [0],
                                     init_timeout_s, "rank 0 published no secret")
    if len(secret) != SECRET_BYTES:
        raise CollectiveError(f"collective group {group_name!r}: the group secret in the "
                              f"store has {len(secret)} bytes, expected {SECRET_BYTES}")
    return bytes(secret)


def _recv_exact(sock, n):
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError("connection closed during the hello")
        got += k
    return bytes(buf)


def client_handshake(sock, secret: bytes, digest: bytes, rank: int, peer: int,
                     channel: int) -> bool:
    """Run the client side of the hello on a connected socket (its timeout bounds every
    wait). True once the server proved it holds ``secret``; then our proof is sent."""
    cn = secrets.token_bytes(32)
    sock.sendall(HELLO.pack(MAGIC, digest, rank, channel, cn))
    magic, sn, server_proof = REPLY.unpack(_recv_exact(sock, REPLY.size))
    if magic != MAGIC or not hmac.compare_digest(
            server_proof, proof(secret, b"server", digest, rank, peer, channel, cn, sn)):
        return False
    sock.sendall(proof(secret, b"client", digest, rank, peer, channel, cn, sn))
    return True


class _Pending:
    """One connection whose hello is in progress."""

    __slots__ = ("sock", "deadline", "buf", "want", "hello")

    def __init__(self, sock, deadline):
        self.sock, self.deadline = sock, deadline
        self.buf, self.want, self.hello = bytearray(), HELLO.size, None


class Acceptor:
    """Accepts connections on a listening socket and authenticates them, all at once.

    ``wanted(peer, channel)`` says whether a client claiming that rank and channel is
    still expected. :meth:`poll` returns ``(peer, channel, socket)`` for every hello
    completed; connections that fail, stay silent past ``handshake_s`` or are not
    wanted are closed.

    Example::

        acc = Acceptor(listener, digest, rank, secret, lambda p, c: p > rank)
        for peer, ch, sock in acc.poll(0.2):
            use(sock)
        acc.close()
    """

    def __init__(self, listener: socket.socket, digest: bytes, rank: int, secret: bytes,
                 wanted: Callable[[int, int], bool], handshake_s: float = HANDSHAKE_S):
        self._lst, self._digest, self._rank, self._secret = listener, digest, rank, secret
        self._wanted, self._handshake_s = wanted, handshake_s
        listener.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(listener, selectors.EVENT_READ, None)
        self._pending = {}            # socket -> _Pending, oldest first
        self.dropped = 0              # connections refused (for tests and diagnostics)

    def poll(self, timeout: float) -> List[Tuple[int, int, socket.socket]]:
        done = []
        now = time.monotonic()
        for p in [p for p in self._pending.values() if now > p.deadline]:
            self._drop(p)
        soonest = min([p.deadline for p in self._pending.values()], default=now + timeout)
        for key, _ in self._sel.select(max(0.0, min(timeout, soonest - now))):
            if key.data is None:
                self._accept_all()
            else:
                got = self._feed(key.data)
                if got is not None:
                    done.append(got)
        return done

    def _accept_all(self):
        for _ in range(MAX_PENDING):
            try:
                sock, _ = self._lst.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:           # e.g. out of descriptors: retried at the next poll
                return
            if len(self._pending) >= MAX_PENDING:
                self._drop(next(iter(self._pending.values())))
            sock.setblocking(False)
            p = _Pending(sock, time.monotonic() + self._handshake_s)
            self._pending[sock] = p
            self._sel.register(sock, selectors.EVENT_READ, p)

    def _feed(self, p: _Pending) -> Optional[Tuple[int, int, socket.socket]]:
        try:
            data = p.sock.recv(p.want - len(p.buf))
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return self._drop(p)
        if not data:
            return self._drop(p)
        p.buf += data
        if len(p.buf) < p.want:
            return None
        if p.hello is None:
            magic, digest, peer, ch, cn = HELLO.unpack(p.buf)
            if magic != MAGIC or digest != self._digest or not self._wanted(peer, ch):
                return self._drop(p)
            sn = secrets.token_bytes(32)
            reply = REPLY.pack(MAGIC, sn, proof(self._secret, b"server", self._digest, peer,
                                                self._rank, ch, cn, sn))
            try:                      # 72 bytes into an idle socket's buffer: never partial
                if p.sock.send(reply) != len(reply):
                    return self._drop(p)
            except OSError:
                return self._drop(p)
            p.hello, p.buf, p.want = (peer, ch, cn, sn), bytearray(), PROOF_BYTES
            return None
        peer, ch, cn, sn = p.hello
        ok = hmac.compare_digest(bytes(p.buf), proof(self._secret, b"client", self._digest,
                                                     peer, self._rank, ch, cn, sn))
        if not ok or not self._wanted(peer, ch):
            return self._drop(p)
        self._forget(p)
        p.sock.setblocking(True)
        return peer, ch, p.sock

    def _forget(self, p):
        self._pending.pop(p.sock, None)
        try:
            self._sel.unregister(p.sock)
        except (KeyError, ValueError):
            pass

    def _drop(self, p):
        self._forget(p)
        self.dropped += 1
        try:
            p.sock.close()
        except OSError:
            pass
        return None

    def close(self):
        for p in list(self._pending.values()):
            self._drop(p)
        self._sel.close()
