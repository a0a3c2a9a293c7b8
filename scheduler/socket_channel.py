"""The driver's end of a direct channel to a worker (a Unix socket on the driver's own
machine, TCP to another).

``RayGang`` sends programs to a CPU worker through one of these instead of an actor
call (see ``workers.socket_channel`` for why and for the worker's end). Messages keep
their order; each ``post`` returns a :class:`Ticket` that ``wait_all`` fills in. A
worker whose process ends closes its socket, so its death is seen at once; one that
does not answer by the deadline is reported as hung, as a Ray call would be.

Example::

    ch = SocketChannel(address, token, rank=0, timeout_s=60)
    ticket = ch.post(data, side)
    wait_all([ticket], time.time() + 60, "its program")
    data, side = ticket.reply
"""
import select
import socket
import time
import weakref

from distgrad._interrupt import atomic
from distgrad.framing import FrameError, FrameReader, hello_client, send_frame

from .errors import WorkerError, WorkerTimeoutError

HELLO_TIMEOUT_S = 10.0
READ_BYTES = 1 << 20
# While Ray calls are pending beside the channels, the socket wait gives way this often.
MIXED_POLL_S = 0.005


class Ticket:
    """One message's reply to come: ``reply`` is ``(bytes, side arrays)`` once it came."""
    __slots__ = ("channel", "seq", "reply", "__weakref__")

    def __init__(self, channel, seq):
        self.channel, self.seq, self.reply = channel, seq, None


class SocketChannel:
    """A connected, authenticated channel to worker ``rank`` at ``address`` (a Unix
    socket's path, or ``[host, port]``)."""

    def __init__(self, address, token, rank, timeout_s):
        self.rank, self.timeout_s = rank, timeout_s
        unix = isinstance(address, str)
        self.kind = "unix" if unix else "tcp"
        self.sock = socket.socket(socket.AF_UNIX if unix else socket.AF_INET, socket.SOCK_STREAM)
        try:
            self.sock.settimeout(HELLO_TIMEOUT_S)
            self.sock.connect(address if unix else tuple(address))
            if not unix:
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            hello_client(self.sock, token)
        except BaseException:
            self.sock.close()
            raise
        self.reader = FrameReader()
        self.sent = self.received = 0
        self.waiting = weakref.WeakValueDictionary()     # seq -> Ticket someone waits on
        self.lost = None              # why the channel is unusable, once it is

    def post(self, data, side=()):
        """Send one message (in order after the earlier ones); never raises for a lost
        worker: its ticket fails when waited on, as a Ray call to a dead actor would."""
        self.sent += 1
        ticket = Ticket(self, self.sent)
        self.waiting[self.sent] = ticket
        if self.lost is None:
            try:
                self.sock.settimeout(self.timeout_s)
                send_frame(self.sock, data, side)
            except socket.timeout:
                self.lost = ("hung", "did not take its message within the timeout")
            except OSError as e:
                self.lost = ("died", f"its channel closed ({type(e).__name__})")
        return ticket

    @property
    def pending(self):
        return self.received < self.sent

    @atomic
    def _read(self, timeout):
        """Read what has arrived (waiting up to ``timeout``) and hand out whole replies.
        Atomic: a Ctrl-C lands after the bytes read are in the buffer, never between."""
        try:
            self.sock.settimeout(timeout)
            data = self.sock.recv(READ_BYTES)
        except (socket.timeout, BlockingIOError):
            return
        except OSError as e:
            data, why = b"", type(e).__name__
        else:
            why = "its channel closed"
        if not data:
            self.lost = ("died", why)
            return
        self.reader.feed(data)
        try:
            while True:
                frame = self.reader.next_frame()
                if frame is None:
                    return
                self.received += 1
                ticket = self.waiting.pop(self.received, None)
                if ticket is not None:
                    ticket.reply = frame
        except FrameError as e:
            self.lost = ("died", f"it sent a malformed reply ({e})")

    def close(self):
        self.lost = self.lost or ("died", "its channel was closed by the driver")
        try:
            self.sock.close()
        except OSError:
            pass


def _lost_error(ch, rank, node, what):
    kind, why = ch.lost
    if kind == "hung":
        return WorkerTimeoutError(f"workers [{rank}] did not finish {what} within the timeout "
                                  f"({why})", ranks=[rank], nodes=[node])
    return WorkerError(f"worker {rank} (node {node}) died during {what}: {why}",
                       ranks=[rank], nodes=[node])


def poll(pending, wait_s, what, nodes):
    """Wait up to ``wait_s`` for replies to ``pending`` ({index: Ticket}); drop the answered
    ones from it. ``nodes[index]`` names the worker's node in errors.

    Example: ``poll({0: ticket}, 0.1, "its program", gang.nodes)``.
    """
    deadline = time.monotonic() + wait_s
    while pending:
        for i, t in list(pending.items()):
            if t.reply is not None:
                del pending[i]
            elif t.channel.lost is not None:
                raise _lost_error(t.channel, i, nodes[i], what)
        channels = {id(t.channel): t.channel for t in pending.values()}
        left = deadline - time.monotonic()
        if not pending or left <= 0:
            return
        ready, _, _ = select.select([c.sock for c in channels.values()], [], [], left)
        for c in channels.values():
            if c.sock in ready:
                c._read(0)


def wait_all(tickets, deadline, what, nodes=None):
    """Wait for every ticket's reply until ``deadline`` (``time.time()``); a lost worker
    raises ``WorkerError`` at once, a late one ``WorkerTimeoutError`` naming the ranks.

    Example: ``wait_all([ch.post(b"...")], time.time() + 60, "its program")``.
    """
    pending = dict(enumerate(tickets))
    nodes = nodes or [None] * len(tickets)
    poll(pending, max(deadline - time.time(), 0), what, nodes)
    if pending:
        late = sorted(pending)
        raise WorkerTimeoutError(f"workers {late} did not finish {what} within the timeout",
                                 ranks=late, nodes=[nodes[r] for r in late])


def drain(channel, deadline, what, node=None):
    """Wait until ``channel`` answered everything sent on it (replies nobody waits for are
    dropped); a lost channel is left to whatever is sent next. Example: before a Ray call
    that changes the worker's state, so that it runs after the queued programs."""
    if not channel.pending or channel.lost is not None:
        return
    ticket = channel.waiting.get(channel.sent)          # the last message's reply
    if ticket is None:
        ticket = channel.waiting[channel.sent] = Ticket(channel, channel.sent)
    try:
        wait_all([ticket], deadline, what, [node])
    except WorkerTimeoutError as e:
        e.ranks, e.nodes = (channel.rank,), (node,)
        raise
    except WorkerError:
        pass
