"""The model side of `tinyvlm serve`: one worker thread owns the model and answers waiting requests in
static batches; the HTTP side (the event loop) only queues requests and reads their answers.

Batching. A request waits in a queue of at most ``max_queue`` requests (one more is answered 429). When the
worker is free and a request waits, it lets a burst of requests gather: it waits until none has come for
``batch_wait_ms`` (so at most ``max_batch`` x ``batch_wait_ms``), or until ``max_batch`` wait; then it takes
the oldest request and every waiting request that can share its batch, up to ``max_batch``, in arrival order.
The batch runs as one left-padded generation on one preallocated KV cache
(`tinyvlm.generation.generate_tokens`); requests that come meanwhile wait for the next batch (static
batching: the cache is allocated per batch, for its rows, so rows cannot join a running batch).

Per row: its own answer limit (``max_tokens``), stop strings and end-of-sequence tokens; a row that has
ended is padded by the decoder and ignored here, and the batch stops as soon as every row has ended, or every
client of its rows has left. Per batch: how tokens are chosen. Greedy requests share batches whatever their
other settings (greedy decoding of a left-padded row gives the tokens the row gives alone). Sampled requests
share a batch only with requests of equal temperature / top-k / top-p; a request with a ``seed`` runs alone,
so that its seed reproduces its answer (a batch draws its rows' samples from one generator).

Answers go out through one asyncio queue per request (`Job.events`), filled from the worker with
``call_soon_threadsafe``: the worker never waits for a client, so a client that reads slowly or not at all
delays no one else.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Union

import torch
from PIL import Image

from tinyvlm.errors import TinyVLMError
from tinyvlm.generation import SamplingConfig, TextStream, generate_tokens, stop_ids
from tinyvlm.serve.protocol import APIError

if TYPE_CHECKING:
    from tinyvlm.vlm.model import VLM

log = logging.getLogger("tinyvlm.serve")


@dataclass(frozen=True)
class Piece:
    """Answer text, in order."""

    text: str


@dataclass(frozen=True)
class Done:
    """The answer has ended: ``"stop"`` (an end token or a stop string) or ``"length"`` (``max_tokens``)."""

    finish_reason: str
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    error: APIError


Event = Union[Piece, Done, Failed]


@dataclass(eq=False)
class Job:
    """One request as the worker sees it. ``sampling.max_new_tokens`` is its answer limit, ``sampling.stop``
    its stop strings."""

    prompt: list[dict[str, Any]]
    images: list[Image.Image]
    prompt_tokens: int
    sampling: SamplingConfig
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False  # the client left: set by the event loop
    ended: bool = False  # the worker sent Done or Failed
    completion_tokens: int = 0

    @property
    def batch_key(self) -> tuple[Any, ...]:
        """Jobs with equal keys may share a batch (see the module docstring)."""
        s = self.sampling
        if s.temperature == 0:
            return ("greedy", s.repetition_penalty)
        if s.seed is not None:
            return ("seeded", id(self))
        return ("sampled", s.temperature, s.top_k, s.top_p, s.repetition_penalty)

    def send(self, event: Event) -> None:
        """Hand ``event`` to the request's handler (from the worker thread)."""
        if isinstance(event, (Done, Failed)):
            self.ended = True
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop has closed: nobody is listening any more
            self.cancelled = True


