"""The worker's end of the driver's direct channel: programs over a Unix socket.

A Ray actor call costs 1-2 ms each way on a loaded machine, and a training step that
ends in ``loss.item()`` pays it twice while every worker waits. A worker on the driver's
machine instead serves the driver's messages from a Unix socket on a thread of its own:
the same ``execute`` as the Ray call, the same bytes (``distgrad.framing`` frames around
them), tens of microseconds each way.

Only the driver that asked for it can connect: the socket lies in a directory only this
user can enter, and the first bytes on a connection must be the 32-byte token the driver
gave (through Ray) when it opened the channel; a connection that fails that is closed.
The socket's name is removed as soon as the driver is in.

Example (inside the actor)::

    server = SocketChannelServer(token, handle=lambda msg, side: actor.execute(msg, *side))
    path = server.path            # the driver connects here (scheduler.socket_channel)
"""
import hmac
import os
import shutil
import socket
import sys
import tempfile
import threading

from distgrad.framing import FrameError, FrameReader, send_frame

TOKEN_BYTES = 32
HELLO_TIMEOUT_S = 10.0
ACCEPT_TIMEOUT_S = 120.0     # the driver connects right after it is told the path
READ_BYTES = 1 << 20


class SocketChannelServer:
    """Accepts the driver's connection and runs ``handle(message, side) -> (bytes, side)``
    for each frame, in order, on one thread; replies go back in the same order."""

    def __init__(self, token, handle):
        if not isinstance(token, bytes) or len(token) != TOKEN_BYTES:
            raise ValueError(f"channel token must be {TOKEN_BYTES} bytes")
        self._token, self._handle = token, handle
        self._dir = tempfile.mkdtemp(prefix="distgrad-ch-")       # mode 0700
        self.path = os.path.join(self._dir, "s")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.path)
        self._listener.listen(4)
        self._listener.settimeout(ACCEPT_TIMEOUT_S)
        self._conn = None
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name="distgrad-channel", daemon=True)
        self._thread.start()

    def _remove_name(self):
        shutil.rmtree(self._dir, ignore_errors=True)

    def _accept(self):
        """The driver's connection (token checked), or None when none came in time."""
        try:
            while True:
                conn, _ = self._listener.accept()
                conn.settimeout(HELLO_TIMEOUT_S)
                try:
                    got = b""
                    while len(got) < TOKEN_BYTES:
                        more = conn.recv(TOKEN_BYTES - len(got))
                        if not more:
                            break
                        got += more
                    if hmac.compare_digest(got, self._token):
                        # the name goes before the driver hears it is in: no one else can come
                        self._listener.close()
                        self._remove_name()
                        conn.settimeout(None)
                        conn.sendall(b"OK")
                        return conn
                except OSError:
                    pass
                conn.close()
        except OSError:               # timed out, or closed by close()
            return None
        finally:
            self._listener.close()
            self._remove_name()

    def _serve(self):
        conn = self._accept()
        if conn is None:
            return
        self._conn = conn
        reader = FrameReader()
        try:
            while not self._closed:
                frame = reader.next_frame()
                if frame is None:
                    data = conn.recv(READ_BYTES)
                    if not data:          # the driver closed the channel
                        return
                    reader.feed(data)
                    continue
                send_frame(conn, *self._handle(*frame))
        except FrameError as e:
            # Nothing after a bad frame can be trusted: the driver sees the channel close
            # and treats this worker as lost (it is replaced and re-hydrated).
            print(f"distgrad channel: closing on a bad frame: {e}", file=sys.stderr)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self):
        self._closed = True
        try:
            self._listener.close()
        except OSError:
            pass
        if self._conn is not None:
            try:
                self._conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._remove_name()
