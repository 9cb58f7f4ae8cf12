"""A local TEST DOUBLE of the Hugging Face Hub HTTP API: just the endpoints huggingface_hub 0.36 calls for
`create_repo`, `create_branch`, `upload_folder` (validate-yaml, preupload, commit), `model_info` / `repo_info`
and `hf_hub_download` / `snapshot_download` (HEAD + GET resolve). It is not a hub: model repos only, no LFS
(preupload answers uploadMode "regular", so file contents arrive base64 in the commit's NDJSON), no users.

Files are stored on disk under ROOT (ORG/NAME/repo.json with branches and commits, blobs/ by sha256). Every
Authorization header seen is recorded (`HubServer.auth_seen`), so tests can check the client sent its token;
writes need a Bearer token (one of `tokens` when given), and so do reads of private repos.

    python -m tests.hub_server --port 8765 --root /tmp/hub          # then, in another shell:
    HF_ENDPOINT=http://127.0.0.1:8765 HF_TOKEN=hf_test mmpt push --export exports/demo --repo me/demo

    with HubServer(tmp_path / "hub") as hub:                        # in tests (a random free port)
        env = {"HF_ENDPOINT": hub.url, ...}
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import yaml


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.code = status, code


class Store:
    """Repos on disk: ROOT/ORG/NAME/repo.json ({private, refs: {branch: sha}, commits: {sha: {parent, files:
    {path: sha256}}}}) and ROOT/ORG/NAME/blobs/SHA256."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()

    def _meta_path(self, repo: str) -> Path:
        return self.root / repo / "repo.json"

    def meta(self, repo: str) -> dict:
        path = self._meta_path(repo)
        if not path.is_file():
            raise HubError(404, f"Repository {repo} not found", "RepoNotFound")
        return json.loads(path.read_text())

    def _save(self, repo: str, meta: dict) -> None:
        self._meta_path(repo).write_text(json.dumps(meta, indent=1))

    def create(self, repo: str, private: bool) -> bool:
        with self.lock:
            if self._meta_path(repo).is_file():
                return False
            (self.root / repo / "blobs").mkdir(parents=True)
            initial = hashlib.sha1(f"{repo} initial {time.time_ns()}".encode()).hexdigest()
            self._save(repo, {"private": private, "refs": {"main": initial},
                              "commits": {initial: {"parent": None, "files": {}, "summary": "initial commit"}}})
            return True

    def resolve(self, repo: str, revision: str) -> str:
        meta = self.meta(repo)
        sha = meta["refs"].get(revision, revision)
        if sha not in meta["commits"]:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return sha

    def tree(self, repo: str, revision: str) -> tuple[str, dict]:
        sha = self.resolve(repo, revision)
        return sha, self.meta(repo)["commits"][sha]["files"]

    def blob(self, repo: str, digest: str) -> bytes:
        return (self.root / repo / "blobs" / digest).read_bytes()

    def branch(self, repo: str, name: str, start: str) -> None:
        with self.lock:
            meta = self.meta(repo)
            if name in meta["refs"]:
                raise HubError(409, f"Reference {name} already exists")
            meta["refs"][name] = self.resolve(repo, start)
            self._save(repo, meta)

    def commit(self, repo: str, branch: str, added: dict, deleted: list, summary: str, parent: str | None) -> str:
        with self.lock:
            meta = self.meta(repo)
            if branch not in meta["refs"]:
                raise HubError(404, f"Invalid rev id: {branch} (create the branch first)", "RevisionNotFound")
            head = meta["refs"][branch]
            if parent is not None and parent != head:
                raise HubError(412, f"parent commit {parent} is not the head of {branch}")
            files = {p: d for p, d in meta["commits"][head]["files"].items()
                     if not any(p == x or p.startswith(x.rstrip("/") + "/") for x in deleted)}
            for path, data in added.items():
                digest = hashlib.sha256(data).hexdigest()
                (self.root / repo / "blobs" / digest).write_bytes(data)
                files[path] = digest
            sha = hashlib.sha1(json.dumps([head, files, summary, time.time_ns()]).encode()).hexdigest()
            meta["commits"][sha] = {"parent": head, "files": files, "summary": summary}
            meta["refs"][branch] = sha
            self._save(repo, meta)
            return sha


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the hub; every response carries Content-Length
    server: _Server

    # ---- plumbing -----------------------------------------------------------------------------------------
    def _dispatch(self, method: str) -> None:
        hub = self.server.hub
        hub.auth_seen.append(self.headers.get("Authorization", ""))
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        parts = [unquote(p) for p in urlsplit(self.path).path.strip("/").split("/")]
        try:
            route = ROUTES.get((method, *parts[:2])) or ROUTES.get((method, "*", "*", parts[2] if len(parts) > 2
                                                                   else ""))
            if route is None:
                raise HubError(404, f"{method} {self.path}: not served by this test double")
            route(self, parts, body)
        except HubError as e:
            headers = {"X-Error-Message": str(e), **({"X-Error-Code": e.code} if e.code else {})}
            self._json({"error": str(e)}, e.status, headers)

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self._dispatch("GET")

    def do_HEAD(self):  # noqa: N802
        self._dispatch("HEAD")

    def do_POST(self):  # noqa: N802
        self._dispatch("POST")

    def log_message(self, fmt, *args):  # request lines only (never headers): quiet in tests
        if self.server.hub.verbose:
            super().log_message(fmt, *args)

    def _send(self, status: int, data: bytes, headers: dict, content_type: str = "application/json") -> None:
        self.send_response(status)
        for key, value in {"Content-Type": content_type, "Content-Length": str(len(data)), **headers}.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _json(self, obj, status: int = 200, headers: dict | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers or {})

    def _token_ok(self) -> bool:
        auth = self.headers.get("Authorization", "")
        tokens = self.server.hub.tokens
        return auth.startswith("Bearer ") and (not tokens or auth[len("Bearer "):] in tokens)

    def _repo(self, org: str, name: str, write: bool) -> str:
        repo = f"{org}/{name}"
        meta = self.server.hub.store.meta(repo)
        if (write or meta["private"]) and not self._token_ok():
            raise HubError(401, "Invalid credentials in Authorization header")
        return repo

    # ---- API endpoints ------------------------------------------------------------------------------------
    def create_repo(self, parts, body):
        req = json.loads(body)
        if not self._token_ok():
            raise HubError(401, "Invalid credentials in Authorization header")
        if not req.get("organization") or req.get("type", "model") != "model":
            raise HubError(400, "this test double serves model repos named ORG/NAME only")
        repo = f"{req['organization']}/{req['name']}"
        created = self.server.hub.store.create(repo, bool(req.get("private")))
        url = f"{self.server.hub.url}/{repo}"
        self._json({"url": url, "name": repo}, 200 if created else 409)

    def validate_yaml(self, parts, body):
        text = json.loads(body)["content"]
        try:
            if text.startswith("---"):
                yaml.safe_load(text.split("---", 2)[1])
        except yaml.YAMLError as e:
            return self._json({"errors": [{"message": f"invalid YAML: {e}"}], "warnings": []}, 400)
        self._json({"errors": [], "warnings": []})

    def models(self, parts, body):
        """/api/models/ORG/NAME[/revision/REV | /preupload/REV | /commit/REV | /branch/NAME]"""
        if len(parts) < 4:
            raise HubError(404, "expected /api/models/ORG/NAME")
        org, name, action, rev = parts[2], parts[3], (parts[4:5] or ["revision"])[0], "/".join(parts[5:]) or "main"
        handler = {("GET", "revision"): self.info, ("POST", "preupload"): self.preupload,
                   ("POST", "commit"): self.commit, ("POST", "branch"): self.branch}.get((self.command, action))
        if handler is None:
            raise HubError(404, f"{self.command} {self.path}: not served by this test double")
        handler(self._repo(org, name, write=self.command == "POST"), rev, body)

    def info(self, repo, rev, body):
        sha, files = self.server.hub.store.tree(repo, rev)
        store = self.server.hub.store
        siblings = [{"rfilename": p, "size": len(store.blob(repo, d))} for p, d in sorted(files.items())]
        self._json({"id": repo, "modelId": repo, "sha": sha, "private": store.meta(repo)["private"],
                    "siblings": siblings, "lastModified": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
                    "tags": [], "downloads": 0, "likes": 0})

    def preupload(self, repo, rev, body):
        self.server.hub.store.resolve(repo, rev)
        files = json.loads(body)["files"]
        self._json({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})

    def commit(self, repo, rev, body):
        header, added, deleted = {}, {}, []
        for line in body.decode().splitlines():
            item = json.loads(line) if line.strip() else None
            if item is None:
                continue
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                added[value["path"]] = base64.b64decode(value["content"])
            elif key in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"])
            else:
                raise HubError(422, f"commit operation '{key}' is not implemented by this test double")
        sha = self.server.hub.store.commit(repo, rev, added, deleted, header.get("summary", ""),
                                          header.get("parentCommit"))
        self._json({"commitUrl": f"{self.server.hub.url}/{repo}/commit/{sha}", "commitOid": sha,
                    "pullRequestUrl": None})

    def branch(self, repo, name, body):
        start = (json.loads(body) if body else {}).get("startingPoint") or "main"
        self.server.hub.store.branch(repo, name, start)
        self._json({})

    def resolve(self, parts, body):
        """/ORG/NAME/resolve/REV/PATH: the headers hf_hub_download reads (ETag, X-Repo-Commit, Content-Length)."""
        repo = self._repo(parts[0], parts[1], write=False)
        store = self.server.hub.store
        sha, files = store.tree(repo, parts[3] if len(parts) > 3 else "main")
        path = "/".join(parts[4:])
        if path not in files:
            raise HubError(404, f"Entry {path} not found", "EntryNotFound")
        data = store.blob(repo, files[path])
        headers = {"ETag": f'"{files[path]}"', "X-Repo-Commit": sha, "Accept-Ranges": "bytes"}
        start, end, status = _byte_range(self.headers.get("Range"), len(data))
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        self._send(status, data[start:end], headers, "application/octet-stream")


