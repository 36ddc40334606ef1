"""Files from the Hugging Face Hub: one file of one repo at one revision, with errors that say what to do.

Files come one by one through `huggingface_hub.hf_hub_download` (its cache, ``HF_HOME``, ``HF_ENDPOINT``,
``HF_HUB_OFFLINE`` and ``HF_TOKEN`` all apply; ``library_name="tinyvlm"``). Which revision to ask for is the
business of `tinyvlm.sources`: it pins a repo to the commit its first file resolved to.

Offline without ``HF_HUB_OFFLINE``: huggingface_hub retries a connection that cannot be made for about 25 s
per file (printing its retry warnings) before it falls back to the cache. Before the first request of a
process, `hub_reachable` opens one TCP connection to the endpoint (2 s at most); when that fails, every file
is read from the cache only, and a file that is not there fails at once with a message naming
``HF_HUB_OFFLINE=1``. (Behind a proxy, set in ``HTTPS_PROXY`` / ``ALL_PROXY``, the check is skipped.)
This module is torch-free.
"""

from __future__ import annotations

import os
import re
import socket
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlsplit

from tinyvlm import __version__
from tinyvlm.errors import HubError

HF_HUB = "hf-hub:"
LOCAL_DIR = "local-dir:"

SINGLE_FILE = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")

#: Files a tokenizer may come with; only ``tokenizer.json`` is required.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)

COMMIT = re.compile(r"[0-9a-f]{40}")
#: Seconds the reachability check waits for a TCP connection to the Hub endpoint.
REACHABLE_TIMEOUT = 2.0
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def offline() -> bool:
    """``HF_HUB_OFFLINE=1``: read the cache only."""
    from huggingface_hub import constants

    return bool(constants.is_offline_mode())


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def hub_reachable() -> bool:
    """Whether a TCP connection to the Hub endpoint opens within `REACHABLE_TIMEOUT` (checked once per
    endpoint and process; always True behind a proxy, which the check cannot see through)."""
    if any(os.environ.get(name) for name in _PROXY_VARIABLES):
        return True
    return _connects(endpoint())


@lru_cache(maxsize=8)
def _connects(url: str) -> bool:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "", port), timeout=REACHABLE_TIMEOUT):
            return True
    except OSError:
        return False


def fetch(
    repo_id: str, filename: str, revision: str | None, *, name: str, gated: bool = False, optional: bool = False
) -> Path | None:
    """``filename`` of ``repo_id`` at ``revision`` from the cache or the Hub. ``name`` is how the user named
    the model (for messages). An ``optional`` file the repo does not have gives None; a required one, or any
    other failure, raises `HubError`."""
    import httpx2  # huggingface_hub's HTTP client
    from huggingface_hub import _CACHED_NO_EXIST, errors, hf_hub_download, try_to_load_from_cache

    where = f"{repo_id}@{revision}" if revision else repo_id
    cached = try_to_load_from_cache(repo_id, filename, revision=revision)
    if optional and cached is _CACHED_NO_EXIST and revision and COMMIT.fullmatch(revision):
        return None  # a commit never changes: the cache already knows the file is absent
    local_only = offline() or not hub_reachable()
    try:
        return Path(
            hf_hub_download(
                repo_id,
                filename,
                revision=revision,
                library_name="tinyvlm",
                library_version=__version__,
                local_files_only=local_only,
            )
        )
    except errors.GatedRepoError:  # before RepositoryNotFoundError, its base class
        raise HubError(
            f"{repo_id} is gated: request access at https://huggingface.co/{repo_id} (logged in), then set "
            "HF_TOKEN to a read token of that account (or run `hf auth login`) and try again."
        ) from None
    except errors.RepositoryNotFoundError:
        hint = " It is gated: request access on its page, then set HF_TOKEN." if gated else ""
        raise HubError(
            f"{repo_id} was not found on the Hub (or it is private). Check the name "
            f"(`tinyvlm list-models` shows the zoo); for a private repo set HF_TOKEN.{hint}"
        ) from None
    except errors.RevisionNotFoundError:
        raise HubError(f"{repo_id} has no revision {revision!r}: check the branch, tag or commit.") from None
    except errors.RemoteEntryNotFoundError:
        if optional:
            return None
        raise HubError(f"{where} has no {filename}: it is not a model in the Hugging Face layout tinyvlm reads.") from None
    except errors.LocalEntryNotFoundError:  # not cached, and the Hub was not asked or did not answer
        if optional and try_to_load_from_cache(repo_id, filename, revision=revision) is _CACHED_NO_EXIST:
            return None
        raise HubError(unreachable_message(f"{filename} of {where}", name)) from None
    except errors.HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else "?"
        raise HubError(
            f"the Hub answered HTTP {status} for {filename} of {where}; try again later "
            f"(or run `tinyvlm download {name}` once it is back)."
        ) from None
    except (OSError, httpx2.TransportError) as error:  # failures huggingface_hub does not wrap (mid-download)
        raise HubError(
            f"downloading {filename} of {where} failed ({error}). Check your connection, then run "
            f"`tinyvlm download {name}` while online."
        ) from None


def unreachable_message(what: str, name: str) -> str:
    """Why ``what`` cannot be had without the network, and what to do."""
    if offline():
        return (
            f"{what} is not in the local cache and HF_HUB_OFFLINE=1 is set. Run `tinyvlm download {name}` while "
            "online (without HF_HUB_OFFLINE), or load a local folder with 'local-dir:PATH'."
        )
    return (
        f"{what} is not in the local cache and the Hub at {endpoint()} cannot be reached. Check your connection "
        f"and run `tinyvlm download {name}` while online, or load a local folder with 'local-dir:PATH'. "
        "To work from the cache without trying the network, set HF_HUB_OFFLINE=1."
    )


def push_folder(folder: Path, repo_id: str, *, private: bool, token: str | None, commit_message: str) -> str:
    """Upload ``folder`` to ``repo_id`` (created if needed); returns the commit URL."""
    import httpx2
    from huggingface_hub import HfApi, errors

    if offline() or not hub_reachable():
        why = "HF_HUB_OFFLINE=1 is set" if offline() else f"the Hub at {endpoint()} cannot be reached"
        raise HubError(
            f"cannot push to {repo_id}: {why}. Nothing was uploaded; push again once online "
            "(keep a copy with save_pretrained meanwhile)."
        )
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message)
    except errors.HfHubHTTPError as error:
        raise HubError(
            f"pushing to {repo_id} failed: {error}. Check the repo name and that HF_TOKEN (or `hf auth login`) "
            "gives write access."
        ) from None
    except (OSError, httpx2.TransportError) as error:
        raise HubError(f"pushing to {repo_id} failed ({error}). Check your connection and try again.") from None
    return str(getattr(commit, "commit_url", commit))
