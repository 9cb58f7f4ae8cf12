"""The repositories behind tests/hub_server.py: branches, commits and content-addressed blobs on disk.

ROOT/ORG/NAME/repo.json holds {private, refs: {branch: sha}, commits: {sha: {parent, files: {path: sha256},
lfs: [paths], summary}}}; ROOT/ORG/NAME/blobs/SHA256 holds every file's bytes, whether it came inline in a commit
("regular") or through the large-file protocol (an LFS object, uploaded before the commit that names it).
"""
from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.code = status, code


def git_blob_sha1(data: bytes) -> str:
    """The oid git (and the Hub's preupload answer) gives a regular file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class Store:
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
                              "commits": {initial: {"parent": None, "files": {}, "lfs": [],
                                                    "summary": "initial commit"}}})
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

    def lfs_paths(self, repo: str, revision: str) -> set:
        return set(self.meta(repo)["commits"][self.resolve(repo, revision)].get("lfs", []))

    def blob_path(self, repo: str, digest: str) -> Path:
        return self.root / repo / "blobs" / digest

    def blob(self, repo: str, digest: str) -> bytes:
        return self.blob_path(repo, digest).read_bytes()

    def has_blob(self, repo: str, digest: str) -> bool:
        return self.blob_path(repo, digest).is_file()

    def put_blob(self, repo: str, data: bytes) -> str:
        """Written under a temporary name and renamed: a reader never sees half an object."""
        digest = hashlib.sha256(data).hexdigest()
        path = self.blob_path(repo, digest)
        tmp = path.with_name(f"{digest}.{threading.get_ident()}.tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
        return digest

    def branch(self, repo: str, name: str, start: str) -> None:
        with self.lock:
            meta = self.meta(repo)
            if name in meta["refs"]:
                raise HubError(409, f"Reference {name} already exists")
            meta["refs"][name] = self.resolve(repo, start)
            self._save(repo, meta)

    def commit(self, repo: str, branch: str, added: dict, lfs: dict, deleted: list, summary: str,
               parent: str | None) -> str:
        """added: {path: bytes} (regular files); lfs: {path: sha256} of objects uploaded already."""
        with self.lock:
            meta = self.meta(repo)
            if branch not in meta["refs"]:
                raise HubError(404, f"Invalid rev id: {branch} (create the branch first)", "RevisionNotFound")
            head = meta["refs"][branch]
            if parent is not None and parent != head:
                raise HubError(412, f"parent commit {parent} is not the head of {branch}")
            missing = [p for p, oid in lfs.items() if not self.has_blob(repo, oid)]
            if missing:
                raise HubError(422, f"LFS object(s) not uploaded for {', '.join(missing)}")
            gone = [x.rstrip("/") for x in deleted]
            old = meta["commits"][head]
            files = {p: d for p, d in old["files"].items() if not any(p == x or p.startswith(x + "/") for x in gone)}
            large = {p for p in old.get("lfs", []) if p in files} - set(added)
            for path, data in added.items():
                files[path] = self.put_blob(repo, data)
            files.update(lfs)
            large |= set(lfs)
            sha = hashlib.sha1(json.dumps([head, files, summary, time.time_ns()]).encode()).hexdigest()
            meta["commits"][sha] = {"parent": head, "files": files, "lfs": sorted(large), "summary": summary}
            meta["refs"][branch] = sha
            self._save(repo, meta)
            return sha

    def history(self, repo: str, branch: str = "main") -> list[str]:
        """Commit summaries of a branch, newest first."""
        meta = self.meta(repo)
        out, sha = [], meta["refs"][branch]
        while sha is not None:
            out.append(meta["commits"][sha]["summary"])
            sha = meta["commits"][sha]["parent"]
        return out
