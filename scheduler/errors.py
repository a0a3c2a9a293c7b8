"""Errors the scheduler raises on the driver (defined in distgrad.errors, Ray-free)."""
from distgrad.errors import RecoveryError, ResizeError, WorkerError, WorkerTimeoutError  # noqa: F401
