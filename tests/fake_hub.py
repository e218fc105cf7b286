"""An in-memory fake of the Hugging Face Hub HTTP API, for tests that must never touch the network.

It implements the subset of the Hub's REST API that ``huggingface_hub`` (2.x) calls for
``create_repo``, ``create_branch``, ``repo_info``, ``upload_folder`` / ``create_commit`` and
``datasets``' ``DatasetDict.push_to_hub``:

    GET  /api/whoami-v2
    POST /api/repos/create                                    JSON {name, organization, type, visibility}
    POST /api/validate-yaml                                   README.md metadata check (legacy commit path)
    GET  /api/{type}s/{ns}/{name}[/revision/{rev}]            repo info (id, sha, private, siblings)
    GET  /api/{type}s/{ns}/{name}/refs                        branches
    POST /api/{type}s/{ns}/{name}/branch/{branch}             create a branch (409 if it exists)
    POST /api/{type}s/{ns}/{name}/preupload/{rev}             upload mode per file ("regular" unless LFS)
    POST /api/{type}s/{ns}/{name}/commit/{rev}                NDJSON: header, file (base64), lfsFile, deleted*
    GET  /api/{type}s/{ns}/{name}/tree/{rev}[/{path}]         directory listing
    POST /api/{type}s/{ns}/{name}/paths-info/{rev}            form-encoded ``paths``
    GET|HEAD /{prefix}{ns}/{name}/resolve/{rev}/{path}        raw file download
    POST /{prefix}{ns}/{name}.git/info/lfs/objects/batch      git-LFS batch API ("basic" transfer)
    PUT  /lfs-upload/{sha256}                                 LFS object upload target

Every file is answered ``uploadMode: "regular"`` at preupload (its bytes then travel base64-encoded
inside the commit), so neither LFS nor Xet storage is needed. Paths matching ``lfs_patterns`` are
answered ``"lfs"`` instead; that takes the client's legacy LFS path, which only works with Xet
disabled (see :func:`use_lfs`), because this fake has no Xet storage.

What arrived is readable back: :meth:`FakeHub.files` (per repo and revision), :meth:`FakeHub.commits`,
:attr:`FakeHub.requests` (each with the ``Authorization`` header it carried). :meth:`FakeHub.fail_next`
makes the next N requests of one kind answer an HTTP error; :meth:`FakeHub.pause` holds every request
until :meth:`FakeHub.resume` (a hung Hub); :func:`closed_port_url` gives an endpoint that refuses
connections (a Hub that is down).
"""

from __future__ import annotations

import base64
import contextlib
import fnmatch
import hashlib
import itertools
import json
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

FAKE_USER = "fake-user"
REPO_TYPES = ("model", "dataset", "space")
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_LFS_POINTER_SIZE = 134  # what the Hub reports for a git-LFS pointer file; any int works

_API_REPO = re.compile(r"^/api/(?P<type>models|datasets|spaces)/(?P<repo>[^/]+/[^/]+)(?P<rest>/.*)?$")
_RESOLVE = re.compile(
    r"^/(?P<prefix>datasets/|spaces/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"
)
_LFS_BATCH = re.compile(r"^/(?P<prefix>datasets/|spaces/)?(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch$")
_LFS_UPLOAD = re.compile(r"^/lfs-upload/(?P<oid>[0-9a-f]{64})$")


