"""The shared-memory segment's lifecycle: naming, layout, rendezvous, unlink, cleanup.

All ranks of a same-node group map one segment (``/dev/shm/distgrad_*``), laid
out by :func:`layout`: a control block (one line of counters per rank, op
headers, an abort word, point-to-point channel counters), then the data area
(two buffer sets of one slot per rank, the send/recv channels, the bucket
arenas). Each rank also opens one POSIX named semaphore per rank, its
"doorbell". What runs over the mapped segment lives in ``shm_sync.py`` (waiting)
and ``shm.py`` (the collectives).

Lifecycle: the creator (rank 0 by default) builds the segment under a temporary
name, links it under its final name, waits for every rank to attach, then
*unlinks the name* (and the semaphores' names). From then on the memory lives
exactly as long as some rank maps it, so a crash (even SIGKILL) cannot leak it.
Crashes during rendezvous are covered by a ``weakref.finalize``/atexit unlink and
by :func:`cleanup_stale_segments`, which the next creator runs.

Security: the segment and its semaphores are mode 0600, names are random
(``secrets``), a name someone else holds is skipped rather than fought over, an
attaching rank maps only this user's regular file with a valid header, and
cleanup touches only this user's regular files.
"""
from __future__ import annotations

import _multiprocessing
import mmap
import os
import secrets
import stat
import time
import weakref
from typing import List

import numpy as np

from .base import CollectiveError, CollectiveMismatchError, CollectiveTimeoutError

__all__ = ["ShmSegment", "cleanup_stale_segments", "list_segments", "layout", "pid_alive",
           "SHM_DIR", "PREFIX", "LINE", "HDR_WORDS", "ABORT", "RANKS"]

SHM_DIR = "/dev/shm"
PREFIX = "distgrad_"
_MAGIC = int.from_bytes(b"DGSHM001", "little")
LINE = 16                        # int64 words per 128-byte line (no false sharing)
HDR_WORDS = 32                   # int64 words per op header (256 bytes)
# control block, in words
_W_MAGIC, _W_WORLD, _W_SLOT, _W_P2P, _W_PID, _W_READY, _W_SIZE, _W_TOKEN, _W_ARENA = range(9)
ABORT = LINE                     # [rank+1 of who aborted, missing-rank bitmask, 1 if it left the step]
RANKS = 2 * LINE                 # per rank line: [barrier counter, pid, attached, sleeping]
_SEM_MAX = _multiprocessing.SemLock.SEM_VALUE_MAX


def _sem_name(pid: int, token: int, k: int) -> str:
    # POSIX named semaphore; Linux keeps it as /dev/shm/sem.distgrad_<pid>_<token>_<k>
    return f"/{PREFIX}{pid}_{token:x}_{k}"


def _sem_unlink_quiet(name: str) -> None:
    try:
        _multiprocessing.sem_unlink(name)
    except (FileNotFoundError, OSError):
        pass


def pid_alive(pid: int) -> bool:
    """True unless ``pid`` is known dead (gone, or a zombie awaiting its parent).

    >>> pid_alive(os.getpid())
    True
    """
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
            if not pid_alive(pid):
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
        if pid > 0 and not pid_alive(pid):
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


