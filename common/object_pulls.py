"""How soon Flower 1.42 asks again for a message's objects that are not there yet, on all three of our sides.

A message becomes visible (to a SuperNode pulling its requests, a ClientApp task pulling its input, the ServerApp
pulling replies) before all its objects are uploaded; an object asked for too early is "unavailable", and Flower
waits 1 s before asking again (then 2, 4... up to 10 s). In a deployed round that was 0.5-1 s at most stage
transitions (timestamps of the loopback's SuperNodes and ServerApp): the sender was a few milliseconds from done.
Here the first retry comes after 20 ms, backing off to 1 s; Flower's bounds stay (500 tries of an object, at most
`PULL_MAX_TIME`), so an object that never comes is given up after about 8 minutes instead of 80.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

FIRST_WAIT, LONGEST_WAIT = 0.02, 1.0


def soon(pull: Callable[..., Any]) -> Callable[..., Any]:
    """Flower's `pull_objects` or `pull_and_inflate_object_from_tree`, retrying on the schedule above."""
    return functools.partial(pull, initial_backoff=FIRST_WAIT, backoff_cap=LONGEST_WAIT)


def pace_server_pulls() -> None:
    """The ServerApp's grid (flwr/superlink/grid/http_grid.py) pulls reply objects on the schedule above."""
    import flwr
    from flwr.superlink.grid import http_grid

    if flwr.__version__.startswith("1.42.") and not isinstance(http_grid.pull_objects, functools.partial):
        http_grid.pull_objects = soon(http_grid.pull_objects)
