"""Failures on purpose, for tests and drills of retries: ``TESSERA_FAULTS="site[:times],..."``.

A step calls :func:`check` at a named *site* (e.g. ``sweep.point.<key>``); when the environment
names that site it raises :class:`InjectedFault` the first ``times`` calls (default 1), counted
in ``$TESSERA_HOME/faults/`` so the count survives the process (an Airflow retry is a new one).
Unset, :func:`check` reads one environment variable and returns.
"""

from __future__ import annotations

from components.core.config import Environment

ENV = "TESSERA_FAULTS"  # read by Environment


class InjectedFault(RuntimeError):
    """Raised at a site named in ``TESSERA_FAULTS``."""


def check(site: str) -> None:
    """Raise :class:`InjectedFault` if ``TESSERA_FAULTS`` names ``site`` and its count is not
    used up yet."""
    env = Environment.read()
    for item in filter(None, (s.strip() for s in env.faults.split(","))):
        name, _, times = item.partition(":")
        if name != site:
            continue
        counter = env.home / "faults" / site
        done = int(counter.read_text()) if counter.exists() else 0
        if done >= int(times or 1):
            return
        counter.parent.mkdir(parents=True, exist_ok=True)
        counter.write_text(str(done + 1))
        raise InjectedFault(
            f"injected fault at {site} ({done + 1} of {int(times or 1)}; {ENV}={env.faults})"
        )