def layout(world_size: int, slot_bytes: int, p2p_bytes: int, arena_bytes: int = 0) -> dict:
    """Offsets and sizes of a segment's parts: words for the control block (``hdr_off``,
    ``p2p_ctl``), bytes for the data (``data_off``: two buffer sets of one slot per rank,
    ``p2p_off``: one channel per ordered pair, ``arena_off``/``out_off``: buckets).

    >>> layout(2, 1 << 20, 256 << 10)["slot"]
    1048576
    """
    n = world_size
    sub = max(64, (slot_bytes // n) // 64 * 64)
    slot = sub * n
    p2p = max(4096, p2p_bytes // 64 * 64)
    hdr_off = RANKS + n * LINE                 # words
    p2p_ctl = hdr_off + 2 * n * HDR_WORDS
    ctl_words = p2p_ctl + n * n * HDR_WORDS
    data_off = -(-ctl_words * 8 // 4096) * 4096  # bytes, page aligned
    p2p_off = data_off + 2 * n * slot
    arena_off = p2p_off + (n * n * p2p if n > 1 else 0)
    arena = -(-arena_bytes // 4096) * 4096
    out_off = arena_off + n * arena              # one input arena per rank, one output
    size = out_off + arena
    return dict(sub=sub, slot=slot, p2p=p2p, hdr_off=hdr_off, p2p_ctl=p2p_ctl,
                data_off=data_off, p2p_off=p2p_off, arena=arena, arena_off=arena_off,
                out_off=out_off, size=size)


class ShmSegment:
    """This rank's mapping of a group's segment and doorbells, from rendezvous to unmap.

    Rank ``creator_rank`` creates the segment (``slot_bytes``, ``p2p_bytes``,
    ``arena_bytes`` are its to choose), the others attach; construction returns once
    every rank has it mapped, with its names already unlinked (or raises
    :class:`CollectiveTimeoutError` naming the ranks that never came). With a ``store``
    the creator picks a random name and hands it out under ``{name}/segment``.

    Attributes for the code that runs over it: ``q`` (the segment as int64 words),
    ``u8`` (as bytes), ``lay`` (:func:`layout`), ``slots[set][rank]`` (the two buffer
    sets), ``bells`` (one doorbell semaphore per rank), ``pids`` (each rank's pid).

    Example (in each of 2 processes)::

        seg = ShmSegment(rank, 2, "distgrad_demo", group_name="demo", init_timeout_s=30)
        seg.q[RANKS + rank * LINE]        # this rank's barrier counter
        seg.close()
    """

    def __init__(self, rank: int, world_size: int, name: str, *, group_name: str,
                 init_timeout_s: float, store=None, creator_rank: int = 0,
                 slot_bytes: int = 1 << 20, p2p_bytes: int = 256 << 10, arena_bytes: int = 0):
        self._rank, self._world_size, self._group_name = rank, world_size, group_name
        self._init_timeout_s = init_timeout_s
        self._store = store
        self._store_key = f"{name}/segment"
        self.name = self._path = None           # attaching ranks learn it from the store
        self._closed = self._linked = False
        self._mm = self.q = self.u8 = self.slots = self._finalizer = None
        self.bells: list = []
        self._sem_names: List[str] = []
        if store is None:
            self._set_name(name if name.startswith(PREFIX) else PREFIX + name)
        elif rank == creator_rank:
            self._set_name(_random_name())
        if rank == creator_rank:
            self._create(int(slot_bytes), int(p2p_bytes), int(arena_bytes))
        else:
            self._attach()
        q = self.q
        self.lay = lay = layout(q[_W_WORLD], q[_W_SLOT], q[_W_P2P], q[_W_ARENA])
        self.u8 = np.frombuffer(self._mm, np.uint8)
        off, n = lay["data_off"], world_size
        size = lay["slot"]
        self.slots = [[self.u8[off + (s * n + k) * size: off + (s * n + k + 1) * size]
                       for k in range(n)] for s in range(2)]
        self.pids = [q[RANKS + k * LINE + 1] for k in range(n)]

    def _set_name(self, name):
        if "/" in name or "\0" in name or len(name) > 200 or not name.startswith(PREFIX):
            raise ValueError(f"bad shared-memory segment name {name!r}")
        self.name, self._path = name, os.path.join(SHM_DIR, name)

    def _map(self, fd, size):
        # pre-fault the pages: no page faults in the collectives' hot loops
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        return mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)

    def _create(self, slot_bytes, p2p_bytes, arena_bytes):
        cleanup_stale_segments()
        lay = layout(self._world_size, slot_bytes, p2p_bytes, arena_bytes)

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
        self._mm, self.q = mm, q

        def new_bells():
            self._drop_sem_names()            # the ones an earlier try did create
            self.bells, token = [], secrets.randbits(62)
            for k in range(self._world_size):
                nm = _sem_name(os.getpid(), token, k)
                self.bells.append(_multiprocessing.SemLock(1, 0, _SEM_MAX, nm, False))
                self._sem_names.append(nm)
            return token
        try:
            q[_W_TOKEN] = _fresh_name(new_bells, "semaphore")
        except BaseException:
            self._drop_sem_names()
            self._release()
            _unlink_quiet(tmp)
            raise
        r = RANKS + self._rank * LINE
        q[r + 1] = os.getpid()
        q[r + 2] = 1
        q[_W_MAGIC] = _MAGIC
        self._link(tmp)
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

    def _link(self, tmp):
        """Give the finished segment at ``tmp`` its final name (a fresh random one when the
        name is taken and a store can hand it out); ``tmp`` is unlinked either way."""
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

    def _drop_sem_names(self):
        for nm in self._sem_names:
            _sem_unlink_quiet(nm)
        self._sem_names = []

    def _wait_attached(self, q):
        deadline = time.monotonic() + self._init_timeout_s
        sleep = 1e-4
        while True:
            missing = [k for k in range(self._world_size) if q[RANKS + k * LINE + 2] != 1]
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
        self._mm, self.q = mm, q
        if q[_W_WORLD] != self._world_size:
            ws = q[_W_WORLD]
            self._release()
            raise CollectiveMismatchError(f"collective group {self._group_name!r}: segment "
                                          f"{self.name!r} has world_size {ws}, this rank "
                                          f"expects {self._world_size}")
        r = RANKS + self._rank * LINE
        if q[r + 2] != 0:
            pid = q[r + 1]
            self._release()
            raise CollectiveError(f"collective group {self._group_name!r}: rank {self._rank} "
                                  f"is already taken (by pid {pid})")
        try:
            self.bells = [_multiprocessing.SemLock._rebuild(
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
            if time.monotonic() > deadline or not pid_alive(q[_W_PID]):
                missing = [k for k in range(self._world_size) if q[RANKS + k * LINE + 2] != 1]
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
            if not pid_alive(int(words[_W_PID])):
                return None            # stale segment of a crashed group
            return self._map(fd, size)
        finally:
            os.close(fd)

    def _release(self):
        self.bells = []
        if self.q is not None:
            self.q.release()
            self.q = None
        self.slots = self.u8 = None
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                pass                   # a caller still holds a view; unmapped when it goes
            self._mm = None

    def close(self):
        """Unmap (idempotent); drop the names if the rendezvous never finished. The memory is
        freed when the last rank unmaps it."""
        if self._closed:
            return
        self._closed = True
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
        except Exception:  # noqa: BLE001  (interpreter shutdown: nothing left to report to)
            pass
