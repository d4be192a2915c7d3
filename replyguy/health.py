"""Health states of the Reply Guy's dependencies and how they add up.

Each dependency (database, twitter, ai, telegram) reports ``healthy``,
``degraded`` or ``error``; the overall state is the worst of them. ``python
bot.py health`` turns the overall state into its exit code: 0, 1, 2.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

from shared.breaker import CircuitBreaker, CircuitState


class Health(str, enum.Enum):
    """One dependency's state, or the whole bot's."""

    HEALTHY = "healthy"
    DEGRADED = "degraded"
    ERROR = "error"

    @property
    def exit_code(self) -> int:
        """0 healthy, 1 degraded, 2 error (``python bot.py health``)."""
        return {Health.HEALTHY: 0, Health.DEGRADED: 1, Health.ERROR: 2}[self]


_RANK = {Health.HEALTHY: 0, Health.DEGRADED: 1, Health.ERROR: 2}


def worst(states: Iterable[Health]) -> Health:
    """The worst of ``states`` (healthy when there are none)."""
    result = Health.HEALTHY
    for state in states:
        if _RANK[state] > _RANK[result]:
            result = state
    return result


def breaker_health(breaker: CircuitBreaker) -> Health:
    """Open: error; half-open (probing): degraded; closed: healthy."""
    state = breaker.state
    if state is CircuitState.OPEN:
        return Health.ERROR
    if state is CircuitState.HALF_OPEN:
        return Health.DEGRADED
    return Health.HEALTHY


__all__ = ["Health", "breaker_health", "worst"]
