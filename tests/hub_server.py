"""A local TEST DOUBLE of the Hugging Face Hub HTTP API: just the endpoints huggingface_hub 0.36 calls for
`create_repo`, `create_branch`, `upload_folder` / `create_commit` (validate-yaml, preupload, the LFS batch API,
LFS upload and verify, commit), `model_info` / `repo_info` and `hf_hub_download` / `snapshot_download` (HEAD +
GET resolve). It is not a hub: model repos only, no users.

Uploads take the two paths the Hub gives them. Preupload answers "lfs" for weights and checkpoint files (the
Hub's default .gitattributes: *.safetensors, *.pt, *.bin, ...) and anything over 10 MB: the client asks the
LFS batch endpoint, PUTs the bytes to the URL it is given, has them verified, and the commit names the object by
its sha256. Everything else is "regular": its bytes arrive base64 in the commit's NDJSON. Preupload also returns
each path's current oid, so the client skips files that did not change (as with the Hub).

Files are stored on disk under ROOT (tests/hub_store.py). Every Authorization header seen is recorded
(`HubServer.auth_seen`), so tests can check the client sent its token; writes need a Bearer token (one of
`tokens` when given), and so do reads of private repos. Faults for tests: `fail(n, status)` answers the next n
write requests with `status`; `delay_s` slows every request; `die_mid_upload(down_s)` drops the next LFS upload
half-way and stops listening for down_s seconds, then serves again on the same port.

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

from tests.hub_store import HubError, Store, git_blob_sha1

# The Hub's default .gitattributes sends these through LFS, and any file over 10 MB.
LFS_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".h5", ".msgpack", ".onnx", ".npy", ".tar")
LFS_OVER_BYTES = 10 * 1000 * 1000


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the hub; every response carries Content-Length
    server: _Server

    # ---- plumbing -----------------------------------------------------------------------------------------
    def _dispatch(self, method: str) -> None:
        hub = self.server.hub
        hub.auth_seen.append(self.headers.get("Authorization", ""))
        if hub.delay_s:
            time.sleep(hub.delay_s)
        parts = [unquote(p) for p in urlsplit(self.path).path.strip("/").split("/")]
        if method == "PUT" and parts[0] == "lfs-upload":  # reads its own body: it may die half-way
            return self._guarded(self.lfs_upload, parts, b"")
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        route = (ROUTES.get((method, *parts[:2])) or ROUTES.get((method, "*", "*", parts[2] if len(parts) > 2
                                                                else "")) or Handler.not_served)
        if method == "POST" and parts[0] == "lfs-verify":
            route = Handler.lfs_verify
        self._guarded(lambda p, b: route(self, p, b), parts, body)

    def _guarded(self, route, parts, body) -> None:
        try:
            self.server.hub.injected_failure(self.command)
            route(parts, body)
        except HubError as e:
            headers = {"X-Error-Message": str(e), **({"X-Error-Code": e.code} if e.code else {})}
            self._json({"error": str(e)}, e.status, headers)

    def not_served(self, parts, body):
        raise HubError(404, f"{self.command} {self.path}: not served by this test double")

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self._dispatch("GET")

    def do_HEAD(self):  # noqa: N802
        self._dispatch("HEAD")

    def do_POST(self):  # noqa: N802
        self._dispatch("POST")

    def do_PUT(self):  # noqa: N802
        self._dispatch("PUT")

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
        """/api/models/ORG/NAME[/revision/REV | /tree/REV | /preupload/REV | /commit/REV | /branch/NAME]"""
        if len(parts) < 4:
            raise HubError(404, "expected /api/models/ORG/NAME")
        org, name, action, rev = parts[2], parts[3], (parts[4:5] or ["revision"])[0], "/".join(parts[5:]) or "main"
        handler = {("GET", "revision"): self.info, ("GET", "tree"): self.tree, ("POST", "preupload"): self.preupload,
                   ("POST", "commit"): self.commit, ("POST", "branch"): self.branch}.get((self.command, action))
        if handler is None:
            raise HubError(404, f"{self.command} {self.path}: not served by this test double")
        handler(self._repo(org, name, write=self.command == "POST"), rev, body)

    def info(self, repo, rev, body):
        sha, files = self.server.hub.store.tree(repo, rev)
        store = self.server.hub.store
        large = store.lfs_paths(repo, sha)
        siblings = []
        for path, digest in sorted(files.items()):  # with ?blobs=true the Hub adds blobId and LFS details; so do we
            data = store.blob(repo, digest)
            siblings.append({"rfilename": path, "size": len(data), "blobId": git_blob_sha1(data),
                             **({"lfs": {"sha256": digest, "size": len(data), "pointerSize": 134}}
                                if path in large else {})})
        self._json({"id": repo, "modelId": repo, "sha": sha, "private": store.meta(repo)["private"],
                    "siblings": siblings, "lastModified": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
                    "tags": [], "downloads": 0, "likes": 0})

    def tree(self, repo, rev, body):
        """/api/models/ORG/NAME/tree/REV (recursive, one page): what snapshot_download lists for an empty repo."""
        store = self.server.hub.store
        sha, files = store.tree(repo, rev.split("/")[0])
        large = store.lfs_paths(repo, sha)
        entries = []
        for path, digest in sorted(files.items()):
            data = store.blob(repo, digest)
            lfs = {"lfs": {"oid": digest, "size": len(data), "pointerSize": 134}} if path in large else {}
            entries.append({"type": "file", "path": path, "size": len(data), "oid": git_blob_sha1(data), **lfs})
        self._json(entries)

    def preupload(self, repo, rev, body):
        store = self.server.hub.store
        _, files = store.tree(repo, rev)
        large = store.lfs_paths(repo, rev)
        answer = []
        for f in json.loads(body)["files"]:
            lfs = f["path"].endswith(LFS_SUFFIXES) or int(f.get("size", 0)) > LFS_OVER_BYTES
            oid = None
            if f["path"] in files:  # the client compares it with its own and skips an unchanged file
                digest = files[f["path"]]
                oid = digest if f["path"] in large else git_blob_sha1(store.blob(repo, digest))
            answer.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                           "oid": oid})
        self._json({"files": answer})

    def commit(self, repo, rev, body):
        header, added, lfs, deleted = {}, {}, {}, []
        for line in body.decode().splitlines():
            item = json.loads(line) if line.strip() else None
            if item is None:
                continue
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                added[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                lfs[value["path"]] = value["oid"]
            elif key in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"])
            else:
                raise HubError(422, f"commit operation '{key}' is not implemented by this test double")
        sha = self.server.hub.store.commit(repo, rev, added, lfs, deleted, header.get("summary", ""),
                                          header.get("parentCommit"))
        self.server.hub.commits.append({"summary": header.get("summary", ""), "regular": sorted(added),
                                        "lfs": sorted(lfs), "deleted": deleted, "time": time.time()})
        self._json({"commitUrl": f"{self.server.hub.url}/{repo}/commit/{sha}", "commitOid": sha,
                    "pullRequestUrl": None})

    # ---- the large-file protocol (git LFS batch API, basic transfer) ----------------------------------------
    def lfs_batch(self, parts, body):
        """/ORG/NAME.git/info/lfs/objects/batch: where to PUT each object the store lacks (none: it has it)."""
        if not parts[1].endswith(".git"):
            return self.not_served(parts, body)
        repo = self._repo(parts[0], parts[1][:-len(".git")], write=True)
        req, store, url = json.loads(body), self.server.hub.store, self.server.hub.url
        objects = []
        for obj in req["objects"]:
            item = {"oid": obj["oid"], "size": obj["size"]}
            if not store.has_blob(repo, obj["oid"]):
                item["actions"] = {"upload": {"href": f"{url}/lfs-upload/{repo}/{obj['oid']}", "header": {}},
                                   "verify": {"href": f"{url}/lfs-verify/{repo}", "header": {}}}
            objects.append(item)
        self._json({"transfer": "basic", "objects": objects})

    def lfs_upload(self, parts, body):
        """PUT /lfs-upload/ORG/NAME/OID (the presigned URL of the real Hub's storage: no token needed)."""
        hub, repo, oid = self.server.hub, f"{parts[1]}/{parts[2]}", parts[3]
        size = int(self.headers.get("Content-Length") or 0)
        if hub.take_death():
            self.rfile.read(size // 2)
            self.close_connection = True
            self.connection.close()
            return
        data = self.rfile.read(size)
        if hashlib.sha256(data).hexdigest() != oid:
            raise HubError(400, f"LFS object {oid}: content does not match its sha256")
        hub.store.put_blob(repo, data)
        hub.lfs_uploads.append(oid)
        self._send(200, b"", {})

    def lfs_verify(self, parts, body):
        repo = f"{parts[1]}/{parts[2]}"
        if not self.server.hub.store.has_blob(repo, json.loads(body)["oid"]):
            raise HubError(404, "LFS object not found")
        self._json({})

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
        if path in store.lfs_paths(repo, sha):  # what the Hub sends for an LFS file (its sha256, its size)
            headers.update({"X-Linked-Etag": f'"{files[path]}"', "X-Linked-Size": str(len(data))})
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
          ("GET", "*", "*", "resolve"): Handler.resolve, ("HEAD", "*", "*", "resolve"): Handler.resolve,
          ("POST", "*", "*", "info"): Handler.lfs_batch}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    hub: HubServer


class HubServer:
    """The test double on 127.0.0.1 (port 0: a free one); a context manager serving from a thread. `commits`
    (summary and which paths came regular / lfs / deleted) and `lfs_uploads` (oids PUT) record what arrived."""

    def __init__(self, root: str | Path, port: int = 0, tokens: list | None = None, verbose: bool = False):
        self.store, self.tokens, self.verbose = Store(root), set(tokens or []), verbose
        self.auth_seen: list[str] = []
        self.commits: list[dict] = []
        self.lfs_uploads: list[str] = []
        self.delay_s = 0.0
        self._failures: list = []  # [count, status] of fail()
        self._deaths: list[float] = []  # down_s of die_mid_upload()
        self.deaths = 0  # uploads cut so far
        self._lock = threading.Lock()
        self._bind(port)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread: threading.Thread | None = None

    def _bind(self, port: int) -> None:
        self.httpd = _Server(("127.0.0.1", port), Handler)
        self.httpd.hub = self

    def files(self, repo: str, revision: str = "main") -> dict[str, bytes]:
        """Path -> content of the repo at a branch or commit, read from the store."""
        _, files = self.store.tree(repo, revision)
        return {path: self.store.blob(repo, digest) for path, digest in files.items()}

    # ---- faults -------------------------------------------------------------------------------------------
    def fail(self, count: int, status: int = 500) -> None:
        """The next `count` write requests (POST, PUT) answer `status`."""
        with self._lock:
            self._failures = [count, status]

    def injected_failure(self, method: str) -> None:
        with self._lock:
            if method not in ("POST", "PUT") or not self._failures or self._failures[0] <= 0:
                return
            self._failures[0] -= 1
            status = self._failures[1]
        raise HubError(status, f"injected failure ({status})")

    def die_mid_upload(self, down_s: float) -> None:
        """The next LFS upload is cut half-way; the server stops listening, and serves again after down_s."""
        with self._lock:
            self._deaths.append(down_s)

    def take_death(self) -> bool:
        with self._lock:
            if not self._deaths:
                return False
            down_s = self._deaths.pop(0)
            self.deaths += 1
        threading.Thread(target=self._restart, args=(down_s,), daemon=True).start()
        return True

    def _restart(self, down_s: float) -> None:
        port = self.httpd.server_address[1]
        self.stop()
        time.sleep(down_s)
        self._bind(port)
        self.start()

    # ---- serving ------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> HubServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


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
