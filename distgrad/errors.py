"""Errors of the distributed runtime (raised on the driver)."""


class WorkerError(RuntimeError):
    """Workers failed; ``ranks`` (and ``nodes`` where known) say which."""

    def __init__(self, msg, ranks=(), nodes=()):
        super().__init__(msg)
        self.ranks, self.nodes = tuple(ranks), tuple(nodes)

    @property
    def rank(self):
        return self.ranks[0] if self.ranks else None


class WorkerTimeoutError(WorkerError, TimeoutError):
    """Workers did not answer within the timeout (hung or unreachable)."""


class RemoteError(RuntimeError):
    """An error raised on a worker while running a program (bad input, shapes...)."""


class RecoveryError(RuntimeError):
    """A failure could not be recovered from (no survivor, a value that was lost...)."""


class ResizeError(ValueError):
    """A resize that cannot be done (0 workers, more than the cluster has)."""
