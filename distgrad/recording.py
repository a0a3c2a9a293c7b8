"""What the driver records for the workers: the program being built between two sync
points, and the stand-in grad_fn of a distributed value.

Example::

    rec = Recording(world=2)
    slot = rec.new_slot(vid=7)        # a value this program defines
    rec.instrs.append(["fetch", slot])
"""
from . import engine


class LazyNode(engine.Node):
    """The driver's stand-in grad_fn of a distributed value: the real graph lives on
    the workers. It names the op (``MulBackward``) and keeps the graph's edges, so the
    driver knows which hooks and inputs a backward reaches; ``vid`` names its value on
    the workers (``hold`` keeps that value alive while a hook is registered on it)."""

    __slots__ = ("vid", "hold")

    def input_grads(self, grad):
        raise RuntimeError("distributed values are differentiated on the workers")


class Recording:
    """The program being recorded between two sync points.

    A recording with a ``parent`` is a sub-program traced inside another one (a custom
    Function's backward, a hook): its ``ext`` slots are values of the parent, and new
    inputs and scalars go to the root recording, whose message carries them.
    """

    def __init__(self, world, parent=None):
        self.instrs = []
        self.nslots = 0
        self.slot_of = {}             # vid -> slot
        self.ext = []                 # slots bound to values of earlier programs
        self.outputs = {}             # slot -> vid (values this program defines)
        self.parent = parent
        if parent is None:
            self.inputs = [[] for _ in range(world)]
            self.scalars = []         # float operands and attrs: inputs, not constants
            self.replayed = {}        # id(local node) -> (node, distributed result)
            self.shard_puts = []      # (input index, store) of sharded inputs
            self.source_reads = []    # (input index, data source, batch rows, stores)
            self.rollback = []        # driver-side undo, run if this program fails
            self.committed = False    # every worker finished it: nothing to undo

    @property
    def root(self):
        """The recording whose message carries this one. (Not an attribute: a root that
        named itself would be a reference cycle, and everything it holds (a step's input
        arrays, the storages of its sharded inputs, whose workers' values then stay) would
        wait for the cyclic collector.)"""
        return self if self.parent is None else self.parent.root

    def new_slot(self, vid=None):
        s = self.nslots
        self.nslots += 1
        if vid is not None:
            self.slot_of[vid] = s
            self.outputs[s] = vid
        return s

    def ref(self, vid):
        s = self.slot_of.get(vid)
        if s is None:
            s = self.new_slot()
            self.slot_of[vid] = s
            self.ext.append(s)
        return s

    def add_input(self, per_worker):
        idx = len(self.inputs[0])
        for r, a in enumerate(per_worker):
            self.inputs[r].append(a)
        return idx

    def add_scalar(self, x):
        """A float the program reads from its message, so that a changed learning rate
        or momentum does not change the program's structure (its cache key)."""
        scalars = self.root.scalars
        scalars.append(x)
        return len(scalars) - 1
