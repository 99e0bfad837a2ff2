"""Failpoints: named places in a service where a chaos run makes the process die at once.

Some crash windows are too narrow to hit with ``kill -9`` from outside: a source worker
that has published a migration's ``Checkpoint`` but not yet sent the resuming
``Assignment`` to the target is a window of a millisecond. A failpoint names such a place;
``GOODSERVE_FAILPOINTS=name[,name...]`` in a service's environment makes the process call
``os._exit(137)`` the first time it gets there: no ``finally`` blocks, no flushing of the
producer, no offset commits, like ``SIGKILL``. The set is read once, at import; with the
variable unset (production) a failpoint is one truthiness test of an empty frozenset.

Failpoints in the services (``workers/service.py``):

- ``worker.migration.received``: a ``MigrationCommand`` for a request running here, before
  the request is stopped and checkpointed;
- ``worker.migration.checkpointed``: its ``Checkpoint`` is acknowledged, the resuming
  ``Assignment`` to the target not yet sent;
- ``worker.migration.resumed``: the resuming ``Assignment`` is acknowledged, the source's
  own ``Assignment`` offset not yet committed.

This module imports only the standard library (the workers import it).
"""

from __future__ import annotations

import os
import sys

__all__ = ["ENV", "EXIT_CODE", "active", "failpoint"]

ENV = "GOODSERVE_FAILPOINTS"
EXIT_CODE = 137
"""What a failpoint exits with (the status of a process killed by SIGKILL, 128 + 9)."""


def _parse(value: str) -> frozenset[str]:
    return frozenset(n.strip() for n in value.split(",") if n.strip())


_ACTIVE = _parse(os.environ.get(ENV, ""))


def active() -> frozenset[str]:
    """The failpoints armed in this process."""
    return _ACTIVE


def failpoint(name: str) -> None:
    """Die here (``os._exit(137)``) if ``name`` is armed; otherwise do nothing."""
    if _ACTIVE and name in _ACTIVE:
        # one line a chaos run can find in the log, then no clean-up at all
        sys.stdout.write(f'{{"event": "failpoint.crash", "failpoint": "{name}"}}\n')
        sys.stdout.flush()
        os._exit(EXIT_CODE)