class Engine:
    """The queue and the worker thread around one VLM prepared for inference (as the doors give it)."""

    def __init__(self, vlm: "VLM", *, max_batch: int, max_queue: int, batch_wait: float) -> None:
        self.vlm = vlm
        self.processor = vlm.processor  # built once, before threads share it
        self.context = vlm.decoder.config.max_position_embeddings
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.batch_wait = batch_wait
        self._waiting: deque[Job] = deque()
        self._lock = threading.Condition()
        self._stopping = False
        self._last_arrival = 0.0
        self._thread: threading.Thread | None = None
        self.running = 0
        self.batches = 0
        self.answered = 0
        self.largest_batch = 0

    # ------------------------------------------------------------------------------------- event loop side

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="tinyvlm-serve-model", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Refuse the waiting requests (503), let the running batch end, stop the worker."""
        with self._lock:
            self._stopping = True
            waiting, self._waiting = list(self._waiting), deque()
            self._lock.notify_all()
        for job in waiting:
            job.send(Failed(APIError(503, "the server is shutting down")))
        if self._thread is not None:
            self._thread.join(timeout=30)

    def count_prompt(self, prompt: list[dict[str, Any]], images: list[Image.Image]) -> int:
        """The prompt's length in tokens, image tokens included; a bad prompt (image count, context length,
        roles) raises the processor's `TinyVLMError`. Thread-safe: runs beside the worker."""
        ids, _ = self.processor.encode_prompt(prompt, images)
        return len(ids)

    def submit(self, job: Job) -> None:
        """Queue ``job``; a full queue is a 429."""
        with self._lock:
            if self._stopping:
                raise APIError(503, "the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise APIError(
                    429, f"the server is busy: {len(self._waiting)} requests are waiting (--max-queue "
                    f"{self.max_queue}); retry later",
                )
            self._waiting.append(job)
            self._last_arrival = time.monotonic()
            self._lock.notify_all()

    def cancel(self, job: Job) -> None:
        """The client of ``job`` has left: drop it from the queue, or stop its row."""
        with self._lock:
            if job.ended:
                return
            job.cancelled = True
            if job in self._waiting:
                self._waiting.remove(job)

    def status(self) -> dict[str, int]:
        with self._lock:
            return {
                "waiting": len(self._waiting),
                "running": self.running,
                "batches": self.batches,
                "answered": self.answered,
                "largest_batch": self.largest_batch,
            }

    # ----------------------------------------------------------------------------------------- worker side

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                self._answer(batch)
            except TinyVLMError as error:
                self._fail(batch, APIError(400, str(error)))
            except Exception as error:  # a bug or an exhausted device: the clients get a 500 body, the log the trace
                log.exception("the model failed on a batch of %d request(s)", len(batch))
                self._fail(batch, APIError(500, f"the model failed: {type(error).__name__}: {error}"))
            finally:
                with self._lock:
                    self.running = 0

    def _next_batch(self) -> list[Job] | None:
        with self._lock:
            while True:
                while not self._waiting and not self._stopping:
                    self._lock.wait()
                if self._stopping:
                    return None
                while len(self._waiting) < self.max_batch and not self._stopping:
                    left = self._last_arrival + self.batch_wait - time.monotonic()
                    if left <= 0:
                        break
                    self._lock.wait(left)
                if not self._waiting:  # every waiting client left meanwhile
                    continue
                key = self._waiting[0].batch_key
                batch = [job for job in self._waiting if job.batch_key == key][: self.max_batch]
                for job in batch:
                    self._waiting.remove(job)
                self.running = len(batch)
                self.batches += 1
                self.largest_batch = max(self.largest_batch, len(batch))
                return batch

    def _answer(self, batch: list[Job]) -> None:
        """Generate the rows of ``batch`` together, sending each row's text as it comes."""
        vlm = self.vlm
        inputs = self.processor([job.prompt for job in batch], [job.images for job in batch])
        input_ids = inputs["input_ids"].to(vlm.device)
        attention_mask = inputs["attention_mask"].to(vlm.device)
        with torch.inference_mode():
            embeds = vlm.embed_inputs(input_ids, inputs["pixel_values"])
        longest = max(job.sampling.max_new_tokens for job in batch)
        sampling = batch[0].sampling.replace(max_new_tokens=longest, stop=[])
        ends = set(stop_ids(vlm.decoder, sampling))
        rows = [(job, TextStream(vlm.tokenizer, job.sampling.stop)) for job in batch]
        steps = generate_tokens(vlm.decoder, input_ids, sampling, attention_mask=attention_mask, inputs_embeds=embeds)
        try:
            for tokens in steps:
                for (job, text), token in zip(rows, tokens.tolist()):
                    if job.cancelled:
                        job.ended = True
                    elif not job.ended:
                        self._take(job, text, token, ends)
                if all(job.ended for job, _ in rows):
                    break
        finally:
            steps.close()
        if not all(job.ended for job, _ in rows):  # every limit is >= 1 and reached within `longest` steps
            raise RuntimeError("generation ended before every row of the batch had ended")

    def _take(self, job: Job, text: TextStream, token: int, ends: set[int]) -> None:
        """One new token of ``job``'s row: its text, and the end of the answer when it comes."""
        job.completion_tokens += 1
        if token in ends:
            self._end(job, text.finish(), "stop")
            return
        piece = text.push(token)
        if text.done:  # a stop string appeared: the text stops before it
            self._end(job, piece, "stop")
        elif job.completion_tokens == job.sampling.max_new_tokens:
            self._end(job, piece + text.finish(), "length")
        elif piece:
            job.send(Piece(piece))

    def _end(self, job: Job, piece: str, finish_reason: str) -> None:
        if piece:
            job.send(Piece(piece))
        with self._lock:  # counted before the client can see the answer (and ask /health)
            self.answered += 1
        job.send(Done(finish_reason, job.completion_tokens))

    def _fail(self, batch: list[Job], error: APIError) -> None:
        for job in batch:
            if not job.ended:
                job.send(Failed(error))
