"""A loopback stand-in for the Hugging Face Hub, enough for `huggingface_hub.hf_hub_download`.

It serves the routes huggingface_hub 2.x calls for file downloads and repo info:

* ``HEAD`` / ``GET /{org}/{name}/resolve/{revision}/{path}`` with ``X-Repo-Commit``, ``ETag`` and
  ``Content-Length`` (plain HTTP: no Xet headers, so the client downloads the body itself);
* ``GET /api/models/{org}/{name}/revision/{revision}`` (``sha`` and ``siblings``);
* the errors the client maps to typed exceptions through ``X-Error-Code``: ``RepoNotFound`` (404),
  ``GatedRepo`` (401 without the right token), ``RevisionNotFound`` (404), ``EntryNotFound`` (404 with the
  commit, which the client records as "known absent" in its cache).

Dataset repos (``hub.add(..., repo_type="dataset")``) get the routes ``datasets`` calls to stream one:
``/datasets/{org}/{name}/resolve/...`` (with HTTP ``Range`` requests, as ``HfFileSystem`` reads parquet),
``GET /api/datasets/{org}/{name}/revision/{revision}`` and ``GET /api/datasets/{org}/{name}/tree/{revision}[/path]``
(``recursive``): what ``load_dataset(..., streaming=True)`` of a parquet dataset requests.

Every request for a model is recorded in ``hub.requests`` so that tests can assert that a load made none.
``GET /api/agent-harnesses`` (huggingface_hub's own once-a-day fetch for its user agent, not a model request)
is answered with an empty registry and not recorded.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable
from urllib.parse import unquote, urlsplit


@dataclass
class FakeRepo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    #: A gated repo answers 401 GatedRepo unless the request carries ``Authorization: Bearer <token>``.
    token: str | None = None


class FakeHub:
    """``with FakeHub() as hub: hub.add(...)``; ``hub.url`` is the endpoint to point huggingface_hub at."""

    def __init__(self) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.requests: list[tuple[str, str]] = []
        #: When set, every request is answered with this HTTP status (a Hub outage).
        self.fail_with: int | None = None
        #: Called with ``(method, path)`` after each model request is answered (e.g. to move a branch mid-load).
        self.after_request: Callable[[str, str], None] | None = None
        self._lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self) -> None:
                hub._handle(self, body=False)

            def do_GET(self) -> None:
                hub._handle(self, body=True)

            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "FakeHub":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    # -------------------------------------------------------------------------------------------- content

    def add(
        self,
        repo_id: str,
        files: dict[str, bytes | str | Path],
        *,
        branch: str = "main",
        token: str | None = None,
        repo_type: str = "model",
    ) -> str:
        """Commit ``files`` (bytes, text, or a path to read) to ``branch`` of ``repo_id`` (a model, or a
        ``repo_type="dataset"``); returns the commit.

        Each call makes a new commit holding exactly ``files`` (earlier commits stay reachable by hash)."""
        contents = {
            name: value.read_bytes() if isinstance(value, Path) else value.encode() if isinstance(value, str) else value
            for name, value in files.items()
        }
        repo_id = f"datasets/{repo_id}" if repo_type == "dataset" else repo_id
        repo = self.repos.setdefault(repo_id, FakeRepo())
        repo.token = token if token is not None else repo.token
        digest = hashlib.sha1(repr((repo_id, len(repo.commits), sorted(contents))).encode())
        for name in sorted(contents):
            digest.update(contents[name])
        commit = digest.hexdigest()
        repo.commits[commit] = contents
        repo.refs[branch] = commit
        return commit

    def add_folder(self, repo_id: str, folder: Path, **options: str | None) -> str:
        """Commit every file of ``folder`` (as written by ``save_pretrained`` or a test)."""
        return self.add(repo_id, {p.name: p for p in sorted(folder.iterdir()) if p.is_file()}, **options)

    def count(self, path_part: str = "") -> int:
        """How many requests were made, or how many had ``path_part`` in their path."""
        with self._lock:
            return sum(path_part in path for _, path in self.requests)

    # ------------------------------------------------------------------------------------------- handling

    def _handle(self, request: BaseHTTPRequestHandler, *, body: bool) -> None:
        path = unquote(urlsplit(request.path).path)
        if path == "/api/agent-harnesses":
            return _reply(request, 200, b'{"standardEnvVars": [], "harnesses": {}}', body=body)
        with self._lock:
            self.requests.append((request.command, path))
        try:
            self._answer(request, path, body=body)
        finally:
            if self.after_request is not None:
                self.after_request(request.command, path)

    def _answer(self, request: BaseHTTPRequestHandler, path: str, *, body: bool) -> None:
        if self.fail_with is not None:
            return _reply(request, self.fail_with, b"outage", body=body)
        parts = path.strip("/").split("/")
        if len(parts) >= 6 and parts[:2] == ["api", "models"] and parts[4] == "revision":
            return self._repo_info(request, "/".join(parts[2:4]), "/".join(parts[5:]), body=body)
        if len(parts) >= 6 and parts[:2] == ["api", "datasets"] and parts[4] in ("revision", "tree"):
            repo_id = "datasets/" + "/".join(parts[2:4])
            if parts[4] == "revision":
                return self._repo_info(request, repo_id, "/".join(parts[5:]), body=body)
            return self._tree(request, repo_id, parts[5], "/".join(parts[6:]), body=body)
        if len(parts) >= 6 and parts[0] == "datasets" and parts[3] == "resolve":
            return self._resolve(request, "/".join(parts[:3]), parts[4], "/".join(parts[5:]), body=body)
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve(request, "/".join(parts[:2]), parts[3], "/".join(parts[4:]), body=body)
        return _reply(request, 404, b"no such route", body=body)

    def _lookup(self, request: BaseHTTPRequestHandler, repo_id: str, revision: str, *, body: bool):
        repo = self.repos.get(repo_id)
        if repo is None:
            _reply(request, 404, b"Repository not found", {"X-Error-Code": "RepoNotFound"}, body=body)
            return None
        if repo.token is not None and request.headers.get("Authorization") != f"Bearer {repo.token}":
            message = f"Access to model {repo_id} is restricted. You must have access to it and be authenticated."
            _reply(request, 401, message.encode(), {"X-Error-Code": "GatedRepo", "X-Error-Message": message}, body=body)
            return None
        commit = repo.refs.get(revision, revision if revision in repo.commits else None)
        if commit is None:
            _reply(request, 404, b"Invalid rev id", {"X-Error-Code": "RevisionNotFound"}, body=body)
            return None
        return commit, repo.commits[commit]

    def _resolve(self, request: BaseHTTPRequestHandler, repo_id: str, revision: str, filename: str, *, body: bool):
        found = self._lookup(request, repo_id, revision, body=body)
        if found is None:
            return
        commit, files = found
        if filename not in files:
            headers = {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit}
            return _reply(request, 404, b"Entry not found", headers, body=body)
        data = files[filename]
        etag = hashlib.sha256(data).hexdigest()
        headers = {"X-Repo-Commit": commit, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        wanted = request.headers.get("Range", "")
        if wanted.startswith("bytes="):  # HfFileSystem reads parquet footers and row groups by range
            first, _, last = wanted[len("bytes="):].partition("-")
            start = int(first) if first else max(0, len(data) - int(last))
            stop = min(len(data), int(last) + 1) if first and last else len(data)
            headers["Content-Range"] = f"bytes {start}-{stop - 1}/{len(data)}"
            return _reply(request, 206, data[start:stop], headers, body=body)
        _reply(request, 200, data, headers, body=body)

    def _entry(self, name: str, data: bytes) -> dict:
        return {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}

    def _tree(self, request: BaseHTTPRequestHandler, repo_id: str, revision: str, folder: str, *, body: bool):
        found = self._lookup(request, repo_id, revision, body=body)
        if found is None:
            return
        _, files = found
        recursive = "recursive=true" in urlsplit(request.path).query.lower()
        prefix = folder.strip("/") + "/" if folder.strip("/") else ""
        entries: dict[str, dict] = {}
        for name in sorted(files):
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix):].split("/")
            for depth in range(1, len(rest)):  # the folders on the way
                if recursive or depth == 1:
                    directory = prefix + "/".join(rest[:depth])
                    entries.setdefault(directory, {"type": "directory", "path": directory, "oid": "0" * 40})
            if recursive or len(rest) == 1:
                entries[name] = self._entry(name, files[name])
        if prefix and not entries:
            return _reply(request, 404, b"Entry not found", {"X-Error-Code": "EntryNotFound"}, body=body)
        _reply(request, 200, json.dumps(list(entries.values())).encode(), {"Content-Type": "application/json"}, body=body)

    def _repo_info(self, request: BaseHTTPRequestHandler, repo_id: str, revision: str, *, body: bool):
        found = self._lookup(request, repo_id, revision, body=body)
        if found is None:
            return
        commit, files = found
        public_id = repo_id.removeprefix("datasets/")
        info = {
            "id": public_id,
            "modelId": public_id,
            "sha": commit,
            "private": False,
            "gated": self.repos[repo_id].token is not None,
            "siblings": [{"rfilename": name} for name in sorted(files)],
        }
        _reply(request, 200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body=body)


def _reply(
    request: BaseHTTPRequestHandler, status: int, data: bytes, headers: dict[str, str] | None = None, *, body: bool
) -> None:
    request.send_response(status)
    for name, value in (headers or {}).items():
        request.send_header(name, value)
    request.send_header("Content-Length", str(len(data)))
    request.end_headers()
    if body:
        request.wfile.write(data)
