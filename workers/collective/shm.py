"""Same-node collectives over POSIX shared memory.

All ranks map one segment (``/dev/shm/distgrad_*``). It holds a control block
(one barrier counter per rank, op headers, an abort word, point-to-point
channel counters) and a data area of two buffer *sets*, each with one slot of
``slot_bytes`` per rank. Synchronisation is by monotonically increasing
counters in the segment: a waiter spins briefly, then blocks on its own POSIX
named semaphore (a "doorbell") that the writer of the counter rings when it
sees the waiter's sleeping flag, so ranks never burn a core another rank
needs (more ranks than cores, or a busy machine). No Ray or socket call per
collective.

All-reduce is reduce-scatter + all-gather, chunked through the slots so the
working set stays in cache: per chunk, rank ``r`` copies the pieces the other
ranks own into its slot, reduces its own piece from every rank's slot in rank
order ``((x0 op x1) op x2)...`` and publishes it, and copies the others'
results out; software-pipelined with one barrier per chunk. Consecutive chunks
use alternate buffer sets, so one chunk's writes never race a slow rank's
reads of the previous chunk. Small arrays take a one-barrier path (each rank reduces the
whole array itself, same order, same bits).

Lifecycle: the creator (rank 0 by default) builds the segment under a
temporary name, links it under its final name, waits for every rank to
attach, then *unlinks the name*. From then on the memory lives exactly as long
as some rank maps it, so a crash (even SIGKILL) cannot leak it. Crashes
during rendezvous are covered by a ``weakref.finalize``/atexit unlink and by
:func:`cleanup_stale_segments`, which the next creator runs.

A peer that dies or stops calling gives :class:`CollectiveTimeoutError` naming
it, within the timeout (sooner when its process is seen dead), and the failing
rank raises an abort flag so every other rank fails fast too.

Memory ordering: counters are written after the data with plain stores; this
relies on x86-64's store ordering (TSO), like most shared-memory Python code.
"""
from __future__ import annotations

import _multiprocessing
import math
import mmap
import os
import secrets
import stat
import threading
import time
import weakref
from typing import List, Optional

import numpy as np

from .base import (DEFAULT_TIMEOUT_S, OP_CODES, CollectiveError, CollectiveMismatchError,
                   CollectiveTimeoutError, Communicator, code_dtype, dtype_code, flat_view,
                   normalize_op, reduce_in_order, resolve_recv_target, split_ranges)

__all__ = ["ShmCommunicator", "ShmBucket", "cleanup_stale_segments", "list_segments", "SHM_DIR", "PREFIX"]

SHM_DIR = "/dev/shm"
PREFIX = "distgrad_"
_MAGIC = int.from_bytes(b"DGSHM001", "little")
_LINE = 16                       # int64 words per 128-byte line (no false sharing)
_HDR = 32                        # int64 words per op header (256 bytes)
_MAX_NDIM = _HDR - 8
# control block, in words
_W_MAGIC, _W_WORLD, _W_SLOT, _W_P2P, _W_PID, _W_READY, _W_SIZE, _W_TOKEN, _W_ARENA = range(9)
_ABORT = _LINE                   # [rank+1 of who aborted, missing-rank bitmask, op code]
_RANKS = 2 * _LINE               # per rank line: [barrier counter, pid, attached, sleeping]
_SEM_MAX = _multiprocessing.SemLock.SEM_VALUE_MAX
_FENCE_LOCK = threading.Lock()


def _fence():
    """Full memory barrier (a lock round trip is a locked instruction): orders our
    store of a flag/counter before our load of the other side's (Dekker-style
    sleep/wake handshake)."""
    _FENCE_LOCK.acquire()
    _FENCE_LOCK.release()


def _sem_name(pid: int, token: int, k: int) -> str:
    # POSIX named semaphore; Linux keeps it as /dev/shm/sem.distgrad_<pid>_<token>_<k>
    return f"/{PREFIX}{pid}_{token:x}_{k}"


def _sem_unlink_quiet(name: str) -> None:
    try:
        _multiprocessing.sem_unlink(name)
    except (FileNotFoundError, OSError):
        pass

_OPS = {"allreduce": 1, "allreduce_small": 2, "reducescatter": 3, "reduce": 4,
        "broadcast": 5, "allgather": 6, "barrier": 7, "allreduce_bucket": 8}
_OP_NAMES = {v: k for k, v in _OPS.items()}


def _pid_alive(pid: int) -> bool:
    """True unless ``pid`` is known dead (gone, or a zombie awaiting its parent)."""
    if pid <= 0:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return stat[stat.rindex(b")") + 2:][:1] not in (b"Z", b"X")
    except FileNotFoundError:
        return False
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:               # gone already, or not ours to remove
        pass


