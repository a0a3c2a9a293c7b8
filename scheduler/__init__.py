"""The driver-side scheduler: starts and places workers and drives them.

``local.LocalGang`` runs workers as threads; ``ray_gang.RayGang`` as Ray actors in one
placement group. Both expose ``run(payloads) -> replies``, ``stats()`` and ``shutdown()``.
"""
