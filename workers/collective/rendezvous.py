"""Key-value stores the ranks of a group meet through at creation time (only then).

- :class:`RayKVStore`: Ray's internal KV (the GCS); used inside Ray.
- :class:`FileStore`: a directory on a shared file system; for tests and
  scripts without Ray.
- :class:`DictStore`: a dict guarded by a lock, for ranks that are threads.

All have ``set(key, bytes)``, ``get(key) -> bytes | None``, ``delete(key)`` and
``wait(key, timeout_s)``.
"""
from __future__ import annotations

import os
import threading
import time
import urllib.parse
from typing import Optional

__all__ = ["Store", "RayKVStore", "FileStore", "DictStore"]


class Store:
    """Minimal rendezvous store interface."""

    def set(self, key: str, value: bytes) -> None:
        raise NotImplementedError

    def get(self, key: str) -> Optional[bytes]:
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError

    def wait(self, key: str, timeout_s: float) -> Optional[bytes]:
        """Poll until ``key`` exists; return its value, or None after ``timeout_s``.

        >>> DictStore().wait("missing", 0.01) is None
        True
        """
        deadline = time.monotonic() + timeout_s
        sleep = 1e-3
        while True:
            v = self.get(key)
            if v is not None:
                return v
            if time.monotonic() >= deadline:
                return None
            time.sleep(sleep)
            sleep = min(sleep * 1.5, 0.05)


class DictStore(Store):
    """In-process store (ranks are threads).

    >>> s = DictStore(); s.set("a", b"1"); s.get("a")
    b'1'
    """

    def __init__(self):
        self._d = {}
        self._lock = threading.Lock()

    def set(self, key, value):
        with self._lock:
            self._d[key] = bytes(value)

    def get(self, key):
        with self._lock:
            return self._d.get(key)

    def delete(self, key):
        with self._lock:
            self._d.pop(key, None)


class FileStore(Store):
    """Store in a directory (one file per key, written atomically by rename).

    Keys include the TCP ring's group secret: the files are created mode 0600 and a new
    directory mode 0700, so other users of the machine cannot read them.

    >>> import tempfile; s = FileStore(tempfile.mkdtemp()); s.set("g/0", b"x"); s.get("g/0")
    b'x'
    """

    def __init__(self, directory: str):
        self.directory = directory
        os.makedirs(directory, mode=0o700, exist_ok=True)

    def _path(self, key):
        return os.path.join(self.directory, urllib.parse.quote(key, safe=""))

    def set(self, key, value):
        path = self._path(key)
        tmp = f"{path}.tmp{os.getpid()}.{threading.get_ident()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(value)
        os.replace(tmp, path)

    def get(self, key):
        try:
            with open(self._path(key), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def delete(self, key):
        try:
            os.unlink(self._path(key))
        except FileNotFoundError:
            pass


class RayKVStore(Store):
    """Ray's internal key-value store (needs ``ray.init`` in this process).

    >>> store = RayKVStore()          # doctest: +SKIP
    """

    def __init__(self, namespace: str = "distgrad_collective"):
        from ray.experimental import internal_kv  # imported lazily: Ray is optional here
        self._kv = internal_kv
        self._ns = namespace

    def set(self, key, value):
        self._kv._internal_kv_put(key, value, overwrite=True, namespace=self._ns)

    def get(self, key):
        return self._kv._internal_kv_get(key, namespace=self._ns)

    def delete(self, key):
        self._kv._internal_kv_del(key, namespace=self._ns)
