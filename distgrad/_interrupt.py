"""Ctrl-C that always lands, and ends the program with the status a shell expects (130).

Python raises ``KeyboardInterrupt`` in whatever Python code runs when SIGINT arrives.
If that is a ``__del__`` method or a weakref callback (``WeakValueDictionary``,
``WeakSet``, ``weakref.finalize``: a training loop runs thousands of them), the
exception is printed as "Exception ignored in ..." and lost, and training goes on.
:func:`install` puts a SIGINT handler in place that raises as the default one does,
except inside a finalizer, where it re-delivers the interrupt a moment later, once the
finalizer has returned. It does the same inside functions marked with
:func:`atomic`: the driver's bookkeeping of what the workers hold (recording an op,
taking a program to send, undoing a failed one), where an interrupt half-way would leave
the driver and the workers disagreeing about which values exist.

An uncaught ``KeyboardInterrupt`` makes CPython exit by SIGINT (status 130 in a shell),
but Ray's exit handler (``ray.shutdown`` at exit) loses that and the process exits 1.
So :func:`install` also wraps ``sys.excepthook``: after the traceback is printed, it runs
the exit handlers itself (Ray's shutdown among them: the workers stop) and then ends the
process by SIGINT, as CPython would have.

Example::

    from distgrad import _interrupt
    _interrupt.install()        # dg.init does this; a no-op if the program has its own handler
"""
import _thread
import _weakrefset
import atexit
import os
import signal
import sys
import threading
import weakref

# Code in these files runs as weakref callbacks (and, rarely, on ordinary calls: deferring
# an interrupt there by a few milliseconds costs nothing).
_FINALIZER_FILES = frozenset({weakref.__file__, _weakrefset.__file__})
_RETRY_S = 0.005
_ATOMIC_CODES = set()      # code objects of the functions marked with atomic()
_hooked = False


def atomic(fn):
    """Mark ``fn`` as all-or-nothing with respect to Ctrl-C: an interrupt that arrives
    while it (or anything it calls) runs is delivered just after it returns. For short
    bookkeeping only: a wait inside it would hold the interrupt back as long.

    Example::

        @atomic
        def take(self):
            rec, self.rec = self.rec, Recording()
            return rec
    """
    _ATOMIC_CODES.add(fn.__code__)
    return fn


def in_finalizer(frame):
    """Whether ``frame`` (or a caller) is a ``__del__`` or a weakref callback.

    Example: ``in_finalizer(sys._getframe())`` is False in ordinary code.
    """
    while frame is not None:
        code = frame.f_code
        if code.co_name == "__del__" or code.co_filename in _FINALIZER_FILES:
            return True
        frame = frame.f_back
    return False


def must_defer(frame):
    """Whether an interrupt at ``frame`` must wait: inside a finalizer (where it would be
    lost) or inside an :func:`atomic` function (where it would tear the driver's state).

    Example: ``must_defer(sys._getframe())`` is False in ordinary code.
    """
    if in_finalizer(frame):
        return True
    while frame is not None:
        if frame.f_code in _ATOMIC_CODES:
            return True
        frame = frame.f_back
    return False


def _handler(signum, frame):
    if must_defer(frame):
        # Raising here would be swallowed or tear state: interrupt the main thread again shortly.
        timer = threading.Timer(_RETRY_S, _thread.interrupt_main)
        timer.daemon = True
        timer.start()
        return
    raise KeyboardInterrupt


def _excepthook(etype, value, tb, previous):
    previous(etype, value, tb)
    if not issubclass(etype, KeyboardInterrupt) or hasattr(sys, "ps1") or sys.flags.interactive:
        return                       # an interactive session goes on after a Ctrl-C
    atexit._run_exitfuncs()          # what finalization would run first (Ray's shutdown)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:            # a closed or broken stream: nothing left to save
            pass
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)


def install():
    """Use the finalizer-safe SIGINT handler, if SIGINT still has Python's default handler
    and this is the main thread (where signal handlers live), and make an uncaught
    KeyboardInterrupt end the process by SIGINT. Returns True if installed.

    Example: ``install()``.
    """
    if threading.current_thread() is not threading.main_thread():
        return False
    global _hooked
    if not _hooked:              # once: Ray may wrap our hook in its own afterwards
        previous = sys.excepthook
        sys.excepthook = lambda etype, value, tb: _excepthook(etype, value, tb, previous)
        _hooked = True
    current = signal.getsignal(signal.SIGINT)
    if current is _handler:
        return True
    if current is not signal.default_int_handler:
        return False                 # the program (or a framework) chose its own: keep it
    signal.signal(signal.SIGINT, _handler)
    return True