def _byte_range(header: str | None, size: int) -> tuple[int, int, int]:
    """(start, end, status) for a "bytes=a-b" / "bytes=a-" Range header (resumed downloads)."""
    if not header or not header.startswith("bytes="):
        return 0, size, 200
    first, _, last = header[len("bytes="):].partition("-")
    start = int(first or 0)
    end = min(size, int(last) + 1) if last else size
    return start, end, 206


ROUTES = {("POST", "api", "repos"): Handler.create_repo, ("POST", "api", "validate-yaml"): Handler.validate_yaml,
          ("GET", "api", "models"): Handler.models, ("POST", "api", "models"): Handler.models,
          ("GET", "*", "*", "resolve"): Handler.resolve, ("HEAD", "*", "*", "resolve"): Handler.resolve}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    hub: HubServer


class HubServer:
    """The test double on 127.0.0.1 (port 0: a free one); a context manager serving from a thread."""

    def __init__(self, root: str | Path, port: int = 0, tokens: list | None = None, verbose: bool = False):
        self.store, self.tokens, self.verbose = Store(root), set(tokens or []), verbose
        self.auth_seen: list[str] = []
        self.httpd = _Server(("127.0.0.1", port), Handler)
        self.httpd.hub = self
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread: threading.Thread | None = None

    def files(self, repo: str, revision: str = "main") -> dict[str, bytes]:
        """Path -> content of the repo at a branch or commit, read from the store."""
        _, files = self.store.tree(repo, revision)
        return {path: self.store.blob(repo, digest) for path, digest in files.items()}

    def __enter__(self) -> HubServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python -m tests.hub_server")
    ap.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: a free one, printed)")
    ap.add_argument("--root", required=True, help="directory the repos are stored in")
    ap.add_argument("--token", action="append", default=[], help="accepted token (repeatable; default: any)")
    args = ap.parse_args(argv)
    hub = HubServer(args.root, args.port, args.token, verbose=True)
    print(f"hub test double serving {hub.url} (repos in {args.root}); set HF_ENDPOINT={hub.url}", flush=True)
    try:
        hub.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        hub.httpd.server_close()


if __name__ == "__main__":
    main()
