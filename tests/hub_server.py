"""A stand-in for the Hugging Face Hub and ModelScope, serving repositories from local folders (tests only).

It runs in a background thread of the test process and speaks just enough of both hubs' HTTP APIs for the real
client libraries (huggingface_hub, transformers, datasets, modelscope) to download from it::

    hub = StandInHub(models={"org/tiny": model_dir}, datasets={"org/tiny-data": data_dir}, token=None)
    with hub:  # or hub.start() ... hub.stop()
        env = {**os.environ, **hub.client_env()}  # HF_ENDPOINT / MODELSCOPE_ENDPOINT = hub.url
        subprocess.run([sys.executable, "-c", "..."], env=env)  # huggingface_hub reads HF_ENDPOINT at import,
        # so clients run in a subprocess; give it its own HF_HOME / MODELSCOPE_CACHE and no HF_HUB_OFFLINE
    hub.requests                               # every request: Request(method, path, status, authorization)
    hub.file_downloads("org/tiny", "config.json")  # how often the file's content was served (GET)

Repo ids must be "namespace/name". Each repository is a snapshot of its folder taken at construction, with one commit
(`hub.commit(repo_id)`, 40 hex derived from the content); the revisions "main", "master" (ModelScope's default
branch) and that commit are served, any other revision is "not found". Files are served as plain HTTP: no LFS, no
xet (a file's ETag is its git blob id), HTTP Range is honoured. With `token` set, every request lacking
`Authorization: Bearer <token>` is answered 401.

Hugging Face endpoints: GET /api/{models,datasets}/{id}[/revision/{rev}] (info with sha and siblings),
GET /api/{models,datasets}/{id}/tree/{rev}[/{path}] (?recursive=), POST /api/{models,datasets}/{id}/paths-info/{rev},
GET /api/{models,datasets}/{id}/refs, HEAD/GET /{id}/resolve/{rev}/{path} and /datasets/{id}/resolve/{rev}/{path},
GET /api/agent-harnesses (an empty registry, fetched by huggingface_hub once a day per HF_HOME).
ModelScope endpoints (prefix /api/v1/{models,datasets}/{id}): GET "" (info), /revisions, /repo/files (?Root=,
Recursive=), /repo/tree (datasets, paginated: PageNumber, PageSize) and HEAD/GET /repo?FilePath=&Revision= (content).
Everything else is answered 404 (and recorded, so a test can see what a client asked for).
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

BRANCHES = ("main", "master")
_DATE = "2024-01-01T00:00:00.000Z"


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # as sent, query string included
    status: int
    authorization: str | None


@dataclass(frozen=True)
class _File:
    local: Path
    size: int
    oid: str  # git blob sha1, also the ETag
    sha256: str


def _git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _Repo:
    def __init__(self, kind: str, repo_id: str, folder: Path):
        if repo_id.count("/") != 1:
            raise ValueError(f"repo id must be 'namespace/name': {repo_id!r}")
        self.kind, self.repo_id = kind, repo_id
        self.files: dict[str, _File] = {}
        for p in sorted(Path(folder).rglob("*")):
            rel = p.relative_to(folder).as_posix()
            if p.is_file() and ".git" not in rel.split("/"):
                data = p.read_bytes()
                self.files[rel] = _File(p, len(data), _git_blob_oid(data), hashlib.sha256(data).hexdigest())
        if not self.files:
            raise ValueError(f"no files in {folder}")
        self.dirs = {"/".join(f.split("/")[:i]) for f in self.files for i in range(1, f.count("/") + 1)}
        listing = "".join(f"{path}\0{f.oid}\n" for path, f in self.files.items())
        self.commit = hashlib.sha1(f"{kind}/{repo_id}\n{listing}".encode()).hexdigest()

    def has_revision(self, revision: str) -> bool:
        return revision in BRANCHES or revision == self.commit

    def entry(self, path: str) -> dict | None:
        """The HF tree entry of a file or folder, None if the path does not exist."""
        if path in self.files:
            f = self.files[path]
            return {"type": "file", "oid": f.oid, "size": f.size, "path": path}
        if path in self.dirs:
            return {"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(), "size": 0, "path": path}
        return None

    def children(self, folder: str, recursive: bool) -> list[str] | None:
        """Paths (files and folders) under `folder` ("" for the root); None if it is not a folder."""
        if folder and folder not in self.dirs:
            return None
        prefix = f"{folder}/" if folder else ""
        found = [p for p in sorted(self.dirs | set(self.files)) if p.startswith(prefix)]
        return found if recursive else [p for p in found if "/" not in p[len(prefix) :]]

    def info(self) -> dict:
        siblings = [{"rfilename": p, "size": f.size, "blobId": f.oid} for p, f in self.files.items()]
        return {
            "id": self.repo_id,
            "_id": self.commit[:24],
            "author": self.repo_id.split("/")[0],
            "sha": self.commit,
            "private": False,
            "gated": False,
            "disabled": False,
            "lastModified": _DATE,
            "createdAt": _DATE,
            "tags": [],
            "siblings": siblings,
        }

    def ms_entry(self, path: str) -> dict:
        """The ModelScope file-list entry of a file or folder."""
        name = path.rsplit("/", 1)[-1]
        if path in self.dirs:
            return {"Name": name, "Path": path, "Type": "tree", "Size": 0, "Sha256": "", "IsLFS": False}
        f = self.files[path]
        return {
            "Name": name,
            "Path": path,
            "Type": "blob",
            "Size": f.size,
            "Sha256": f.sha256,
            "IsLFS": False,
            "Revision": self.commit,
            "CommitId": self.commit,
            "CommittedDate": 1704067200,
        }


class _HubError(Exception):
    def __init__(self, status: int, code: str, message: str, commit: str | None = None):
        super().__init__(message)
        self.status, self.code, self.commit = status, code, commit


class StandInHub:
    """Serves `models` and `datasets` ({repo_id: folder}) on 127.0.0.1 as the HF Hub and ModelScope do."""

    def __init__(
        self,
        models: dict[str, Path] | None = None,
        datasets: dict[str, Path] | None = None,
        token: str | None = None,
    ):
        self.token = token
        self._repos = {("model", rid): _Repo("model", rid, Path(p)) for rid, p in (models or {}).items()}
        self._repos |= {("dataset", rid): _Repo("dataset", rid, Path(p)) for rid, p in (datasets or {}).items()}
        self._lock = threading.Lock()
        self._requests: list[Request] = []
        self._served: dict[tuple[str, str, str], int] = {}
        self._sockets: set[socket.socket] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    # -- lifecycle
    def start(self) -> str:
        self._server = _Server(("127.0.0.1", 0), type("Handler", (_Handler,), {"hub": self}))
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="stand-in-hub", daemon=True
        )
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        return self.url

    def stop(self) -> None:
        """Stop serving: the port is closed (connections are refused) and open keep-alive connections are cut."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            for sock in self._sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> StandInHub:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- for tests
    def client_env(self) -> dict[str, str]:
        """Environment variables pointing a client process at this hub (HF and ModelScope)."""
        return {"HF_ENDPOINT": self.url, "MODELSCOPE_ENDPOINT": self.url}

    def commit(self, repo_id: str, repo_type: str = "model") -> str:
        return self._repos[(repo_type, repo_id)].commit

    @property
    def requests(self) -> list[Request]:
        with self._lock:
            return list(self._requests)

    def file_downloads(self, repo_id: str, filename: str, repo_type: str | None = None) -> int:
        """How many times the content of `filename` was served (GET, either hub), any repo type unless given."""
        with self._lock:
            return sum(
                n
                for (kind, rid, path), n in self._served.items()
                if (rid, path) == (repo_id, filename) and repo_type in (None, kind)
            )

    def clear(self) -> None:
        """Forget the recorded requests and download counts."""
        with self._lock:
            self._requests.clear()
            self._served.clear()

    # -- internals used by the handler
    def _repo(self, kind: str, repo_id: str, revision: str | None = None) -> _Repo:
        repo = self._repos.get((kind, repo_id))
        if repo is None:
            raise _HubError(404, "RepoNotFound", f"Repository not found: {repo_id}")
        if revision is not None and not repo.has_revision(revision):
            raise _HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return repo

    def _record(self, request: Request, served: tuple[str, str, str] | None) -> None:
        with self._lock:
            self._requests.append(request)
            if served is not None:
                self._served[served] = self._served.get(served, 0) + 1