def git_blob_oid(data: bytes) -> str:
    """The git object id of a regular file (``git hash-object``), as the Hub reports it."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class FakeCommit:
    """One commit: the full file snapshot after it (path → bytes) and which paths are LFS objects."""

    oid: str
    message: str
    description: str
    parent: str | None
    files: dict[str, bytes]
    lfs_paths: frozenset[str] = frozenset()


@dataclass
class FakeRepo:
    repo_type: str
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)  # branch name → commit oid
    commits: dict[str, FakeCommit] = field(default_factory=dict)

    def resolve(self, revision: str) -> FakeCommit | None:
        oid = self.branches.get(revision, revision)
        return self.commits.get(oid)

    def history(self, revision: str) -> list[FakeCommit]:
        """Commits reachable from ``revision``, oldest first."""
        out: list[FakeCommit] = []
        commit = self.resolve(revision)
        while commit is not None:
            out.append(commit)
            commit = self.commits.get(commit.parent) if commit.parent else None
        return out[::-1]


@dataclass
class RecordedRequest:
    method: str
    path: str
    kind: str
    status: int
    authorization: str | None
    query: dict[str, list[str]]


class _HttpError(Exception):
    def __init__(self, status: int, message: str, error_code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.error_code = status, message, error_code


class FakeHub:
    """A threaded HTTP server on 127.0.0.1 (free port) that behaves like the Hub for uploads.

    ``url`` is the endpoint to give to ``HfApi(endpoint=...)`` / ``HF_ENDPOINT``.
    """

    def __init__(self, *, lfs_patterns: tuple[str, ...] = (), echo_authorization_in_errors: bool = False):
        self.lfs_patterns = lfs_patterns
        # Injected errors quote the Authorization header back, as a careless proxy might: lets tests check
        # that client-side error handling scrubs the token from what it logs.
        self.echo_authorization_in_errors = echo_authorization_in_errors
        self.repos: dict[tuple[str, str], FakeRepo] = {}
        self.requests: list[RecordedRequest] = []
        self.lfs_objects: dict[str, bytes] = {}
        self._failures: dict[str, list[int]] = {}
        self._open = threading.Event()  # cleared by pause(): requests wait before being answered
        self._open.set()
        self._blocked = threading.Event()  # set once a request waits on a pause
        self._lock = threading.RLock()
        self._counter = itertools.count()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-hub", daemon=True
        )
        self._thread.start()

    # ---------------------------------------------------------------- test controls and read-back

    def close(self) -> None:
        """Stop serving; later connections to ``url`` are refused."""
        self.resume()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def fail_next(self, kind: str, times: int = 1, status: int = 500) -> None:
        """Answer the next ``times`` requests of ``kind`` (see :data:`KINDS`) with HTTP ``status``."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
        with self._lock:
            self._failures.setdefault(kind, []).extend([status] * times)

    def pause(self) -> None:
        """Hold every request from now on until :meth:`resume` (a Hub that is slow to answer)."""
        self._blocked.clear()
        self._open.clear()

    def resume(self) -> None:
        self._open.set()

    def wait_until_blocked(self, timeout: float = 10.0) -> bool:
        """True once a request is held by :meth:`pause` (so the client is inside an upload)."""
        return self._blocked.wait(timeout)

    def repo(self, repo_id: str, repo_type: str = "model") -> FakeRepo:
        with self._lock:
            try:
                return self.repos[(repo_type, repo_id)]
            except KeyError:
                raise KeyError(f"no {repo_type} repo {repo_id!r}; have {sorted(self.repos)}") from None

    def files(self, repo_id: str, *, repo_type: str = "model", revision: str = "main") -> dict[str, bytes]:
        """The files at ``revision`` (branch or commit oid): path → content."""
        with self._lock:
            commit = self.repo(repo_id, repo_type).resolve(revision)
            if commit is None:
                raise KeyError(f"revision {revision!r} not found in {repo_type} {repo_id!r}")
            return dict(commit.files)

    def commits(self, repo_id: str, *, repo_type: str = "model", revision: str = "main") -> list[FakeCommit]:
        """Commits on ``revision``, oldest first (the first one is the repo's empty initial commit)."""
        with self._lock:
            return self.repo(repo_id, repo_type).history(revision)

    def requests_of(self, kind: str) -> list[RecordedRequest]:
        with self._lock:
            return [r for r in self.requests if r.kind == kind]

    @property
    def authorizations(self) -> set[str | None]:
        """Every distinct Authorization header value received (None for requests without one)."""
        with self._lock:
            return {r.authorization for r in self.requests}

    # ---------------------------------------------------------------- state changes (under the lock)

    def _new_oid(self) -> str:
        return hashlib.sha1(f"fake-commit-{next(self._counter)}".encode()).hexdigest()

    def _create_repo(self, repo_type: str, repo_id: str, private: bool) -> tuple[FakeRepo, bool]:
        key = (repo_type, repo_id)
        if key in self.repos:
            return self.repos[key], False
        repo = FakeRepo(repo_type=repo_type, repo_id=repo_id, private=private)
        initial = FakeCommit(self._new_oid(), "initial commit", "", None, {})
        repo.commits[initial.oid] = initial
        repo.branches["main"] = initial.oid
        self.repos[key] = repo
        return repo, True

    def _get_repo(self, repo_type: str, repo_id: str) -> FakeRepo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            raise _HttpError(404, f"Repository not found: {repo_type} {repo_id}", "RepoNotFound")
        return repo

    def _get_commit(self, repo: FakeRepo, revision: str) -> FakeCommit:
        commit = repo.resolve(revision)
        if commit is None:
            raise _HttpError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def _is_lfs(self, path: str, size: int) -> bool:
        return size > 0 and any(fnmatch.fnmatch(path, pattern) for pattern in self.lfs_patterns)


