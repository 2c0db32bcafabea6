"""The one bridge from a worker thread to a reader: items in order, taken blocking or awaited.

    channel = Channel()
    channel.put(item)                  # any thread
    item = channel.get()               # blocking, in a thread
    item = await channel.aget()        # or awaited on an event loop (no thread per reader)

An engine step hands many requests their events at once: `put(item, wakes)` then only notes
the reader's event loop, and `Channel.wake(wakes)` wakes each loop once for the whole step
(one `call_soon_threadsafe` a loop, not one a request). `gone`, when given, is called if the
reader's event loop has closed: nobody will read any more. Items are passed as they are,
exceptions included: what an item means is the reader's business.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable


class Channel:
    def __init__(self, gone: Callable[[], None] | None = None):
        self._items: deque = deque()
        self._ready = threading.Condition()
        self._waiter: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None  # an async reader's
        self.gone = gone

    def put(self, item, wakes: dict | None = None) -> None:
        with self._ready:
            self._items.append(item)
            self._ready.notify()
            waiter = self._waiter
        if waiter is not None:
            loop, event = waiter
            if wakes is None:
                Channel.wake({loop: [(event, self)]})
            else:
                wakes.setdefault(loop, []).append((event, self))

    @staticmethod
    def wake(wakes: dict) -> None:
        """Wake each event loop noted by `put(item, wakes)` once, for all its readers."""
        for loop, waiting in wakes.items():
            try:
                loop.call_soon_threadsafe(_set_all, [event for event, _ in waiting])
            except RuntimeError:  # the loop has closed: its readers are gone
                for _, channel in waiting:
                    if channel.gone is not None:
                        channel.gone()

    def empty(self) -> bool:
        return not self._items

    def get(self):
        """The next item, waiting for it."""
        with self._ready:
            while not self._items:
                self._ready.wait()
            return self._items.popleft()

    async def aget(self):
        """The next item, awaited on the running event loop (one reader's loop per channel)."""
        with self._ready:
            if self._waiter is None:
                self._waiter = (asyncio.get_running_loop(), asyncio.Event())
            event = self._waiter[1]
        while True:
            event.clear()  # cleared before looking: a put after the look sets it again
            with self._ready:
                if self._items:
                    return self._items.popleft()
            await event.wait()


def _set_all(events: list[asyncio.Event]) -> None:
    for event in events:
        event.set()