_KINDS = {"models": "model", "datasets": "dataset"}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64  # snapshot downloads open up to 8 connections at once


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 60
    hub: StandInHub

    def log_message(self, format, *args):  # noqa: A002 - keep the test output quiet
        pass

    def setup(self):
        super().setup()
        with self.hub._lock:
            self.hub._sockets.add(self.connection)

    def finish(self):
        with self.hub._lock:
            self.hub._sockets.discard(self.connection)
        super().finish()

    def do_GET(self):
        self._handle()

    def do_HEAD(self):
        self._handle()

    def do_POST(self):
        self._handle()

    # -- dispatch
    def _handle(self):
        self._served = None  # (kind, repo_id, path) when the response carries a file's content
        self._ms = self.path.startswith("/api/v1/")
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) if self.command == "POST" else b""
        try:
            if self.hub.token is not None and self.headers.get("Authorization") != f"Bearer {self.hub.token}":
                raise _HubError(401, "RepoNotFound", "Authorization: Bearer <token> required")  # as for a private repo
            url = urlsplit(self.path)
            parts = [unquote(s) for s in url.path.strip("/").split("/")]
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            if self._ms:
                self._modelscope(parts[2:], query)
            elif parts == ["api", "agent-harnesses"]:  # huggingface_hub's agent detection registry: none known
                self._json({"standardEnvVars": [], "harnesses": {}})
            elif parts[0] == "api" and len(parts) >= 4 and parts[1] in _KINDS:
                self._hf_api(_KINDS[parts[1]], "/".join(parts[2:4]), parts[4:], query, body)
            elif len(parts) >= 5 and parts[0] == "datasets" and parts[3] == "resolve":
                self._hf_resolve("dataset", "/".join(parts[1:3]), parts[4], "/".join(parts[5:]))
            elif len(parts) >= 4 and parts[2] == "resolve":
                self._hf_resolve("model", "/".join(parts[:2]), parts[3], "/".join(parts[4:]))
            else:
                raise _HubError(404, "NotFound", f"no such endpoint: {url.path}")
        except _HubError as err:
            self._error(err)
        except (BrokenPipeError, ConnectionResetError):  # the client hung up mid-answer
            self.close_connection = True
        except Exception as err:  # noqa: BLE001 - a bug here must show as a 500, not a hung client
            self._error(_HubError(500, "InternalError", f"{type(err).__name__}: {err}"))

    def _error(self, err: _HubError) -> int:
        headers = {"X-Error-Code": err.code, "X-Error-Message": str(err).encode("ascii", "replace").decode()}
        if err.commit:
            headers["X-Repo-Commit"] = err.commit
        if self._ms:
            payload = {"Code": err.status, "Message": str(err), "Success": False, "RequestId": "stand-in"}
        else:
            payload = {"error": str(err)}
        return self._json(payload, err.status, headers)

    # -- responses
    def _send(self, status: int, headers: dict[str, str], body: bytes = b"") -> int:
        # recorded before answering, so a client that got its answer finds its request in `hub.requests`
        request = Request(self.command, self.path, status, self.headers.get("Authorization"))
        self.hub._record(request, self._served)
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        if "Content-Length" not in headers:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        return status

    def _json(self, payload, status: int = 200, headers: dict[str, str] | None = None) -> int:
        data = json.dumps(payload).encode()
        return self._send(status, {"Content-Type": "application/json", **(headers or {})}, data)

    def _file(self, repo: _Repo, path: str, headers: dict[str, str]) -> int:
        f = repo.files[path]
        start, end, status = 0, f.size - 1, 200
        wanted = self.headers.get("Range", "")
        if wanted.startswith("bytes=") and "," not in wanted:
            first, _, last = wanted[6:].partition("-")
            start, end = int(first or 0), min(int(last), f.size - 1) if last else f.size - 1
            if start >= f.size:
                return self._send(416, {**headers, "Content-Range": f"bytes */{f.size}"})
            status = 206
            headers = {**headers, "Content-Range": f"bytes {start}-{end}/{f.size}"}
        headers = {
            **headers,
            "Content-Type": "application/octet-stream",
            "Content-Length": str(end - start + 1),
            "Accept-Ranges": "bytes",
            "ETag": f'"{f.oid}"',
        }
        with open(f.local, "rb") as fh:
            fh.seek(start)
            data = fh.read(end - start + 1)
        if self.command == "GET":
            self._served = (repo.kind, repo.repo_id, path)
        return self._send(status, headers, data)

    # -- Hugging Face
    def _hf_api(self, kind: str, repo_id: str, rest: list[str], query: dict, body: bytes) -> int:
        action = rest[0] if rest else "revision"
        revision = rest[1] if len(rest) > 1 else BRANCHES[0]
        repo = self.hub._repo(kind, repo_id, None if action == "refs" else revision)
        if action == "revision":
            return self._json(repo.info())
        if action == "refs":
            main = {"name": "main", "ref": "refs/heads/main", "targetCommit": repo.commit}
            return self._json({"branches": [main], "converts": [], "tags": []})
        if action == "tree":
            folder = "/".join(rest[2:]).strip("/")
            paths = repo.children(folder, query.get("recursive", "false").lower() == "true")
            if paths is None:
                raise _HubError(404, "EntryNotFound", f"{folder} does not exist on {revision}", repo.commit)
            return self._json([repo.entry(p) for p in paths])
        if action == "paths-info" and self.command == "POST":
            if self.headers.get("Content-Type", "").startswith("application/json"):
                paths = json.loads(body or b"{}").get("paths", [])
            else:
                paths = parse_qs(body.decode()).get("paths", [])
            entries = [repo.entry(p.strip("/")) for p in ([paths] if isinstance(paths, str) else paths)]
            return self._json([e for e in entries if e is not None])
        raise _HubError(404, "NotFound", f"no such endpoint: {action}")

    def _hf_resolve(self, kind: str, repo_id: str, revision: str, path: str) -> int:
        repo = self.hub._repo(kind, repo_id, revision)
        if path not in repo.files:
            raise _HubError(404, "EntryNotFound", f"{path} does not exist on {revision}", repo.commit)
        return self._file(repo, path, {"X-Repo-Commit": repo.commit})

    # -- ModelScope
    def _ms_ok(self, data) -> int:
        return self._json({"Code": 200, "Data": data, "Message": "success", "Success": True, "RequestId": "stand-in"})

    def _modelscope(self, parts: list[str], query: dict) -> int:
        if len(parts) < 3 or parts[0] not in _KINDS:
            raise _HubError(404, "NotFound", f"no such endpoint: {'/'.join(parts)}")
        repo, rest = self.hub._repo(_KINDS[parts[0]], "/".join(parts[1:3])), "/".join(parts[3:])
        if rest == "":
            namespace, name = repo.repo_id.split("/")
            return self._ms_ok({"Id": repo.commit[:8], "Name": name, "Path": namespace, "Revision": BRANCHES[1]})
        if rest == "revisions":
            branches = [{"Revision": b, "CreatedAt": 1704067200, "CommitId": repo.commit} for b in BRANCHES]
            return self._ms_ok({"RevisionMap": {"Branches": branches, "Tags": []}})
        revision = query.get("Revision") or BRANCHES[1]
        if not repo.has_revision(revision):
            raise _HubError(404, "RevisionNotFound", f"Invalid revision: {revision}")
        if rest in ("repo/files", "repo/tree"):
            root = query.get("Root", "").strip("/")
            paths = repo.children(root, query.get("Recursive", "false").lower() == "true")
            if paths is None:
                raise _HubError(404, "EntryNotFound", f"{root} does not exist")
            entries = [repo.ms_entry(p) for p in paths]
            if "PageSize" in query:
                size, page = int(query["PageSize"]), int(query.get("PageNumber", 1))
                entries = entries[(page - 1) * size : page * size]
            return self._ms_ok({"Files": entries})
        if rest == "repo":
            path = query.get("FilePath", "").strip("/")
            if path not in repo.files:
                raise _HubError(404, "EntryNotFound", f"{path} does not exist")
            return self._file(repo, path, {})
        raise _HubError(404, "NotFound", f"no such endpoint: {rest}")
