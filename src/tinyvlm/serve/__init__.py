"""`tinyvlm serve`: an OpenAI-compatible chat-completions server for any tinyvlm VLM, with images, streaming
and batching of concurrent requests. Needs the ``serve`` extra (``pip install "tinyvlm[serve]"``).

``config`` (the options, torch-free), ``protocol`` (the wire format), ``images`` (image URLs -> PIL images),
``engine`` (the queue and the model's worker thread), ``app`` (the FastAPI app and `run`).
"""

from __future__ import annotations

from tinyvlm.errors import ConfigError


def require_server_stack() -> None:
    """FastAPI and uvicorn are the optional ``serve`` extra: say how to install them."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as error:
        raise ConfigError(
            f"tinyvlm serve needs FastAPI and uvicorn ({error.name} is not installed): pip install \"tinyvlm[serve]\""
        ) from None