def _ours(path: str) -> bool:
    """A regular file owned by this user: the only kind of name cleanup may touch (another
    user's file or a directory planted under our prefix is left alone)."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid()


def list_segments() -> List[str]:
    """Names of distgrad segments currently in /dev/shm (for leak checks).

    >>> list_segments()   # doctest: +SKIP
    []
    """
    try:
        return sorted(n for n in os.listdir(SHM_DIR)
                      if n.startswith(PREFIX) or n.startswith("sem." + PREFIX))
    except FileNotFoundError:
        return []


def cleanup_stale_segments() -> List[str]:
    """Unlink distgrad segments whose creating process is dead; return their names.

    Only regular files starting with ``distgrad_`` and owned by this user are touched;
    anything else (another user's file, a directory, a name that cannot be read) is
    skipped. Safe to call any time: a live group's segment has either a live creator or
    no name at all.

    >>> cleanup_stale_segments()   # doctest: +SKIP
    []
    """
    removed = []
    for name in list_segments():
        path = os.path.join(SHM_DIR, name)
        if not _ours(path):
            continue
        pid = 0
        if name.startswith("sem."):
            try:
                pid = int(name[len("sem." + PREFIX):].split("_")[0])
            except ValueError:
                continue
            if not _pid_alive(pid):
                _sem_unlink_quiet("/" + name[len("sem."):])
                removed.append(name)
            continue
        if name.startswith(PREFIX + "tmp_"):
            try:
                pid = int(name.split("_")[2])
            except (IndexError, ValueError):
                continue
        else:
            try:
                with open(path, "rb") as f:
                    head = f.read(8 * (_W_PID + 1))
            except OSError:
                continue
            if len(head) < 8 * (_W_PID + 1):
                continue
            words = np.frombuffer(head, np.int64)
            if int(words[_W_MAGIC]) != _MAGIC:
                continue
            pid = int(words[_W_PID])
        if pid > 0 and not _pid_alive(pid):
            _unlink_quiet(path)
            removed.append(name)
    return removed


_NAME_TRIES = 8


def _random_name() -> str:
    return f"{PREFIX}{secrets.token_hex(8)}"


def _fresh_name(make, what):
    """Run ``make()`` (which picks a fresh random name each call) until the name is free:
    a name someone else holds is skipped, not fought over."""
    for _ in range(_NAME_TRIES):
        try:
            return make()
        except FileExistsError:
            continue
        except OSError as e:
            raise CollectiveError(f"cannot create a shared-memory {what} in {SHM_DIR}: "
                                  f"{e}") from None
    raise CollectiveError(f"cannot create a shared-memory {what} in {SHM_DIR}: "
                          f"{_NAME_TRIES} fresh random names were all taken")


def _drop_names(path, sem_names):
    _unlink_quiet(path)
    for nm in sem_names:
        _sem_unlink_quiet(nm)


class ShmBucket:
    """A zero-copy all-reduce buffer in a shared segment (see ShmCommunicator.bucket).

    ``input``: this rank's array to fill; ``output``: the result, shared by all
    ranks; ``inputs``: every rank's input (read-only use); ``offset``: position
    in the arena.
    """

    __slots__ = ("input", "output", "inputs", "offset")

    def __init__(self, input, output, inputs, offset):
        self.input, self.output, self.inputs, self.offset = input, output, inputs, offset


def _default_slot_bytes(world_size: int, ncpu: int) -> int:
    # Chunks small enough that the exchanged data stays in cache between writer and
    # reader, large enough that barriers are rare (one per chunk). With a core per rank
    # a barrier costs microseconds and 1 MB per slot was best on the 2-core dev box.
    # With more ranks than cores every barrier waits for a rank to be scheduled again
    # (a context switch or a time slice): 4 MB per slot, 4x fewer barriers, took the 4-rank
    # 16 MB all-reduce from 1.5x to 2.9x gloo there (bench/allreduce.py --slot-bytes
    # re-tunes). DISTGRAD_SHM_SLOT_BYTES overrides.
    env = os.environ.get("DISTGRAD_SHM_SLOT_BYTES")
    if env:
        return int(env)
    return 1 << 20 if world_size <= ncpu else 4 << 20


class ShmCommunicator(Communicator):
    """A rank of a same-node group communicating through one shared-memory segment.

    Every rank constructs it with the same ``name``; rank ``creator_rank``
    (default 0) creates the segment, the others attach; construction returns
    once all ``world_size`` ranks are attached (or raises
    :class:`CollectiveTimeoutError` naming the ranks that never came).

    Args:
        rank, world_size: this rank and the group size.
        name: segment name shared by the ranks (``distgrad_`` is prepended
            when missing); must be unique per live group. With ``store``, only the
            key under which the creator publishes the segment's real name.
        timeout_s: bound on every wait (default 30 s).
        group_name: used in error messages (default: ``name``).
        slot_bytes: per-rank chunk size (creator's value wins).
        small_bytes: all-reduce of arrays up to this size uses the one-barrier path.
        p2p_bytes: size of each send/recv channel.
        arena_bytes: per-rank space for zero-copy buckets (:meth:`bucket`); 0: none.
        init_timeout_s: bound on the rendezvous (default: ``timeout_s``).
        store: a rendezvous :class:`~.rendezvous.Store`. With one, the creator names the
            segment itself (random, retried under a fresh name if taken) and hands the
            name out through the store; without, a name that is taken is an error.

    The segment and its semaphores are mode 0600 (this user only). Stale-segment
    cleanup touches only this user's regular files.

    Example (in each of 2 processes)::

        comm = ShmCommunicator(rank, 2, "distgrad_demo")
        x = np.full(1000, rank + 1.0, np.float32)
        comm.allreduce(x)             # 3.0 everywhere
        comm.close()
    """

    def __init__(self, rank: int, world_size: int, name: str,
                 timeout_s: float = DEFAULT_TIMEOUT_S, group_name: Optional[str] = None,
                 slot_bytes: Optional[int] = None, small_bytes: int = 64 << 10,
                 p2p_bytes: int = 256 << 10, creator_rank: int = 0,
                 init_timeout_s: Optional[float] = None, arena_bytes: int = 0,
                 store=None):
        super().__init__(rank, world_size, group_name or name, timeout_s)
        # rendezvous may wait for slow process start-up: its own bound
        self._init_timeout_s = float(init_timeout_s or timeout_s)
        self._store = store
        self._store_key = f"{name}/segment"
        self.name = self._path = None           # attaching ranks learn it from the store
        if store is None:
            self._set_name(name if name.startswith(PREFIX) else PREFIX + name)
        elif rank == creator_rank:
            self._set_name(_random_name())
        self._small_bytes = int(small_bytes)
        self._is_creator = rank == creator_rank
        self._linked = False
        self._broken: Optional[tuple] = None
        self._mm = None
        self._q = None
        self._finalizer = None
        self._nsync = 0          # barriers entered
        self._chunk = 0          # chunks processed (selects the buffer set)
        self._opseq = 0
        self._bells = []         # one doorbell semaphore per rank: sleeping waiters block on it
        self._sem_names = []
        ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
            (os.cpu_count() or 1)
        # Spin briefly (a peer usually arrives within microseconds), then block on the
        # doorbell. More ranks than cores: no spinning, it would steal the late rank's CPU.
        self._spin = 0 if world_size > ncpu else 1000
        if self._is_creator:
            sb = int(slot_bytes or _default_slot_bytes(world_size, ncpu))
            self._create(sb, int(p2p_bytes), int(arena_bytes))
        else:
            self._attach()
        self._setup_views()

    # -- segment lifecycle -------------------------------------------------------
    def _set_name(self, name):
        if "/" in name or "\0" in name or len(name) > 200 or not name.startswith(PREFIX):
            raise ValueError(f"bad shared-memory segment name {name!r}")
        self.name, self._path = name, os.path.join(SHM_DIR, name)

    def _layout(self, world_size, slot_bytes, p2p_bytes, arena_bytes=0):
        n = world_size
        sub = max(64, (slot_bytes // n) // 64 * 64)
        slot = sub * n
        p2p = max(4096, p2p_bytes // 64 * 64)
        hdr_off = _RANKS + n * _LINE                 # words
        p2p_ctl = hdr_off + 2 * n * _HDR
        ctl_words = p2p_ctl + n * n * _HDR
        data_off = -(-ctl_words * 8 // 4096) * 4096  # bytes, page aligned
        p2p_off = data_off + 2 * n * slot
        arena_off = p2p_off + (n * n * p2p if n > 1 else 0)
        arena = -(-arena_bytes // 4096) * 4096
        out_off = arena_off + n * arena              # one input arena per rank, one output
        size = out_off + arena
        return dict(sub=sub, slot=slot, p2p=p2p, hdr_off=hdr_off, p2p_ctl=p2p_ctl,
                    data_off=data_off, p2p_off=p2p_off, arena=arena, arena_off=arena_off,
                    out_off=out_off, size=size)

    def _map(self, fd, size):
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)  # pre-fault: no page faults in the hot loop
        return mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)

    def _create(self, slot_bytes, p2p_bytes, arena_bytes):
        cleanup_stale_segments()
        lay = self._layout(self._world_size, slot_bytes, p2p_bytes, arena_bytes)

        def new_tmp():
            path = os.path.join(SHM_DIR, f"{PREFIX}tmp_{os.getpid()}_{secrets.token_hex(6)}")
            return path, os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        tmp, fd = _fresh_name(new_tmp, "segment")
        try:
            os.ftruncate(fd, lay["size"])
            mm = self._map(fd, lay["size"])
        except BaseException:
            os.close(fd)
            _unlink_quiet(tmp)
            raise
        os.close(fd)
        q = memoryview(mm).cast("q")
        q[_W_WORLD] = self._world_size
        q[_W_SLOT] = slot_bytes
        q[_W_P2P] = p2p_bytes
        q[_W_ARENA] = arena_bytes
        q[_W_PID] = os.getpid()
        q[_W_SIZE] = lay["size"]
        self._mm, self._q = mm, q

        def new_bells():
            self._drop_sem_names()            # the ones an earlier try did create
            self._bells, token = [], secrets.randbits(62)
            for k in range(self._world_size):
                nm = _sem_name(os.getpid(), token, k)
                self._bells.append(_multiprocessing.SemLock(1, 0, _SEM_MAX, nm, False))
                self._sem_names.append(nm)
            return token
        try:
            q[_W_TOKEN] = _fresh_name(new_bells, "semaphore")
        except BaseException:
            self._drop_sem_names()
            self._release()
            _unlink_quiet(tmp)
            raise
        r = _RANKS + self._rank * _LINE
        q[r + 1] = os.getpid()
        q[r + 2] = 1
        q[_W_MAGIC] = _MAGIC
        try:
            for attempt in range(_NAME_TRIES):
                try:
                    os.link(tmp, self._path)
                    # covers a crash before all ranks attach (then the name is dropped anyway)
                    self._linked = True
                    self._finalizer = weakref.finalize(self, _drop_names, self._path,
                                                       list(self._sem_names))
                    break
                except FileExistsError:
                    if attempt == 0 and self.name in cleanup_stale_segments():
                        continue
                    if self._store is not None and attempt + 1 < _NAME_TRIES:
                        self._set_name(_random_name())   # the store tells the others
                        continue
                    self._drop_sem_names()
                    self._release()
                    raise CollectiveError(
                        f"shared-memory segment {self._path} already exists (another live "
                        f"group, or a name planted by another user): pass another name, or a "
                        f"store so that the creator picks a fresh random name") from None
        finally:
            _unlink_quiet(tmp)
        if self._store is not None:
            self._store.set(self._store_key, self.name.encode())
        try:
            self._wait_attached(q)
        finally:
            # every rank has it mapped (or we failed): drop the names
            _unlink_quiet(self._path)
            self._linked = False
            self._drop_sem_names()
            if self._store is not None:
                self._store.delete(self._store_key)
        q[_W_READY] = 1

    def _drop_sem_names(self):
        for nm in self._sem_names:
            _sem_unlink_quiet(nm)
        self._sem_names = []

    def _wait_attached(self, q):
        deadline = time.monotonic() + self._init_timeout_s
        sleep = 1e-4
        while True:
            missing = [k for k in range(self._world_size) if q[_RANKS + k * _LINE + 2] != 1]
            if not missing:
                return
            if time.monotonic() > deadline:
                self._release()
                raise CollectiveTimeoutError(self._group_name, "init (attach to shared memory)",
                                             self._rank, missing, self._init_timeout_s)
            time.sleep(sleep)
            sleep = min(sleep * 2, 0.01)

    def _attach(self):
        deadline = time.monotonic() + self._init_timeout_s
        sleep = 1e-4
        while True:
            if self._store is not None:
                # re-read each time: a key left by a crashed earlier group is replaced
                v = self._store.get(self._store_key)
                try:
                    self._set_name(v.decode())
                except (AttributeError, UnicodeDecodeError, ValueError):
                    pass
            mm = self._try_open() if self._path is not None else None
            if mm is not None:
                break
            if time.monotonic() > deadline:
                raise CollectiveTimeoutError(self._group_name, "init (attach to shared memory)",
                                             self._rank, [0], self._init_timeout_s,
                                             f"segment {self._path or self._store_key} never "
                                             "appeared")
            time.sleep(sleep)
            sleep = min(sleep * 2, 0.01)
        q = memoryview(mm).cast("q")
        self._mm, self._q = mm, q
        if q[_W_WORLD] != self._world_size:
            ws = q[_W_WORLD]
            self._release()
            raise CollectiveMismatchError(f"collective group {self._group_name!r}: segment "
                                          f"{self.name!r} has world_size {ws}, this rank "
                                          f"expects {self._world_size}")
        r = _RANKS + self._rank * _LINE
        if q[r + 2] != 0:
            pid = q[r + 1]
            self._release()
            raise CollectiveError(f"collective group {self._group_name!r}: rank {self._rank} "
                                  f"is already taken (by pid {pid})")
        try:
            self._bells = [_multiprocessing.SemLock._rebuild(
                0, 1, _SEM_MAX, _sem_name(q[_W_PID], q[_W_TOKEN], k))
                for k in range(self._world_size)]
        except OSError as e:
            self._release()
            raise CollectiveError(f"collective group {self._group_name!r}: cannot open the "
                                  f"group's semaphores ({e})") from None
        q[r + 1] = os.getpid()
        q[r + 2] = 1
        sleep = 1e-4
        while q[_W_READY] != 1:
            if time.monotonic() > deadline or not _pid_alive(q[_W_PID]):
                missing = [k for k in range(self._world_size) if q[_RANKS + k * _LINE + 2] != 1]
                self._release()
                raise CollectiveTimeoutError(self._group_name, "init (attach to shared memory)",
                                             self._rank, missing or [0], self._init_timeout_s)
            time.sleep(sleep)
            sleep = min(sleep * 2, 0.01)

    def _try_open(self):
        try:
            fd = os.open(self._path, os.O_RDWR | os.O_NOFOLLOW)
        except OSError:               # not there yet, or not a file we may open
            return None
        try:
            st = os.fstat(fd)
            size = st.st_size
            # only a segment of this user: another user's file, even one with our header
            # and world-writable, is never mapped
            if size < 4096 or st.st_uid != os.getuid() or not stat.S_ISREG(st.st_mode):
                return None
            head = os.pread(fd, 8 * 8, 0)
            words = np.frombuffer(head, np.int64)
            if int(words[_W_MAGIC]) != _MAGIC or int(words[_W_SIZE]) != size:
                return None
            if not _pid_alive(int(words[_W_PID])):
                return None            # stale segment of a crashed group
            return self._map(fd, size)
        finally:
            os.close(fd)

    def _setup_views(self):
        q = self._q
        self._lay = lay = self._layout(q[_W_WORLD], q[_W_SLOT], q[_W_P2P], q[_W_ARENA])
        self._arena_used = 0
        n = self._world_size
        self._u8 = np.frombuffer(self._mm, np.uint8)
        off = lay["data_off"]
        self._slots = [[self._u8[off + (s * n + k) * lay["slot"]:
                                 off + (s * n + k + 1) * lay["slot"]] for k in range(n)]
                       for s in range(2)]
        self._sub = lay["sub"]
        self._ctr = _RANKS + self._rank * _LINE
        self._sleep_idx = self._ctr + 3
        self._peers = [k for k in range(n) if k != self._rank]
        self._peer_ctr = [(k, _RANKS + k * _LINE) for k in self._peers]
        self._pids = [q[_RANKS + k * _LINE + 1] for k in range(n)]
        self._p2p_sent = [0] * n      # messages chunks sent to / received from each peer
        self._p2p_recv = [0] * n

    def _release(self):
        self._bells = []
        if self._q is not None:
            self._q.release()
            self._q = None
        self._slots = None
        self._u8 = None
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                pass                   # a caller still holds a view; unmapped when it goes
            self._mm = None

    def close(self):
        """Detach from the segment (idempotent). The memory is freed when the last rank detaches."""
        if self._closed:
            return
        super().close()
        if self._linked:
            _unlink_quiet(self._path)
            self._linked = False
        self._drop_sem_names()
        if self._finalizer is not None:
            self._finalizer.detach()
        self._release()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # -- waiting ------------------------------------------------------------------
    def _fail(self, op, missing, detail=""):
        q = self._q
        if q is not None and q[_ABORT] == 0:
            mask = 0
            for k in missing:
                if k < 63:
                    mask |= 1 << k
            q[_ABORT + 1] = mask
            q[_ABORT] = self._rank + 1
            _fence()
            for k in self._peers:
                self._ring(k)
        self._broken = (op, list(missing), detail)
        raise CollectiveTimeoutError(self._group_name, op, self._rank, missing,
                                     self._timeout_s, detail)

    def _check_abort(self, op):
        q = self._q
        if q[_ABORT]:
            who, mask = q[_ABORT] - 1, q[_ABORT + 1]
            missing = [k for k in range(min(self._world_size, 63)) if mask >> k & 1]
            self._broken = (op, missing, f"rank {who} gave up")
            raise CollectiveTimeoutError(self._group_name, op, self._rank, missing,
                                         self._timeout_s, f"rank {who} gave up")

    def _wait_ge(self, idx, target, op, who, missing_fn):
        """Wait until word ``idx`` >= ``target``; ``who`` is the rank that writes it."""
        q = self._q
        for _ in range(self._spin):
            if q[idx] >= target:
                return
        # Sleep on our doorbell. Handshake: we set our sleeping flag, fence, re-check;
        # the writer stores the word, fences, and rings the bell if our flag is set.
        # A short acquire timeout backs up the handshake and drives the checks below.
        flag = self._sleep_idx
        bell = self._bells[self._rank]
        deadline = time.monotonic() + self._timeout_s
        next_check = time.monotonic() + 0.05
        q[flag] = 1
        try:
            while True:
                _fence()
                while bell.acquire(False):      # drop stale rings
                    pass
                if q[idx] >= target:
                    return
                bell.acquire(True, 0.01)
                if q[idx] >= target:
                    return
                now = time.monotonic()
                if now >= next_check:
                    self._check_abort(op)
                    if not _pid_alive(self._pids[who]):
                        self._fail(op, missing_fn(), f"rank {who} (pid {self._pids[who]}) died")
                    if now > deadline:
                        self._fail(op, missing_fn())
                    next_check = now + 0.05
        finally:
            q[flag] = 0

    def _ring(self, k):
        """Wake rank ``k`` if it sleeps (call after storing what it may wait for)."""
        if self._q[_RANKS + k * _LINE + 3]:
            self._bells[k].release()

    def _barrier(self, op):
        self._nsync += 1
        my = self._nsync
        q = self._q
        q[self._ctr] = my
        _fence()
        for k, idx in self._peer_ctr:
            if q[idx + 3]:
                self._bells[k].release()
        for k, idx in self._peer_ctr:
            if q[idx] < my:
                self._wait_ge(idx, my, op, k, lambda: [
                    j for j, i in self._peer_ctr if q[i] < my])

    def _begin(self, op, collective=True):
        self._check_open()
        if self._broken is not None:
            bop, missing, detail = self._broken
            raise CollectiveTimeoutError(self._group_name, op, self._rank, missing,
                                         self._timeout_s,
                                         f"group broken by an earlier failure in {bop}" +
                                         (f": {detail}" if detail else ""))
        if collective:
            self._opseq += 1

    def _next_set(self):
        self._chunk += 1
        return self._chunk & 1

    def _write_hdr(self, st, words):
        h = self._lay["hdr_off"] + (st * self._world_size + self._rank) * _HDR
        q = self._q
        q[h + 1] = self._opseq
        for i, w in enumerate(words):
            q[h + 2 + i] = int(w)
        return h

    def _read_hdrs(self, st, nwords):
        base = self._lay["hdr_off"] + st * self._world_size * _HDR
        return [self._q[base + k * _HDR + 1: base + k * _HDR + 2 + nwords].tolist()
                for k in range(self._world_size)]

    def _check_hdrs(self, st, nwords, opname):
        hdrs = self._read_hdrs(st, nwords)
        if any(h != hdrs[0] for h in hdrs):
            def show(h):
                name = _OP_NAMES.get(h[1], f"op#{h[1]}")
                return f"{name} {h[2:]}"
            desc = "; ".join(f"rank {k}: {show(h)}" for k, h in enumerate(hdrs))
            raise CollectiveMismatchError(
                f"collective group {self._group_name!r}: ranks disagree in {opname} "
                f"(op, sizes, dtype, root): {desc}")

    # -- collectives ----------------------------------------------------------------
    def allreduce(self, array, op="sum"):
        op = normalize_op(op)
        flat, writeback = flat_view(array)
        if self._world_size == 1:
            return array
        self._begin("allreduce")
        if flat.nbytes <= min(self._small_bytes, self._lay["slot"]):
            self._allreduce_small(flat, op)
        else:
            ranges = split_ranges(flat.size, self._world_size)
            self._reduce_chunks("allreduce", flat, ranges, op, "all")
        writeback()
        return array

    def _allreduce_small(self, flat, op):
        st = self._next_set()
        slots = self._slots[st]
        b = flat.view(np.uint8)
        slots[self._rank][:b.size] = b
        self._write_hdr(st, (_OPS["allreduce_small"], flat.size, dtype_code(flat.dtype),
                             OP_CODES[op]))
        self._barrier("allreduce")
        self._check_hdrs(st, 4, "allreduce")
        n = flat.nbytes
        reduce_in_order([s[:n].view(flat.dtype) for s in slots], op, flat)

    def _reduce_chunks(self, opname, flat, ranges, op, mode, root=-1, out=None):
        """Reduce-scatter (+ gather) of ``flat`` where rank k owns ``ranges[k]``.

        mode "all": every rank gets the full result in ``flat``; "root": only
        ``root`` does; "scatter": each rank gets its own range in ``out``.

        Software-pipelined, one barrier per chunk: before barrier c+1 a rank has
        published its result piece of chunk c and its inputs of chunk c+1 (in the
        other buffer set); after it, it copies out chunk c's results and reduces
        chunk c+1. Inputs (sub-slots j != k of rank k's slot) and results (sub-slot
        k) are disjoint, so chunk c+1's inputs never overwrite chunk c-1's
        results that a slow rank may still be copying.
        """
        n, r, sub = self._world_size, self._rank, self._sub
        dt = flat.dtype
        item = dt.itemsize
        cs = sub // item
        nchunks = max(1, -(-max(e - s for s, e in ranges) // cs))
        gather = mode != "scatter"
        copy_out = mode == "all" or r == root
        my_s = ranges[r][0]

        def lens_of(c):
            base = c * cs
            return [max(0, min(e - s - base, cs)) for s, e in ranges]

        def write_inputs(c, st, lens):
            mine = self._slots[st][r]
            base = c * cs
            for j in self._peers:
                if lens[j]:
                    s0 = ranges[j][0] + base
                    np.copyto(mine[j * sub: j * sub + lens[j] * item].view(dt),
                              flat[s0: s0 + lens[j]])

        st = self._next_set()
        lens = lens_of(0)
        write_inputs(0, st, lens)
        self._write_hdr(st, (_OPS[opname], flat.size, dtype_code(dt), OP_CODES[op], root))
        self._barrier(opname)
        self._check_hdrs(st, 5, opname)
        for c in range(nchunks):
            slots = self._slots[st]
            base = c * cs
            L = lens[r]
            if L:
                s0 = my_s + base
                lo = r * sub
                terms = [flat[s0: s0 + L] if k == r else slots[k][lo: lo + L * item].view(dt)
                         for k in range(n)]
                if gather:
                    res = slots[r][lo: lo + L * item].view(dt)
                    reduce_in_order(terms, op, res)
                    if copy_out:
                        np.copyto(flat[s0: s0 + L], res)
                else:
                    reduce_in_order(terms, op, out[base: base + L])
            last = c + 1 == nchunks
            if not last:
                nst = self._next_set()
                nlens = lens_of(c + 1)
                write_inputs(c + 1, nst, nlens)
            if gather or not last:
                self._barrier(opname)
            if gather and copy_out:
                for j in self._peers:
                    if lens[j]:
                        s0 = ranges[j][0] + base
                        np.copyto(flat[s0: s0 + lens[j]],
                                  slots[j][j * sub: j * sub + lens[j] * item].view(dt))
            if not last:
                st, lens = nst, nlens

    def reducescatter(self, array, op="sum"):
        op = normalize_op(op)
        if not isinstance(array, np.ndarray) or array.ndim == 0:
            raise ValueError("reducescatter needs a numpy array with at least one dimension")
        n = self._world_size
        rows = split_ranges(array.shape[0], n)
        row = math.prod(array.shape[1:])
        s, e = rows[self._rank]
        if n == 1:
            return array.copy()
        self._begin("reducescatter")
        flat, _ = flat_view(array)
        out = np.empty((e - s,) + array.shape[1:], array.dtype)
        self._reduce_chunks("reducescatter", flat, [(a * row, b * row) for a, b in rows], op,
                            "scatter", out=out.reshape(-1))
        return out

    def reduce(self, array, root=0, op="sum"):
        self._check_root(root)
        op = normalize_op(op)
        flat, writeback = flat_view(array)
        if self._world_size == 1:
            return array
        self._begin("reduce")
        self._reduce_chunks("reduce", flat, split_ranges(flat.size, self._world_size), op,
                            "root", root=root)
        if self._rank == root:
            writeback()
        return array

    def broadcast(self, array, root=0):
        self._check_root(root)
        flat, writeback = flat_view(array)
        if self._world_size == 1:
            return array
        self._begin("broadcast")
        b = flat.view(np.uint8)
        slot = self._lay["slot"]
        nchunks = max(1, -(-b.size // slot))
        for c in range(nchunks):
            st = self._next_set()
            src = self._slots[st][root]
            lo, hi = c * slot, min(b.size, (c + 1) * slot)
            if self._rank == root:
                src[: hi - lo] = b[lo:hi]
            if c == 0:
                self._write_hdr(st, (_OPS["broadcast"], flat.nbytes, dtype_code(flat.dtype),
                                     root))
            self._barrier("broadcast")
            if c == 0:
                self._check_hdrs(st, 4, "broadcast")
            if self._rank != root:
                b[lo:hi] = src[: hi - lo]
        if self._rank != root:
            writeback()
        return array

    def allgather(self, array):
        if not isinstance(array, np.ndarray):
            raise TypeError(f"collectives take numpy arrays, got {type(array).__name__}")
        if array.ndim > _MAX_NDIM - 1:
            raise ValueError(f"allgather supports at most {_MAX_NDIM - 1} dimensions")
        if self._world_size == 1:
            return [array.copy()]
        self._begin("allgather")
        r = self._rank
        st = self._next_set()
        self._write_hdr(st, (_OPS["allgather"], dtype_code(array.dtype), array.ndim)
                        + tuple(array.shape))
        self._barrier("allgather")
        hdrs = self._read_hdrs(st, 3 + _MAX_NDIM - 1)
        if any(h[:3] != hdrs[0][:3] for h in hdrs):
            desc = "; ".join(f"rank {k}: {_OP_NAMES.get(h[1], h[1])} dtype "
                             f"{code_dtype(h[2]) if h[1] == _OPS['allgather'] else '?'}"
                             for k, h in enumerate(hdrs))
            raise CollectiveMismatchError(f"collective group {self._group_name!r}: ranks "
                                          f"disagree in allgather: {desc}")
        shapes = [tuple(h[4: 4 + h[3]]) for h in hdrs]
        outs = [np.empty(shp, array.dtype) for shp in shapes]
        outs[r][...] = array
        mine = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        views = [o.reshape(-1).view(np.uint8) for o in outs]
        slot = self._lay["slot"]
        nchunks = max(1, -(-max(v.size for v in views) // slot))
        for c in range(nchunks):
            st = self._next_set()
            lo = c * slot
            if lo < mine.size:
                hi = min(mine.size, lo + slot)
                self._slots[st][r][: hi - lo] = mine[lo:hi]
            self._barrier("allgather")
            for k in self._peers:
                v = views[k]
                if lo < v.size:
                    hi = min(v.size, lo + slot)
                    v[lo:hi] = self._slots[st][k][: hi - lo]
        return outs

    def barrier(self):
        if self._world_size == 1:
            return
        self._begin("barrier")
        st = self._next_set()
        self._write_hdr(st, (_OPS["barrier"],))
        self._barrier("barrier")
        self._check_hdrs(st, 1, "barrier")

    # -- zero-copy buckets ---------------------------------------------------------------
    def bucket(self, shape, dtype=np.float32) -> "ShmBucket":
        """Allocate a zero-copy all-reduce bucket in the shared segment.

        Every rank must allocate the same buckets in the same order (a bump
        allocator over ``arena_bytes``). Write this rank's values into
        ``b.input``, call :meth:`allreduce_bucket`, read the result from
        ``b.output``: one region of the segment that all ranks share, so the
        all-reduce copies nothing in or out. ``b.output`` stays valid until the
        next ``allreduce_bucket(b)``.

        >>> b = comm.bucket((1000,), np.float32)     # doctest: +SKIP
        >>> b.input[:] = grads; comm.allreduce_bucket(b); use(b.output)
        """
        self._check_open()
        dt = np.dtype(dtype)
        shape = (int(shape),) if np.isscalar(shape) else tuple(int(d) for d in shape)
        nbytes = math.prod(shape) * dt.itemsize
        off = self._arena_used
        if off + nbytes > self._lay["arena"]:
            raise ValueError(f"bucket of {nbytes} bytes does not fit: arena_bytes is "
                             f"{self._lay['arena']}, {off} used (pass a larger arena_bytes)")
        self._arena_used = off + -(-nbytes // 64) * 64
        lay = self._lay
        ins = [self._u8[lay["arena_off"] + k * lay["arena"] + off:
                        lay["arena_off"] + k * lay["arena"] + off + nbytes].view(dt).reshape(shape)
               for k in range(self._world_size)]
        out = self._u8[lay["out_off"] + off: lay["out_off"] + off + nbytes].view(dt).reshape(shape)
        return ShmBucket(ins[self._rank], out, ins, off)

    @property
    def arena_bytes(self) -> int:
        """Bytes each rank has for zero-copy buckets (:meth:`bucket`); 0 without an arena."""
        return self._lay["arena"]

    def reset_buckets(self) -> None:
        """Forget every bucket (all ranks together); their arrays must no longer be used."""
        self._arena_used = 0

    def allreduce_bucket(self, bucket: "ShmBucket", op="sum") -> np.ndarray:
        """All-reduce ``bucket.input`` of every rank into the shared ``bucket.output``.

        Each rank reduces its 1/N slice straight from the ranks' input arenas into
        the output, in rank order; two barriers, no copies. Returns ``bucket.output``.

        >>> comm.allreduce_bucket(b)     # doctest: +SKIP
        """
        op = normalize_op(op)
        if self._world_size == 1:
            np.copyto(bucket.output, bucket.input)
            return bucket.output
        self._begin("allreduce_bucket")
        st = self._next_set()
        self._write_hdr(st, (_OPS["allreduce_bucket"], bucket.offset, bucket.output.size,
                             dtype_code(bucket.output.dtype), OP_CODES[op]))
        self._barrier("allreduce_bucket")
        self._check_hdrs(st, 5, "allreduce_bucket")
        s, e = split_ranges(bucket.output.size, self._world_size)[self._rank]
        if e > s:
            flat_out = bucket.output.reshape(-1)
            reduce_in_order([x.reshape(-1)[s:e] for x in bucket.inputs], op, flat_out[s:e])
        self._barrier("allreduce_bucket")    # output complete; inputs free to refill
        return bucket.output

    # -- point to point ---------------------------------------------------------------
    def _chan(self, src, dst):
        lay = self._lay
        ctl = lay["p2p_ctl"] + (src * self._world_size + dst) * _HDR
        off = lay["p2p_off"] + (src * self._world_size + dst) * lay["p2p"]
        return ctl, self._u8[off: off + lay["p2p"]]

    def send(self, array, dst):
        self._check_peer(dst, "dst")
        if not isinstance(array, np.ndarray):
            raise TypeError(f"collectives take numpy arrays, got {type(array).__name__}")
        if array.ndim > _MAX_NDIM - 3:
            raise ValueError(f"send supports at most {_MAX_NDIM - 3} dimensions")
        self._begin(f"send to rank {dst}", collective=False)
        op = f"send to rank {dst}"
        ctl, buf = self._chan(self._rank, dst)
        q = self._q
        b = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        cap = buf.size
        nchunks = max(1, -(-b.size // cap))
        for c in range(nchunks):
            # channel free once the receiver acknowledged everything sent so far
            sent = self._p2p_sent[dst]
            if q[ctl + _LINE] < sent:
                self._wait_ge(ctl + _LINE, sent, op, dst, lambda: [dst])
            lo, hi = c * cap, min(b.size, (c + 1) * cap)
            buf[: hi - lo] = b[lo:hi]
            if c == 0:
                q[ctl + 1] = b.size
                q[ctl + 2] = dtype_code(array.dtype)
                q[ctl + 3] = array.ndim
                for i, d in enumerate(array.shape):
                    q[ctl + 4 + i] = d
            self._p2p_sent[dst] = sent + 1
            q[ctl] = sent + 1
            _fence()
            self._ring(dst)

    def recv(self, array_or_shape, src, dtype=None):
        self._check_peer(src, "src")
        self._begin(f"recv from rank {src}", collective=False)
        op = f"recv from rank {src}"
        ctl, buf = self._chan(src, self._rank)
        q = self._q
        cap = buf.size
        got = self._p2p_recv[src]
        if q[ctl] <= got:
            self._wait_ge(ctl, got + 1, op, src, lambda: [src])
        nbytes = q[ctl + 1]
        sent_dt = code_dtype(q[ctl + 2])
        if sent_dt is None:
            raise CollectiveError(f"collective group {self._group_name!r}: {op}: the message "
                                  "header names no plain numeric dtype (corrupted channel)")
        shape = tuple(q[ctl + 4: ctl + 4 + q[ctl + 3]].tolist())
        nchunks = max(1, -(-nbytes // cap))
        try:
            out = resolve_recv_target(array_or_shape, dtype, sent_dt, shape,
                                      self._group_name, src)
        except CollectiveMismatchError as e:
            out, err = None, e         # drain the message so the channel stays in step
            b = writeback = None
        else:
            err = None
            flat, writeback = flat_view(out)
            b = flat.view(np.uint8)
        for c in range(nchunks):
            if c:
                if q[ctl] <= got:
                    self._wait_ge(ctl, got + 1, op, src, lambda: [src])
            lo, hi = c * cap, min(nbytes, (c + 1) * cap)
            if b is not None:
                b[lo:hi] = buf[: hi - lo]
            got += 1
            self._p2p_recv[src] = got
            q[ctl + _LINE] = got
            _fence()
            self._ring(src)
        if err is not None:
            raise err
        writeback()
        return out