KINDS = frozenset(
    {
        "agent_harnesses",
        "whoami",
        "create_repo",
        "validate_yaml",
        "repo_info",
        "refs",
        "create_branch",
        "preupload",
        "commit",
        "tree",
        "paths_info",
        "resolve",
        "lfs_batch",
        "lfs_upload",
        "unknown",
    }
)


def _entry(commit: FakeCommit, path: str) -> dict:
    data = commit.files[path]
    entry: dict = {"type": "file", "path": path, "size": len(data), "oid": git_blob_oid(data)}
    if path in commit.lfs_paths:
        sha = hashlib.sha256(data).hexdigest()
        entry["lfs"] = {"oid": sha, "size": len(data), "pointerSize": _LFS_POINTER_SIZE}
    return entry


def _folder_entry(path: str) -> dict:
    return {"type": "directory", "path": path, "size": 0, "oid": hashlib.sha1(path.encode()).hexdigest()}


def _folders(commit: FakeCommit) -> set[str]:
    out = set()
    for path in commit.files:
        parts = path.split("/")[:-1]
        out.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    return out


def _make_handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects; every answer sets Content-Length

        def log_message(self, format, *args):  # quiet: tests read `hub.requests` instead
            pass

        def do_GET(self):
            self._dispatch()

        def do_HEAD(self):
            self._dispatch()

        def do_POST(self):
            self._dispatch()

        def do_PUT(self):
            self._dispatch()

        # ------------------------------------------------------------ plumbing

        def _body(self) -> bytes:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass  # trailers
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _send(self, status: int, payload: object = None, headers: dict | None = None) -> None:
            if isinstance(payload, bytes):
                body, content_type = payload, "application/octet-stream"
            else:
                body, content_type = json.dumps(payload).encode(), "application/json"
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _dispatch(self) -> None:
            split = urlsplit(self.path)
            query = parse_qs(split.query)
            body = self._body()
            if not hub._open.is_set():
                hub._blocked.set()
                hub._open.wait()
            kind, handler, args = self._route(split.path)
            authorization = self.headers.get("Authorization")
            with hub._lock:
                pending = hub._failures.get(kind)
                injected = pending.pop(0) if pending else None
            if injected is not None:
                message = f"Injected failure for {kind}"
                if hub.echo_authorization_in_errors:
                    message += f" (request carried Authorization: {authorization})"
                status, payload, headers = injected, {"error": message}, {}
            else:
                try:
                    with hub._lock:
                        status, payload, headers = handler(*args, body=body, query=query)
                except _HttpError as err:
                    headers = {"X-Error-Message": err.message}
                    if err.error_code:
                        headers["X-Error-Code"] = err.error_code
                    status, payload = err.status, {"error": err.message}
            with hub._lock:
                hub.requests.append(
                    RecordedRequest(self.command, split.path, kind, status, authorization, query)
                )
            self._send(status, payload, headers)

        def _route(self, path: str):
            method = self.command
            if path == "/api/whoami-v2" and method == "GET":
                return "whoami", self._whoami, ()
            if path == "/api/repos/create" and method == "POST":
                return "create_repo", self._create_repo, ()
            # huggingface_hub's agent-detection registry: a 404 keeps it from writing a cache file.
            if path == "/api/agent-harnesses":
                return "agent_harnesses", self._unknown, ()
            if path == "/api/validate-yaml" and method == "POST":
                return "validate_yaml", self._validate_yaml, ()
            if (m := _LFS_UPLOAD.match(path)) and method == "PUT":
                return "lfs_upload", self._lfs_upload, (m["oid"],)
            if (m := _LFS_BATCH.match(path)) and method == "POST":
                return "lfs_batch", self._lfs_batch, (_type_of_prefix(m["prefix"]), m["repo"])
            if (m := _RESOLVE.match(path)) and method in ("GET", "HEAD"):
                args = (_type_of_prefix(m["prefix"]), m["repo"], unquote(m["rev"]), unquote(m["path"]))
                return "resolve", self._resolve, args
            if m := _API_REPO.match(path):
                repo_type, repo_id, rest = m["type"][:-1], m["repo"], m["rest"] or ""
                routes = [
                    ("GET", r"", "repo_info", self._repo_info),
                    ("GET", r"/revision/(?P<rev>[^/]+)", "repo_info", self._repo_info),
                    ("GET", r"/refs", "refs", self._refs),
                    ("POST", r"/branch/(?P<rev>[^/]+)", "create_branch", self._create_branch),
                    ("POST", r"/preupload/(?P<rev>[^/]+)", "preupload", self._preupload),
                    ("POST", r"/commit/(?P<rev>[^/]+)", "commit", self._commit),
                    ("GET", r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", "tree", self._tree),
                    ("POST", r"/paths-info/(?P<rev>[^/]+)", "paths_info", self._paths_info),
                ]
                for route_method, pattern, kind, handler in routes:
                    if method == route_method and (sub := re.fullmatch(pattern, rest)):
                        groups = {k: unquote(v or "") for k, v in sub.groupdict().items()}
                        return kind, handler, (repo_type, repo_id, *groups.values())
            return "unknown", self._unknown, ()

        # ------------------------------------------------------------ endpoints
        # Each returns (status, payload, headers) and runs under hub._lock.

        def _unknown(self, *, body, query):
            raise _HttpError(404, f"fake hub does not implement {self.command} {self.path}")

        def _whoami(self, *, body, query):
            if not self.headers.get("Authorization"):
                raise _HttpError(401, "Invalid credentials in Authorization header")
            return 200, {"type": "user", "name": FAKE_USER, "fullname": "Fake User", "orgs": []}, {}

        def _validate_yaml(self, *, body, query):
            import yaml

            content = json.loads(body)["content"]
            match = re.match(r"^\s*---\r?\n([\s\S]*?)\r?\n---[ \t]*(\r?\n|$)", content)
            try:
                data = yaml.safe_load(match.group(1)) if match else {}
            except yaml.YAMLError as err:
                return 400, {"errors": [{"message": f"invalid YAML: {err}"}], "warnings": []}, {}
            if data is not None and not isinstance(data, dict):
                return 400, {"errors": [{"message": "metadata must be a mapping"}], "warnings": []}, {}
            return 200, {"errors": [], "warnings": []}, {}

        def _create_repo(self, *, body, query):
            payload = json.loads(body)
            repo_type = payload.get("type") or "model"
            if repo_type not in REPO_TYPES:
                raise _HttpError(400, f"invalid repo type {repo_type!r}")
            repo_id = f"{payload.get('organization') or FAKE_USER}/{payload['name']}"
            private = payload.get("visibility") == "private" or payload.get("private") is True
            _repo, created = hub._create_repo(repo_type, repo_id, private)
            url = f"{hub.url}/{_URL_PREFIX[repo_type]}{repo_id}"
            if not created:
                return 409, {"error": "You already created this repo", "url": url}, {}
            return 200, {"url": url, "name": repo_id, "id": repo_id}, {}

        def _repo_info(self, repo_type, repo_id, rev="main", *, body, query):
            repo = hub._get_repo(repo_type, repo_id)
            commit = hub._get_commit(repo, rev)
            info = {
                "id": repo_id,
                "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
                "author": repo_id.split("/")[0],
                "sha": commit.oid,
                "private": repo.private,
                "disabled": False,
                "gated": False,
                "siblings": [{"rfilename": p} for p in sorted(commit.files)],
                "tags": [],
            }
            return 200, info, {}

        def _refs(self, repo_type, repo_id, *, body, query):
            repo = hub._get_repo(repo_type, repo_id)
            branches = [
                {"name": name, "ref": f"refs/heads/{name}", "targetCommit": oid}
                for name, oid in sorted(repo.branches.items())
            ]
            return 200, {"branches": branches, "tags": [], "converts": []}, {}

        def _create_branch(self, repo_type, repo_id, branch, *, body, query):
            repo = hub._get_repo(repo_type, repo_id)
            if branch in repo.branches:
                raise _HttpError(409, f"Reference already exists: refs/heads/{branch}")
            start = (json.loads(body) if body else {}).get("startingPoint") or "main"
            repo.branches[branch] = hub._get_commit(repo, start).oid
            return 200, {}, {}

        def _preupload(self, repo_type, repo_id, rev, *, body, query):
            repo = hub._get_repo(repo_type, repo_id)
            commit = hub._get_commit(repo, rev)
            answers = []
            for file in json.loads(body)["files"]:
                path, size = file["path"], file["size"]
                lfs = hub._is_lfs(path, size)
                oid = None
                if path in commit.files:
                    data = commit.files[path]
                    oid = hashlib.sha256(data).hexdigest() if lfs else git_blob_oid(data)
                answers.append(
                    {
                        "path": path,
                        "uploadMode": "lfs" if lfs else "regular",
                        "shouldIgnore": False,
                        "oid": oid,
                    }
                )
            return 200, {"files": answers, "commitOid": commit.oid}, {}

        def _commit(self, repo_type, repo_id, rev, *, body, query):
            repo = hub._get_repo(repo_type, repo_id)
            if query.get("create_pr"):
                raise _HttpError(400, "the fake hub does not support pull requests")
            if rev not in repo.branches:
                raise _HttpError(404, f"Invalid rev id: {rev} (commits go to a branch)", "RevisionNotFound")
            head = repo.commits[repo.branches[rev]]
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            if not lines or lines[0].get("key") != "header":
                raise _HttpError(400, "commit payload must start with a header line")
            header = lines[0]["value"]
            parent = header.get("parentCommit")
            if parent is not None and parent != head.oid:
                raise _HttpError(412, f"parentCommit {parent} is not the head of {rev} ({head.oid})")
            files, lfs_paths = dict(head.files), set(head.lfs_paths)
            for line in lines[1:]:
                key, value = line["key"], line["value"]
                path = value["path"]
                if key == "file":
                    if value.get("encoding") != "base64":
                        raise _HttpError(400, f"unsupported encoding {value.get('encoding')!r} for {path}")
                    files[path] = base64.b64decode(value["content"])
                    lfs_paths.discard(path)
                elif key == "lfsFile":
                    if value["oid"] not in hub.lfs_objects:
                        raise _HttpError(422, f"LFS object {value['oid']} for {path} was never uploaded")
                    files[path] = hub.lfs_objects[value["oid"]]
                    lfs_paths.add(path)
                elif key == "deletedFile":
                    if path not in files:
                        raise _HttpError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                    del files[path]
                    lfs_paths.discard(path)
                elif key == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    for p in [p for p in files if p.startswith(prefix)]:
                        del files[p]
                        lfs_paths.discard(p)
                else:
                    raise _HttpError(400, f"unknown commit operation {key!r}")
            commit = FakeCommit(
                oid=hub._new_oid(),
                message=header.get("summary", ""),
                description=header.get("description", ""),
                parent=head.oid,
                files=files,
                lfs_paths=frozenset(lfs_paths),
            )
            repo.commits[commit.oid] = commit
            repo.branches[rev] = commit.oid
            url = f"{hub.url}/{_URL_PREFIX[repo_type]}{repo_id}/commit/{commit.oid}"
            return 200, {"success": True, "commitOid": commit.oid, "commitUrl": url, "hookOutput": ""}, {}

        def _tree(self, repo_type, repo_id, rev, path="", *, body, query):
            commit = hub._get_commit(hub._get_repo(repo_type, repo_id), rev)
            recursive = query.get("recursive", ["False"])[0].lower() == "true"
            path = path.strip("/")
            folders = _folders(commit)
            if path and path not in folders:
                kind = "a file" if path in commit.files else "no such path"
                raise _HttpError(404, f"{path} is {kind}, not a directory", "EntryNotFound")
            prefix = f"{path}/" if path else ""

            def wanted(p: str) -> bool:
                return p.startswith(prefix) and (recursive or "/" not in p[len(prefix) :])

            entries = [_folder_entry(d) for d in sorted(folders) if wanted(d)]
            entries += [_entry(commit, p) for p in sorted(commit.files) if wanted(p)]
            return 200, entries, {}

        def _paths_info(self, repo_type, repo_id, rev, *, body, query):
            commit = hub._get_commit(hub._get_repo(repo_type, repo_id), rev)
            form = parse_qs(body.decode())
            folders = _folders(commit)
            out = []
            for path in form.get("paths", []):
                path = path.strip("/")
                if path in commit.files:
                    out.append(_entry(commit, path))
                elif path in folders:
                    out.append(_folder_entry(path))
            return 200, out, {}

        def _resolve(self, repo_type, repo_id, rev, path, *, body, query):
            commit = hub._get_commit(hub._get_repo(repo_type, repo_id), rev)
            if path not in commit.files:
                raise _HttpError(404, f"Entry not found: {path}", "EntryNotFound")
            data = commit.files[path]
            etag = hashlib.sha256(data).hexdigest() if path in commit.lfs_paths else git_blob_oid(data)
            headers = {"ETag": f'"{etag}"', "X-Repo-Commit": commit.oid, "Accept-Ranges": "bytes"}
            if path in commit.lfs_paths:
                headers["X-Linked-Etag"] = f'"{etag}"'
                headers["X-Linked-Size"] = str(len(data))
            if m := re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", "")):
                start = int(m[1])
                end = min(int(m[2]) if m[2] else len(data) - 1, len(data) - 1)
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                return 206, data[start : end + 1], headers
            return 200, data, headers

        def _lfs_batch(self, repo_type, repo_id, *, body, query):
            hub._get_repo(repo_type, repo_id)
            payload = json.loads(body)
            objects = []
            for obj in payload["objects"]:
                answer = {"oid": obj["oid"], "size": obj["size"]}
                if obj["oid"] not in hub.lfs_objects:
                    answer["actions"] = {
                        "upload": {"href": f"{hub.url}/lfs-upload/{obj['oid']}", "header": {}}
                    }
                objects.append(answer)
            return 200, {"transfer": "basic", "objects": objects}, {}

        def _lfs_upload(self, oid, *, body, query):
            if hashlib.sha256(body).hexdigest() != oid:
                raise _HttpError(400, f"content does not match sha256 {oid}")
            hub.lfs_objects[oid] = body
            return 200, {}, {}

    return Handler


def _type_of_prefix(prefix: str | None) -> str:
    return {None: "model", "": "model", "datasets/": "dataset", "spaces/": "space"}[prefix]


def closed_port_url() -> str:
    """An http://127.0.0.1 endpoint where nothing listens: connecting is refused at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


FAKE_TOKEN = "hf_FakeTokenForTests0123456789abcdefXYZ"


def point_clients_at(monkeypatch: pytest.MonkeyPatch, endpoint: str, token: str = FAKE_TOKEN) -> None:
    """Make every Hub client in this process use ``endpoint`` and ``token`` for the current test.

    ``huggingface_hub`` and ``datasets`` read HF_ENDPOINT into module constants at import time, so the
    environment variable alone is not enough once they are imported: patch their constants too. Offline
    mode is switched off for the test, since every request goes to ``endpoint``.
    """
    from huggingface_hub import constants, hf_api

    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    )
    # Module-level helpers (huggingface_hub.upload_file, RepoCard.push_to_hub, ...) share one HfApi whose
    # endpoint was bound at import.
    monkeypatch.setattr(hf_api.api, "endpoint", endpoint)
    with contextlib.suppress(ImportError):
        from datasets import config as datasets_config

        monkeypatch.setattr(datasets_config, "HF_ENDPOINT", endpoint)
        monkeypatch.setattr(datasets_config, "HF_HUB_OFFLINE", False, raising=False)
        monkeypatch.setattr(
            datasets_config, "HUB_DATASETS_URL", endpoint + "/datasets/{repo_id}/resolve/{revision}/{path}"
        )


def use_lfs(monkeypatch: pytest.MonkeyPatch, hub: FakeHub, patterns: tuple[str, ...]) -> None:
    """Answer ``"lfs"`` at preupload for ``patterns`` and make the client use the legacy LFS protocol.

    Needed where the client deletes a file between preupload and commit (``datasets`` does so with
    its temporary Parquet shards), which only works when the bytes travel before the commit.
    """
    from huggingface_hub import constants

    hub.lfs_patterns = patterns
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """A running :class:`FakeHub`; HF_ENDPOINT and HF_TOKEN (:data:`FAKE_TOKEN`) point at it for the test."""
    hub = FakeHub()
    point_clients_at(monkeypatch, hub.url)
    try:
        yield hub
    finally:
        hub.close()
