"""Driving the core's long work: generators of events (training, batch prediction).

`train(config)` and `predict_batch(...)` yield events and return their result; the CLI, the demo
and scripts run them to the end with `drive`, the napari widgets in a Qt worker
(`napari_mtml._napari._common.start_worker`)::

    from napari_mtml.generators import drive
    result = drive(train(config), print)       # each event to the callback; the return value
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any, TypeVar

__all__ = ["drive"]

R = TypeVar("R")


def drive(gen: Generator[Any, None, R], on_event: Callable[[Any], None] | None = None) -> R:
    """Run a generator of events to its end and return its return value.

    Parameters
    ----------
    gen : generator
        Yields events, returns a result (`StopIteration.value`).
    on_event : callable, optional
        Called with each event, in order.

    Returns
    -------
    The generator's return value.

    Any exception, from the generator or from `on_event` (Ctrl-C included), closes the generator
    first, so that its clean-up runs (training keeps its last good checkpoint, a batch writes
    `scores.csv` for what is done), then propagates.

    Examples
    --------
    >>> def count(n):
    ...     for i in range(n):
    ...         yield i
    ...     return "done"
    >>> seen = []
    >>> drive(count(3), seen.append), seen
    ('done', [0, 1, 2])
    """
    try:
        while True:
            try:
                event = next(gen)
            except StopIteration as stop:
                return stop.value
            if on_event is not None:
                on_event(event)
    except BaseException:
        gen.close()
        raise
