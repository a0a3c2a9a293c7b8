"""Errors the scheduler raises on the driver."""


class WorkerError(RuntimeError):
    """A worker failed; ``rank`` (and ``node`` where known) say which."""

    def __init__(self, msg, rank=None, node=None):
        super().__init__(msg)
        self.rank, self.node = rank, node


class WorkerTimeoutError(WorkerError, TimeoutError):
    """A worker did not answer within the timeout."""
