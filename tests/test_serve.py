"""`tinyvlm serve` through the real `openai` client: answers equal to the library's, images, streaming,
batching of concurrent requests, a slow reader, every bad input and limit, the command line.

One server runs for the module, in a thread, on a free loopback port, serving a tiny VLM saved to a folder
and loaded as ``--model`` loads it. Its decoder weights are spread (N(0, 0.25)) so that answers are long and
differ between prompts: a mixed-up row would show. Every client call has a timeout and no retries.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import openai
import pytest
import torch
import uvicorn
from PIL import Image

from tinyvlm.cli import main
from tinyvlm.errors import ConfigError
from tinyvlm.serve.app import create_app, listening_socket
from tinyvlm.serve.config import ServeConfig
from tinyvlm.api import build_vlm, load_vlm

MODEL = "tiny-served"
TIMEOUT = 30.0  # seconds, every client call
LIMITS = ServeConfig(
    max_batch=8, max_queue=8, max_images=3, max_image_bytes=40_000, max_image_pixels=128 * 128, batch_wait_ms=5,
    image_fetch_timeout=1.0,
)


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    # the expectations below (an answer that ends after 4 tokens, ...) are this random draw's
    vlm = build_vlm("test-siglip", "test-llama", "pixel-shuffle-mlp", pretrained=False, projector_kwargs={"factor": 2},
                    processor_kwargs={"token_layout": "nanovlm"})
    with torch.no_grad():
        for name, p in vlm.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
            elif name.startswith("decoder."):
                p.copy_(torch.randn(p.shape) * 0.25)  # the same values in any weight layout
    return vlm.save_pretrained(tmp_path_factory.mktemp("served") / "tiny-vlm")


@pytest.fixture(scope="module")
def vlm(model_folder: Path):
    return load_vlm(f"local-dir:{model_folder}")


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models decode far faster on one intra-op thread than on two on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class ServerThread:
    """uvicorn serving ``app`` on 127.0.0.1:<free port> in a thread of this process."""

    def __init__(self, app: Any) -> None:
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
        self.server = uvicorn.Server(config)
        sock = listening_socket(config)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.01)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def server(vlm) -> Iterator[ServerThread]:
    served = ServerThread(create_app(vlm, MODEL, LIMITS))
    yield served
    served.close()


@pytest.fixture
def client(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", timeout=TIMEOUT, max_retries=0)


def health(server: ServerThread) -> dict[str, Any]:
    with urllib.request.urlopen(server.url + "/health", timeout=TIMEOUT) as response:
        return json.loads(response.read())


@contextmanager
def busy_model(vlm, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[threading.Event, threading.Event]]:
    """Hold the model's worker at its next batch (inside ``embed_inputs``) until ``release`` is set:
    ``entered`` tells the worker is held. Later batches run freely."""
    entered, release = threading.Event(), threading.Event()
    original = vlm.embed_inputs

    def held(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        release.wait(TIMEOUT)
        return original(*args, **kwargs)

    monkeypatch.setattr(vlm, "embed_inputs", held)
    try:
        yield entered, release
    finally:
        release.set()


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def png(size: tuple[int, int], seed: int = 0, *, noise: bool = True) -> bytes:
    g = torch.Generator().manual_seed(seed)
    if noise:
        pixels = torch.randint(0, 255, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy()
        image = Image.fromarray(pixels)
    else:
        image = Image.new("RGB", size, (200, 30, 30))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def user(*parts: Any) -> list[dict[str, Any]]:
    """One user message of text (str) and image URL parts."""
    content = [{"type": "text", "text": p} if isinstance(p, str) else {"type": "image_url", "image_url": {"url": p[0]}}
               for p in parts]  # fmt: skip
    return [{"role": "user", "content": content}]


def ask(client: openai.OpenAI, messages: list[dict[str, Any]], **options: Any):
    options.setdefault("max_tokens", 12)
    return client.chat.completions.create(model=MODEL, messages=messages, **options)


# ------------------------------------------------------------------------------------------------ answers


def test_models_are_listed(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL] and models.data[0].object == "model"
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("gpt-4o")
    assert info.value.body["param"] == "model" and info.value.body["code"] == 404


def test_a_plain_question_gets_the_library_answer(client: openai.OpenAI, vlm) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is two plus two?"}]
    reply = ask(client, messages, max_tokens=12)
    expected = vlm.generate(messages, max_new_tokens=12)
    assert reply.object == "chat.completion" and reply.model == MODEL and reply.id.startswith("chatcmpl-")
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected and len(expected) >= 12
    assert choice.finish_reason == "length"  # this model does not stop by itself within 12 tokens
    ids, _ = vlm.processor.encode_prompt(messages)
    assert reply.usage.prompt_tokens == len(ids)
    assert reply.usage.completion_tokens == 12 and reply.usage.total_tokens == len(ids) + 12


def test_an_image_question_gets_the_library_answer(client: openai.OpenAI, vlm) -> None:
    picture = png((60, 44), seed=1)
    reply = ask(client, user((data_url(picture),), "What colour is it?"), max_tokens=10)
    image = Image.open(io.BytesIO(picture))
    library_prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]}]
    assert reply.choices[0].message.content == vlm.generate(library_prompt, [image], max_new_tokens=10)
    ids, _ = vlm.processor.encode_prompt(library_prompt, [image])
    assert reply.usage.prompt_tokens == len(ids)
    assert ids.count(vlm.image_token_id) == vlm.processor.tokens_per_view  # image tokens are counted
    other = ask(client, user((data_url(png((60, 44), seed=2)),), "What colour is it?"), max_tokens=10)
    assert other.choices[0].message.content != reply.choices[0].message.content  # the pixels reach the model


def test_the_end_token_ends_the_answer(client: openai.OpenAI, vlm) -> None:
    messages = user("A long answer please.")  # this model ends it with its end-of-sequence token after 4 tokens
    reply = ask(client, messages, max_tokens=32)
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens == 5  # the end token is generated, so counted
    assert reply.choices[0].message.content == vlm.generate(messages, max_new_tokens=32)


def test_streamed_pieces_join_to_the_answer(client: openai.OpenAI) -> None:
    messages = user("Tell me a story about", (data_url(png((32, 32), seed=3)),), "this picture.")
    whole = ask(client, messages, max_tokens=16)
    chunks = list(ask(client, messages, max_tokens=16, stream=True, stream_options={"include_usage": True}))
    assert {c.object for c in chunks} == {"chat.completion.chunk"} and len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([p for p in pieces if p]) > 1  # really streamed, not one piece
    assert "".join(pieces) == whole.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finish[-1] == "length" and not any(finish[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])
    plain = list(ask(client, messages, max_tokens=16, stream=True))  # without include_usage: no usage chunk
    assert all(c.choices and c.usage is None for c in plain)


def test_stop_strings_cut_the_answer(client: openai.OpenAI, vlm) -> None:
    messages = user("Name three rivers.")
    full = ask(client, messages, max_tokens=20).choices[0].message.content
    stop = full[8:11]
    assert stop and stop not in full[:8]
    reply = ask(client, messages, max_tokens=20, stop=[stop, "never appears \u2603"])
    assert reply.choices[0].message.content == full[:8] and reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].message.content == vlm.generate(messages, max_new_tokens=20, stop=[stop])
    assert reply.usage.completion_tokens < 20
    chunks = ask(client, messages, max_tokens=20, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full[:8]


def test_sampling_options_are_the_library_s(client: openai.OpenAI, vlm) -> None:
    messages = user("Surprise me.")
    options = dict(temperature=1.0, top_p=0.9, seed=7)
    first = ask(client, messages, max_tokens=16, **options).choices[0].message.content
    assert first == vlm.generate(messages, max_new_tokens=16, **options)  # the seed reproduces the library's sample
    assert first == ask(client, messages, max_tokens=16, **options).choices[0].message.content
    assert first != ask(client, messages, max_tokens=16, **{**options, "seed": 8}).choices[0].message.content
    top_k = ask(client, messages, max_tokens=16, temperature=0.7, seed=1, extra_body={"top_k": 5})
    expected = vlm.generate(messages, max_new_tokens=16, temperature=0.7, seed=1, top_k=5)
    assert top_k.choices[0].message.content == expected
    penalized = ask(client, messages, max_tokens=16, extra_body={"repetition_penalty": 0.5})  # < 1 favours repeats
    expected = vlm.generate(messages, max_new_tokens=16, repetition_penalty=0.5)
    assert penalized.choices[0].message.content == expected != vlm.generate(messages, max_new_tokens=16)


# -------------------------------------------------------------------------------------------- concurrency


def concurrent_requests(vlm) -> list[dict[str, Any]]:
    """Eight requests of different lengths, images, answer limits and stop strings."""
    requests = []
    for k in range(8):
        parts: list[Any] = [f"Question {k}: " + "tell me more " * k]
        if k % 3 == 0:
            parts.append((data_url(png((30 + 4 * k, 40), seed=10 + k)),))
        requests.append({"messages": user(*parts), "max_tokens": 6 + 2 * k, "stop": ["zz"] if k == 5 else None})
    return requests


def test_concurrent_requests_are_batched_and_equal_to_single_answers(client, server, vlm, monkeypatch) -> None:
    requests = concurrent_requests(vlm)
    alone = [ask(client, **r) for r in requests]  # one at a time: batches of one
    before = health(server)
    with busy_model(vlm, monkeypatch) as (entered, release), ThreadPoolExecutor(9) as pool:
        blocker = pool.submit(ask, client, user("hold the model"), max_tokens=2)
        assert entered.wait(TIMEOUT)
        futures = [pool.submit(ask, client, **r) for r in requests]
        wait_for(lambda: health(server)["waiting"] == 8, "eight waiting requests")
        release.set()
        together = [f.result(timeout=TIMEOUT) for f in futures]
        blocker.result(timeout=TIMEOUT)
    after = health(server)
    assert after["batches"] - before["batches"] == 2 and after["largest_batch"] == 8  # the blocker, then all eight
    for single, batched in zip(alone, together):
        assert batched.choices[0].message.content == single.choices[0].message.content
        assert batched.choices[0].finish_reason == single.choices[0].finish_reason
        assert batched.usage == single.usage
    assert len({r.choices[0].message.content for r in together}) == 8


def test_batches_share_sampling_settings_and_seeded_requests_run_alone(client, server, vlm, monkeypatch) -> None:
    greedy = [dict(messages=user(f"Greedy {k}"), max_tokens=6 + k) for k in range(3)]
    seeded = [dict(messages=user(f"Seeded {k}"), max_tokens=6, temperature=0.8, seed=k) for k in range(2)]
    sampled = [dict(messages=user(f"Sampled {k}"), max_tokens=6, temperature=0.8, top_p=0.9) for k in range(2)]
    mixed = [greedy[0], seeded[0], sampled[0], greedy[1], seeded[1], sampled[1], greedy[2]]
    before = health(server)
    with busy_model(vlm, monkeypatch) as (entered, release), ThreadPoolExecutor(8) as pool:
        blocker = pool.submit(ask, client, user("hold"), max_tokens=1)
        assert entered.wait(TIMEOUT)
        futures = []
        for k, request in enumerate(mixed):  # queued in this order
            futures.append(pool.submit(ask, client, **request))
            wait_for(lambda: health(server)["waiting"] == k + 1, f"{k + 1} waiting requests")
        release.set()
        replies = [f.result(timeout=TIMEOUT) for f in futures]
        blocker.result(timeout=TIMEOUT)
    after = health(server)
    # the blocker; the greedy three together; each seeded request alone; the two unseeded samples together
    assert after["batches"] - before["batches"] == 1 + 1 + 2 + 1
    for request, reply in zip(mixed, replies):
        options = {k: v for k, v in request.items() if k in ("temperature", "seed")}
        if "seed" in options or "temperature" not in options:  # reproducible: the library gives the same answer
            expected = vlm.generate(request["messages"], max_new_tokens=request["max_tokens"], **options)
            assert reply.choices[0].message.content == expected


def test_a_burst_of_requests_fills_batches_up_to_max_batch(vlm) -> None:
    served = ServerThread(create_app(vlm, MODEL, ServeConfig(max_batch=4, batch_wait_ms=300)))
    try:
        client = openai.OpenAI(base_url=served.url + "/v1", api_key="none", timeout=TIMEOUT, max_retries=0)
        with ThreadPoolExecutor(6) as pool:  # sent at once: far less than 300 ms apart
            replies = list(pool.map(lambda k: ask(client, user(f"burst {k}"), max_tokens=4), range(6)))
        assert all(r.choices[0].message.content for r in replies)
        stats = health(served)
        assert (stats["batches"], stats["largest_batch"], stats["answered"]) == (2, 4, 6)  # 4, then the other 2
    finally:
        served.close()


def test_a_slow_reader_does_not_hold_up_others(client: openai.OpenAI) -> None:
    quick = user("A quick question.")
    expected = ask(client, quick, max_tokens=6).choices[0].message.content
    slow = ask(client, user("Write a long essay."), max_tokens=64, stream=True)
    first = next(iter(slow))  # read one chunk, then stop reading
    assert first.choices[0].delta.role == "assistant"
    started = time.monotonic()
    assert ask(client, quick, max_tokens=6).choices[0].message.content == expected
    assert time.monotonic() - started < TIMEOUT
    rest = list(slow)  # everything was generated meanwhile, buffered for this client
    assert rest[-1].choices[0].finish_reason == "length"
    assert len([c for c in rest if c.choices and c.choices[0].delta.content]) > 8


def test_clients_that_leave_are_dropped_from_the_queue(client, server, vlm, monkeypatch) -> None:
    with busy_model(vlm, monkeypatch) as (entered, release), ThreadPoolExecutor(1) as pool:
        blocker = pool.submit(ask, client, user("hold"), max_tokens=1)
        assert entered.wait(TIMEOUT)
        stream = ask(client, user("I will not wait."), max_tokens=8, stream=True)
        wait_for(lambda: health(server)["waiting"] == 1, "the streamed request to wait")
        stream.close()
        wait_for(lambda: health(server)["waiting"] == 0, "the streamed request to be dropped")
        with pytest.raises(openai.APITimeoutError):
            ask(client.with_options(timeout=0.5), user("Nor will I."), max_tokens=8)
        wait_for(lambda: health(server)["waiting"] == 0, "the timed-out request to be dropped")
        release.set()
        blocker.result(timeout=TIMEOUT)


def test_a_failing_model_answers_500_without_a_traceback(client: openai.OpenAI, vlm, monkeypatch) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the device is gone")

    monkeypatch.setattr(vlm, "embed_inputs", broken)
    with pytest.raises(openai.InternalServerError) as info:
        ask(client, user("Hello"))
    body = info.value.body
    assert body["code"] == 500 and body["type"] == "server_error" and "the device is gone" in body["message"]
    with pytest.raises(openai.APIError, match="the device is gone"):  # after the stream began: an error event
        list(ask(client, user("Hello"), stream=True))


# ------------------------------------------------------------------------------------------------- limits


def test_a_full_queue_answers_429(client, server, vlm, monkeypatch) -> None:
    with busy_model(vlm, monkeypatch) as (entered, release), ThreadPoolExecutor(9) as pool:
        blocker = pool.submit(ask, client, user("hold"), max_tokens=1)
        assert entered.wait(TIMEOUT)
        waiting = [pool.submit(ask, client, user(f"wait {k}"), max_tokens=1) for k in range(LIMITS.max_queue)]
        wait_for(lambda: health(server)["waiting"] == LIMITS.max_queue, "a full queue")
        with pytest.raises(openai.RateLimitError) as info:
            ask(client, user("one too many"), max_tokens=1)
        release.set()
        assert all(f.result(timeout=TIMEOUT).choices for f in [blocker, *waiting])  # the queued ones are answered
    body = info.value.body
    assert body["code"] == 429 and body["type"] == "rate_limit_error" and "--max-queue 8" in body["message"]


@pytest.mark.parametrize(
    "picture, fragment",
    [
        (png((200, 200), noise=False), "200x200 = 40000 pixels"),  # small file, too many pixels
        (png((120, 120), seed=4), "--max-image-bytes"),  # few pixels (14400), too many bytes (~43 kB)
    ],
    ids=["pixels", "bytes"],
)
def test_too_large_images_answer_413(client: openai.OpenAI, picture: bytes, fragment: str) -> None:
    with pytest.raises(openai.APIStatusError) as info:
        ask(client, user((data_url(picture),), "What?"))
    assert info.value.status_code == 413
    body = info.value.body
    assert body["code"] == 413 and fragment in body["message"]
    assert body["param"] == "messages[0].content[0].image_url.url"


def test_a_too_large_body_answers_413_before_it_is_read(server: ServerThread) -> None:
    connection = http.client.HTTPConnection(server.url.removeprefix("http://"), timeout=TIMEOUT)
    connection.putrequest("POST", "/v1/chat/completions")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(LIMITS.max_body_bytes + 1))
    connection.endheaders()  # and no body: the answer comes from the declared length alone
    response = connection.getresponse()
    assert response.status == 413 and json.loads(response.read())["error"]["code"] == 413
    connection.close()


# ---------------------------------------------------------------------------------------------- bad input


def post_raw(server: ServerThread, data: bytes) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        server.url + "/v1/chat/completions", data=data, headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_malformed_json_answers_400(server: ServerThread) -> None:
    for data, fragment in [(b'{"model": "tiny-served", "messages": [', "not valid JSON"),
                           (b"[1, 2]", "must be a JSON object"), (b"\xff\xfe", "not valid JSON")]:  # fmt: skip
        status, body = post_raw(server, data)
        assert status == 400 and fragment in body["error"]["message"], body
        assert body["error"]["type"] == "invalid_request_error" and body["error"]["code"] == 400


LONG_TEXT = "many words " * 1200  # > 2048 tokens, the test decoder's context
PICTURE = data_url(png((16, 16), seed=5))
TRUNCATED = data_url(png((64, 64), seed=6)[:300])

BAD_REQUESTS = {
    "unknown role": (dict(messages=[{"role": "tool", "content": "x"}]), "messages[0].role", "'tool'"),
    "unknown part": (dict(messages=[{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]),
                     "messages[0].content[0]", "'input_audio'"),
    "no content": (dict(messages=[{"role": "user"}]), "messages[0].content", "is required"),
    "bad content": (dict(messages=[{"role": "user", "content": 5}]), "messages[0].content", "string or a list"),
    "no messages": (dict(messages=[]), "messages", "at least 1"),
    "image from assistant": (dict(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": [
        {"type": "image_url", "image_url": {"url": PICTURE}}]}]), "messages[1]", "user messages only"),
    "not an image": (dict(messages=user((data_url(b"hello, not a picture"),))), "messages[0].content[0].image_url.url",
                     "not an image"),
    "broken image": (dict(messages=user((TRUNCATED,))), "messages[0].content[0].image_url.url", "broken"),
    "bad base64": (dict(messages=user(("data:image/png;base64,@@@@",))), "messages[0].content[0].image_url.url",
                   "not valid base64"),
    "not base64": (dict(messages=user(("data:image/png,rawbytes",))), "messages[0].content[0].image_url.url",
                   "base64-encoded"),
    "not an image type": (dict(messages=user((data_url(b"abc", "text/plain"),))),
                          "messages[0].content[0].image_url.url", "'text/plain'"),
    "file url": (dict(messages=user(("file:///etc/passwd",))), "messages[0].content[0].image_url.url", "'file'"),
    "offline url": (dict(messages=user(("https://example.com/cat.png",))), "messages[0].content[0].image_url.url",
                    "HF_HUB_OFFLINE=1"),
    "too many images": (dict(messages=user(*[(PICTURE,)] * 4)), "messages", "at most 3 (--max-images)"),
    "placeholders without images": (dict(messages=user((PICTURE,), "and <image>")), "messages", "too few images"),
    "prompt longer than the context": (dict(messages=user(LONG_TEXT)), "messages", "more than the decoder's 2048"),
    "answer past the context": (dict(max_tokens=5000), "max_tokens", "context is 2048 tokens"),
    "max_tokens 0": (dict(max_tokens=0), "max_tokens", "greater than or equal to 1"),
    "negative temperature": (dict(temperature=-0.5), "temperature", "greater than or equal to 0"),
    "top_p 0": (dict(temperature=1.0, top_p=0.0), "top_p", "greater than 0"),
    "top_p above 1": (dict(temperature=1.0, top_p=1.5), "top_p", "less than or equal to 1"),
    "top_k 0": (dict(extra_body={"top_k": 0}), "top_k", "greater than or equal to 1"),
    "negative seed": (dict(seed=-1), "seed", "greater than or equal to 0"),
    "repetition_penalty 0": (dict(extra_body={"repetition_penalty": 0}), "repetition_penalty", "greater than 0"),
    "empty stop": (dict(stop=[""]), "stop", "must not be empty"),
    "five stops": (dict(stop=list("abcde")), "stop", "at most 4"),
    "n 2": (dict(n=2), "n", "not supported"),
    "logprobs": (dict(logprobs=True), "logprobs", "not supported"),
    "tools": (dict(tools=[{"type": "function", "function": {"name": "f"}}]), "tools", "not supported"),
    "stream_options without stream": (dict(stream_options={"include_usage": True}), None, "only allowed with stream"),
    "temperature not a number": (dict(extra_body={"temperature": "hot"}), "temperature", "valid number"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=list(BAD_REQUESTS))
def test_bad_input_answers_400_with_an_openai_error(client: openai.OpenAI, case: str) -> None:
    options, param, fragment = BAD_REQUESTS[case]
    options = {"messages": user("Hello"), "max_tokens": 4, **options}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, **options)
    body = info.value.body
    assert set(body) == {"message", "type", "param", "code"}
    assert body["type"] == "invalid_request_error" and body["code"] == 400 and body["param"] == param
    assert fragment in body["message"], body["message"]
    assert "Traceback" not in body["message"]


def test_a_prompt_filling_the_context_leaves_no_room(client: openai.OpenAI, vlm) -> None:
    short = [{"role": "user", "content": "a"}]
    words = 2048 - len(vlm.processor.encode_prompt(short)[0])  # " a" is one token of this tokenizer
    messages = [{"role": "user", "content": "a" + " a" * words}]
    assert len(vlm.processor.encode_prompt(messages)[0]) == 2048
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=messages)
    assert info.value.body["param"] == "messages" and "no room for an answer" in info.value.body["message"]


def test_an_unknown_model_answers_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=user("Hi"), max_tokens=2)
    body = info.value.body
    assert body["param"] == "model" and body["code"] == 404 and MODEL in body["message"]


def test_unknown_routes_answer_an_openai_error(server: ServerThread) -> None:
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(server.url + "/v1/completions", timeout=TIMEOUT)
    assert info.value.code in (404, 405) and json.loads(info.value.read())["error"]["code"] == info.value.code


# ------------------------------------------------------------------------------------------- image URLs


class ImageHost:
    """A loopback web server: ``/cat.png`` is ``picture``, ``/big.png`` and ``/big-unsized.png`` (no
    Content-Length) one over the byte limit, ``/slow.png`` sends a byte every 0.2 s, other paths 404."""

    def __init__(self, picture: bytes) -> None:
        big = png((120, 120), seed=4)

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path in ("/cat.png", "/big.png", "/big-unsized.png"):
                    body = picture if self.path == "/cat.png" else big
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    if self.path != "/big-unsized.png":
                        self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                elif self.path == "/slow.png":
                    self.send_response(200)
                    self.end_headers()
                    for byte in picture[:40]:
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        time.sleep(0.2)
                else:
                    self.send_error(404)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def test_http_image_urls_are_fetched_when_online(client: openai.OpenAI, online) -> None:
    picture = png((40, 40), seed=7)
    host = ImageHost(picture)
    try:
        fetched = ask(client, user((host.url + "/cat.png",), "What is it?"), max_tokens=8)
        inline = ask(client, user((data_url(picture),), "What is it?"), max_tokens=8)
        assert fetched.choices[0].message.content == inline.choices[0].message.content
        with pytest.raises(openai.BadRequestError) as missing:
            ask(client, user((host.url + "/missing.png",), "What is it?"))
        assert "HTTP 404" in missing.value.body["message"] and "data: URL" in missing.value.body["message"]
        for path in ("/big.png", "/big-unsized.png"):  # refused from the header, or while reading
            with pytest.raises(openai.APIStatusError) as big:
                ask(client, user((host.url + path,), "What is it?"))
            assert big.value.status_code == 413 and "--max-image-bytes" in big.value.body["message"]
        started = time.monotonic()
        with pytest.raises(openai.BadRequestError) as slow:  # 40 bytes at 5 a second: past the 1 s limit
            ask(client, user((host.url + "/slow.png",), "What is it?"))
        assert "not complete after 1 s" in slow.value.body["message"] and time.monotonic() - started < 5
    finally:
        host.close()
    with pytest.raises(openai.BadRequestError) as refused:  # nothing listens on the discard port
        ask(client, user(("http://127.0.0.1:9/cat.png",), "What is it?"))
    assert "cannot fetch" in refused.value.body["message"]


# ------------------------------------------------------------------------------------------ command line


def test_the_serve_command_answers_like_the_in_process_server(model_folder: Path, client: openai.OpenAI) -> None:
    messages = user("Hello from the command line.")
    expected = ask(client, messages, max_tokens=8).choices[0].message.content
    command = [sys.executable, "-m", "tinyvlm.cli", "serve", "--model", f"local-dir:{model_folder}", "--port", "0",
               "--device", "cpu"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    try:
        line = process.stdout.readline()  # "tinyvlm serve: NAME on http://127.0.0.1:PORT/v1 (Ctrl-C stops)"
        assert line.startswith("tinyvlm serve: "), (line, process.stderr.read() if process.poll() is not None else "")
        base_url = line.split(" on ", 1)[1].split()[0]
        remote = openai.OpenAI(base_url=base_url, api_key="none", timeout=TIMEOUT, max_retries=0)
        name = f"local-dir:{model_folder}"
        deadline = time.monotonic() + 60
        while True:  # the socket is bound before the app has started
            try:
                assert [m.id for m in remote.models.list().data] == [name]
                break
            except openai.APIConnectionError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        reply = remote.chat.completions.create(model=name, messages=messages, max_tokens=8)
        assert reply.choices[0].message.content == expected
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_serve_flag_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--model", "test-vlm", "--max-batch", "0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("tinyvlm serve: error: --max-batch") and err.count("\n") == 1, err
    assert main(["serve", "--model", "test-vlm", "--max-queue", "-1"]) == 1
    assert "--max-queue -1: must be >= 0" in capsys.readouterr().err
    assert main(["serve", "--encoder", "test-siglip"]) == 1
    assert "--encoder needs --decoder" in capsys.readouterr().err


def test_a_missing_serve_extra_names_the_install_command(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from tinyvlm.serve import require_server_stack

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn -> ImportError
    with pytest.raises(ConfigError, match=r'pip install "tinyvlm\[serve\]"'):
        require_server_stack()
    assert main(["serve", "--model", "test-vlm"]) == 1
    assert 'pip install "tinyvlm[serve]"' in capsys.readouterr().err
