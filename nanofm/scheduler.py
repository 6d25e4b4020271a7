"""The serving loop: one background thread drives the engine's RunningBatch, and any number of
callers (the HTTP handlers of serve.py) submit requests to it and receive their text as it comes.

    scheduler = Scheduler(engine, slots=16)           # starts the thread
    handle = scheduler.submit(engine.new_row(prompt_ids, params), on_event)
    # on_event(delta: str, completion: Completion | None, error: str | None) is called from the
    # thread after every step that shows new text, and once more at the end with the completion
    scheduler.cancel(handle)                          # a client that went away: its slot is freed
    scheduler.close()

Design decisions:
- One thread owns the batch (the model, the KV cache, every row): nothing is shared between
  threads but two thread-safe queues (new requests, cancellations), so there is no lock around
  the model. The HTTP side is asyncio; handlers bridge with loop.call_soon_threadsafe.
- Each step: newcomers take the free slots (prefilled together), then one decode step for all.
  A request never waits for another to finish, only for a free slot (a queue in arrival order).
- Text goes out as safe deltas (engine.safe_prefix): never half a UTF-8 character, never the
  start of a stop string that may still complete.
- A failure inside a step (a bug, out of memory) ends the requests in the batch with an error
  message and the loop goes on serving the next ones.
"""

from __future__ import annotations

import queue
import threading
import traceback
from collections import deque
from typing import Callable

from nanofm.engine import Completion, Engine, _Row, safe_prefix

OnEvent = Callable[[str, "Completion | None", "str | None"], None]


class Scheduler:
    def __init__(self, engine: Engine, slots: int = 16):
        self.engine, self.slots = engine, slots
        self.inbox: queue.Queue = queue.Queue()
        self.cancelled: queue.Queue = queue.Queue()
        self.waiting: deque = deque()
        self.stats = {"running": 0, "waiting": 0, "steps": 0}  # read by /metrics (plain ints: safe to read)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="nanofm-scheduler", daemon=True)
        self.thread.start()

    def submit(self, row: _Row, on_event: OnEvent) -> _Row:
        self.inbox.put((row, on_event))
        return row

    def cancel(self, row: _Row) -> None:
        self.cancelled.put(row)

    def close(self) -> None:
        self._stop.set()
        self.inbox.put(None)  # wake the thread if it waits for work
        self.thread.join(timeout=10)

    def _loop(self) -> None:
        batch = self.engine.new_batch(self.slots)
        listeners: dict[int, tuple[_Row, OnEvent, list]] = {}  # id(row) -> (row, callback, [chars shown])
        self.engine.model.eval()
        while not self._stop.is_set():
            self._take_new(block=not batch.active and not self.waiting, listeners=listeners)
            self._take_cancelled(batch, listeners)
            if batch.free and self.waiting:
                newcomers = [self.waiting.popleft() for _ in range(min(batch.free, len(self.waiting)))]
                try:
                    batch.add(*newcomers)
                except Exception as exc:  # noqa: BLE001 (a bad request must not stop the server)
                    self._fail(newcomers, listeners, exc)
                    continue
            if not batch.active:
                continue
            try:
                finished = batch.step()
            except Exception as exc:  # noqa: BLE001
                live = [row for row in batch.rows if row is not None]
                for row in live:
                    batch.cancel(row)
                self._fail(live, listeners, exc)
                continue
            self.stats.update(running=batch.active + len(finished), waiting=len(self.waiting),
                              steps=self.stats["steps"] + 1)
            for row in [r for r in batch.rows if r is not None] + finished:
                _, on_event, shown = listeners[id(row)]
                text = safe_prefix(row)
                if len(text) > shown[0]:
                    delta, shown[0] = text[shown[0]:], len(text)
                else:
                    delta = ""
                if row.finish_reason:
                    del listeners[id(row)]
                    on_event(delta, row.completion(), None)
                elif delta:
                    on_event(delta, None, None)
            self.stats.update(running=batch.active)

    def _take_new(self, block: bool, listeners: dict) -> None:
        try:
            item = self.inbox.get(timeout=0.5) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        while item is not None:
            row, on_event = item
            row.live_text = True
            listeners[id(row)] = (row, on_event, [0])
            self.waiting.append(row)
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                item = None
        self.stats["waiting"] = len(self.waiting)

    def _take_cancelled(self, batch, listeners: dict) -> None:
        while True:
            try:
                row = self.cancelled.get_nowait()
            except queue.Empty:
                return
            batch.cancel(row)
            if row in self.waiting:
                self.waiting.remove(row)
            listeners.pop(id(row), None)

    def _fail(self, rows: list[_Row], listeners: dict, exc: Exception) -> None:
        message = f"generation failed: {type(exc).__name__}: {exc}"
        traceback.print_exc()
        for row in rows:
            entry = listeners.pop(id(row), None)
            if entry is not None:
                entry[1]("", None, message)
