"""The worker's end of the driver's direct channel: programs over a socket.

A Ray actor call costs 1-2 ms each way on a loaded machine, and a training step that
ends in ``loss.item()`` pays it twice while every worker waits. A worker instead serves
the driver's messages from a socket on a thread of its own: the same ``execute`` as the
Ray call, the same bytes (``distgrad.framing`` frames around them), tens of
microseconds each way. On the driver's machine the socket is a Unix socket in a
directory only this user can enter (its name goes once the driver is in); elsewhere a
TCP socket on the worker's node address.

Only the driver that asked for it gets in: it gave the worker a 32-byte token through
Ray when it opened the channel, and a connection is served only after both ends proved
they hold it (``framing.hello_server``: HMACs over fresh nonces; the token never crosses
the wire). A connection that fails the hello is closed and the next one awaited.

Example (inside the actor)::

    server = SocketChannelServer(token, handle=worker.execute)
    server.address           # the driver connects here (scheduler.socket_channel)
"""
import os
import shutil
import socket
import sys
import tempfile
import threading

from distgrad.framing import FrameError, FrameReader, HelloError, hello_server, send_frame

TOKEN_BYTES = 32
HELLO_TIMEOUT_S = 10.0
ACCEPT_TIMEOUT_S = 120.0     # the driver connects right after it is told the address
READ_BYTES = 1 << 20


class SocketChannelServer:
    """Accepts the driver's connection and runs ``handle(message, side) -> (bytes, side)``
    for each frame, in order, on one thread; replies go back in the same order.
    ``host``: listen on TCP at that address; None: a Unix socket (``address`` its path)."""

    def __init__(self, token, handle, host=None):
        if not isinstance(token, bytes) or len(token) != TOKEN_BYTES:
            raise ValueError(f"channel token must be {TOKEN_BYTES} bytes")
        self._token, self._handle = token, handle
        self._dir = None
        if host is None:
            self._dir = tempfile.mkdtemp(prefix="distgrad-ch-")       # mode 0700
            self.address = os.path.join(self._dir, "s")
            self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._listener.bind(self.address)
        else:
            self._listener = socket.create_server((host, 0))
            self.address = [host, self._listener.getsockname()[1]]
        self._listener.listen(4)
        self._listener.settimeout(ACCEPT_TIMEOUT_S)
        self._conn = None
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name="distgrad-channel", daemon=True)
        self._thread.start()

    def _remove_name(self):
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    def _stop_listening(self):
        self._listener.close()
        self._remove_name()

    def _accept(self):
        """The driver's connection (its hello checked), or None when none came in time."""
        try:
            while True:
                conn, _ = self._listener.accept()
                conn.settimeout(HELLO_TIMEOUT_S)
                try:
                    # No one else can come once the driver is in: the listener and its name
                    # go before the driver hears so.
                    hello_server(conn, self._token, accepted=self._stop_listening)
                except (HelloError, OSError):
                    conn.close()
                    continue
                conn.settimeout(None)
                if conn.family != socket.AF_UNIX:
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return conn
        except OSError:               # timed out, or closed by close()
            return None
        finally:
            self._stop_listening()

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
