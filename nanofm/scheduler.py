"""The serving loop: one background thread drives the engine's RunningBatch, and any number of
callers (the HTTP handlers of serve.py) submit requests to it and receive their text as it comes.

    scheduler = Scheduler(engine, slots=16)           # starts the thread
    handle = scheduler.submit(engine.new_row(prompt_ids, params), on_event)
    # on_event(delta: str, completion: Completion | None, error: str | None) is called from the
    # thread after every step that shows new text, and once more at the end with the completion
    scheduler.cancel(handle)                          # a client that went away: its slot is freed
    scheduler.swap(new_engine)                        # reload: new requests go to the new model
    scheduler.close()

Design decisions:
- One thread owns the batch (the model, the KV cache, every row): nothing is shared between
  threads but two thread-safe queues (new requests, cancellations), so there is no lock around
  the model. The HTTP side is asyncio; handlers bridge with loop.call_soon_threadsafe.
- Each step: newcomers take the free slots (prefilled together), then one decode step for all.
  A request never waits for another to finish, only for a free slot (a queue in arrival order).
- Text goes out as safe deltas (engine.safe_prefix): never half a UTF-8 character, never the
  start of a stop string that may still complete.
- Reload without dropping anything: each engine in use has its own running batch; new requests
  go to the newest engine, and an old engine's batch is stepped until its last request is done.
  A row always runs on the model whose tokenizer encoded it.
- A failure inside a step (a bug, out of memory) ends the requests in the batch with an error
  message and the loop goes on serving the next ones.
"""

from __future__ import annotations

import queue
import threading
import traceback
from collections import deque
from typing import Callable

from nanofm.engine import Completion, Engine, _Row

OnEvent = Callable[[str, "Completion | None", "str | None"], None]


class Scheduler:
    def __init__(self, engine: Engine, slots: int = 16):
        self.engine, self.slots = engine, slots
        self.inbox: queue.Queue = queue.Queue()
        self.cancelled: queue.Queue = queue.Queue()
        self.stats = {"running": 0, "waiting": 0, "steps": 0}  # read by /metrics (plain ints: safe to read)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="nanofm-scheduler", daemon=True)
        self.thread.start()

    def submit(self, row: _Row, on_event: OnEvent, engine: Engine | None = None) -> _Row:
        """Queue a row made by `engine` (default: the current one; a row always runs on the model
        whose tokenizer encoded it, even if a reload came in between)."""
        self.inbox.put((row, on_event, engine or self.engine))
        return row

    def swap(self, engine: Engine) -> None:
        """Serve new requests with `engine`; requests already running or queued on the old one
        finish there (its batch is stepped until empty, then dropped). Nothing is interrupted."""
        self.engine = engine

    def cancel(self, row: _Row) -> None:
        self.cancelled.put(row)

    def close(self) -> None:
        self._stop.set()
        self.inbox.put(None)  # wake the thread if it waits for work
        self.thread.join(timeout=10)

    def _loop(self) -> None:
        # one generation per engine in use: its running batch and its queue of waiting rows
        generations: dict[int, tuple[Engine, object, deque]] = {}
        listeners: dict[int, OnEvent] = {}  # id(row) -> its callback
        while not self._stop.is_set():
            idle = not any(batch.active or waiting for _, batch, waiting in generations.values())
            self._take_new(block=idle, listeners=listeners, generations=generations)
            self._take_cancelled(generations, listeners)
            for key, (engine, batch, waiting) in list(generations.items()):
                self._step(batch, waiting, listeners)
                if not batch.active and not waiting and engine is not self.engine:
                    del generations[key]  # a retired model with nothing left to do
            self.stats.update(running=sum(b.active for _, b, _ in generations.values()),
                              waiting=sum(len(w) for _, _, w in generations.values()))

    def _step(self, batch, waiting: deque, listeners: dict) -> None:
        if batch.free and waiting:
            newcomers = [waiting.popleft() for _ in range(min(batch.free, len(waiting)))]
            try:
                batch.add(*newcomers)
            except Exception as exc:  # noqa: BLE001 (a bad request must not stop the server)
                self._fail(newcomers, listeners, exc)
                return
        if not batch.active:
            return
        try:
            finished = batch.step()
        except Exception as exc:  # noqa: BLE001
            live = [row for row in batch.rows if row is not None]
            for row in live:
                batch.cancel(row)
            self._fail(live, listeners, exc)
            return
        self.stats["steps"] += 1
        for row in [r for r in batch.rows if r is not None] + finished:
            on_event, delta = listeners[id(row)], row.new_text()
            if row.finish_reason:
                del listeners[id(row)]
                on_event(delta, row.completion(), None)
            elif delta:
                on_event(delta, None, None)

    def _take_new(self, block: bool, listeners: dict, generations: dict) -> None:
        try:
            item = self.inbox.get(timeout=0.5) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        while item is not None:
            row, on_event, engine = item
            if id(engine) not in generations:
                engine.model.eval()
                generations[id(engine)] = (engine, engine.new_batch(self.slots), deque())
            row.live_text = True
            listeners[id(row)] = on_event
            generations[id(engine)][2].append(row)
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                item = None

    def _take_cancelled(self, generations: dict, listeners: dict) -> None:
        while True:
            try:
                row = self.cancelled.get_nowait()
            except queue.Empty:
                return
            for _, batch, waiting in generations.values():
                batch.cancel(row)
                if row in waiting:
                    waiting.remove(row)
            listeners.pop(id(row), None)

    def _fail(self, rows: list[_Row], listeners: dict, exc: Exception) -> None:
        message = f"generation failed: {type(exc).__name__}: {exc}"
        traceback.print_exc()
        for row in rows:
            on_event = listeners.pop(id(row), None)
            if on_event is not None:
                on_event("", None, message)
