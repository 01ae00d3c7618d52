"""Failures on purpose, for tests and drills of retries: ``TESSERA_FAULTS="site[:times],..."``.

A step calls :func:`check` at a named *site* (e.g. ``sweep.point.<key>``); when the environment
names that site it raises :class:`InjectedFault` the first ``times`` calls (default 1), counted
in ``$TESSERA_HOME/faults/`` so the count survives the process (an Airflow retry is a new one).
:func:`triggered` is the same test for faults that are not exceptions: ingest's
``ingest.hang.<file name>`` and ``ingest.crash.<file name>`` make the worker probing that file
hang or die as a decoder would; ``train.sigkill.<checkpoint folder>.step-NNNNNNN`` SIGKILLs
the training rank that just committed that checkpoint, as a pre-empted node would. Unset,
either reads one environment variable and returns.
"""

from __future__ import annotations

from components.core.config import Environment

ENV = "TESSERA_FAULTS"  # read by Environment


class InjectedFault(RuntimeError):
    """Raised at a site named in ``TESSERA_FAULTS``."""


def triggered(site: str) -> bool:
    """True (and counted) if ``TESSERA_FAULTS`` names ``site`` and its count is not used up:
    for faults other than an exception (a process that hangs or crashes)."""
    env = Environment.read()
    for item in filter(None, (s.strip() for s in env.faults.split(","))):
        name, _, times = item.partition(":")
        if name != site:
            continue
        counter = env.home / "faults" / site
        done = int(counter.read_text()) if counter.exists() else 0
        if done >= int(times or 1):
            return False
        counter.parent.mkdir(parents=True, exist_ok=True)
        counter.write_text(str(done + 1))
        return True
    return False


def check(site: str) -> None:
    """Raise :class:`InjectedFault` if ``TESSERA_FAULTS`` names ``site`` and its count is not
    used up yet."""
    if triggered(site):
        env = Environment.read()
        counter = env.home / "faults" / site
        raise InjectedFault(f"injected fault at {site} ({counter.read_text()}; {ENV}={env.faults})")
