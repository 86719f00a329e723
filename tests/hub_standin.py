"""A local stand-in for the parts of the Hugging Face Hub HTTP API that `HfApi.create_repo` and `create_commit` use.

It runs on 127.0.0.1 in a thread and records what it receives, so tests can push for real (through
huggingface_hub's own client code) and check exactly what arrived. Endpoints, as huggingface_hub 2.x calls them:

    POST /api/repos/create                                 create_repo
    POST /api/validate-yaml                                create_commit checks README.md front matter first
    POST /api/models/{ns}/{name}/preupload/{revision}      upload mode of each file (this server: LFS for
                                                           *.safetensors, like the Hub's default .gitattributes)
    POST /{ns}/{name}.git/info/lfs/objects/batch           LFS batch API, "basic" transfer
    PUT  /lfs-upload/{oid}, POST /lfs-verify/{oid}         the upload and verify actions it hands out
    POST /api/models/{ns}/{name}/commit/{revision}         the commit itself, an NDJSON body

Requests must carry `Authorization: Bearer <token>`; anything else answers 401, unknown paths 404.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import yaml

_REPO = r"(?P<repo>[^/]+/[^/]+)"
_PREUPLOAD = re.compile(rf"^/api/models/{_REPO}/preupload/(?P<rev>[^/]+)$")
_COMMIT = re.compile(rf"^/api/models/{_REPO}/commit/(?P<rev>[^/]+)$")
_LFS_BATCH = re.compile(rf"^/{_REPO}\.git/info/lfs/objects/batch$")


@dataclass
class Commit:
    """One commit as received: its header and the files it adds (regular and LFS alike, as bytes)."""

    repo_id: str
    revision: str
    summary: str
    files: dict[str, bytes]
    lfs_paths: list[str]


@dataclass
class HubStandin:
    """What the stand-in has received; `url` is the endpoint to pass to HfApi."""

    token: str
    url: str = ""
    requests: list[tuple[str, str]] = field(default_factory=list)
    repos: dict[str, dict] = field(default_factory=dict)
    commits: list[Commit] = field(default_factory=list)
    lfs_objects: dict[str, bytes] = field(default_factory=dict)
    unexpected: list[tuple[str, str]] = field(default_factory=list)
    # Set to (status, message) to make the commit endpoint refuse, as the Hub does for e.g. a protected branch.
    commit_error: tuple[int, str] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


def _handler(hub: HubStandin) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        self.rfile.readline()
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _reply(self, status: int, payload: dict | None = None) -> None:
            data = json.dumps(payload if payload is not None else {}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _handle(self, method: str) -> None:
            path = unquote(urlsplit(self.path).path)
            body = self._body()
            with hub.lock:
                hub.requests.append((method, path))
            # LFS uploads go to storage URLs that the batch answer signed; the Hub API itself wants the token.
            if not path.startswith("/lfs-") and self.headers.get("Authorization") != f"Bearer {hub.token}":
                return self._reply(401, {"error": "Invalid credentials in Authorization header"})
            try:
                return self._route(method, path, body)
            except (KeyError, ValueError) as exc:
                return self._reply(400, {"error": f"bad request: {exc}"})

        def _route(self, method: str, path: str, body: bytes) -> None:
            if method == "POST" and path == "/api/repos/create":
                return self._create_repo(json.loads(body))
            if method == "POST" and path == "/api/validate-yaml":
                return self._validate_yaml(json.loads(body))
            if method == "POST" and (m := _PREUPLOAD.match(path)):
                return self._preupload(m["repo"], json.loads(body))
            if method == "POST" and (m := _LFS_BATCH.match(path)):
                return self._lfs_batch(m["repo"], json.loads(body))
            if method == "PUT" and path.startswith("/lfs-upload/"):
                return self._lfs_upload(path.rsplit("/", 1)[1], body)
            if method == "POST" and path.startswith("/lfs-verify/"):
                oid = path.rsplit("/", 1)[1]
                return self._reply(200 if oid in hub.lfs_objects else 404, {})
            if method == "POST" and (m := _COMMIT.match(path)):
                return self._commit(m["repo"], m["rev"], body)
            with hub.lock:
                hub.unexpected.append((method, path))
            return self._reply(404, {"error": f"the stand-in does not serve {method} {path}"})

        def _create_repo(self, payload: dict) -> None:
            repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
            url = f"{hub.url}/{repo_id}"
            with hub.lock:
                if repo_id in hub.repos:
                    return self._reply(409, {"error": "You already created this model repo", "url": url})
                private = payload.get("visibility") == "private" or payload.get("private") is True
                hub.repos[repo_id] = {"private": private, "type": payload.get("type") or "model"}
            return self._reply(200, {"url": url, "name": repo_id})

        def _validate_yaml(self, payload: dict) -> None:
            match = re.match(r"^---\n(.*?)\n---\n", payload["content"], re.S)
            try:
                if match is None or not isinstance(yaml.safe_load(match.group(1)), dict):
                    raise yaml.YAMLError("no YAML front matter")
            except yaml.YAMLError as exc:
                return self._reply(400, {"errors": [{"message": str(exc)}], "warnings": []})
            return self._reply(200, {"errors": [], "warnings": []})

        def _preupload(self, repo_id: str, payload: dict) -> None:
            if repo_id not in hub.repos:
                return self._reply(404, {"error": "Repository not found"})
            files = [
                {
                    "path": f["path"],
                    "uploadMode": "lfs" if f["path"].endswith(".safetensors") else "regular",
                    "shouldIgnore": False,
                    "oid": None,
                }
                for f in payload["files"]
            ]
            return self._reply(200, {"files": files})

        def _lfs_batch(self, repo_id: str, payload: dict) -> None:
            if repo_id not in hub.repos or payload.get("operation") != "upload":
                return self._reply(404, {"message": "Repository not found"})
            objects = [
                {
                    "oid": o["oid"],
                    "size": o["size"],
                    "authenticated": True,
                    "actions": {
                        "upload": {"href": f"{hub.url}/lfs-upload/{o['oid']}"},
                        "verify": {"href": f"{hub.url}/lfs-verify/{o['oid']}"},
                    },
                }
                for o in payload["objects"]
            ]
            return self._reply(200, {"transfer": "basic", "objects": objects})

        def _lfs_upload(self, oid: str, body: bytes) -> None:
            if hashlib.sha256(body).hexdigest() != oid:
                return self._reply(400, {"error": "content does not match its sha256"})
            with hub.lock:
                hub.lfs_objects[oid] = body
            return self._reply(200, {})

        def _commit(self, repo_id: str, revision: str, body: bytes) -> None:
            if repo_id not in hub.repos:
                return self._reply(404, {"error": "Repository not found"})
            if hub.commit_error is not None:
                return self._reply(hub.commit_error[0], {"error": hub.commit_error[1]})
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            header = next(item["value"] for item in lines if item["key"] == "header")
            files, lfs_paths = {}, []
            for item in lines:
                value = item["value"]
                if item["key"] == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif item["key"] == "lfsFile":
                    if value["oid"] not in hub.lfs_objects:
                        return self._reply(422, {"error": f"LFS object of {value['path']} was never uploaded"})
                    files[value["path"]] = hub.lfs_objects[value["oid"]]
                    lfs_paths.append(value["path"])
                elif item["key"] != "header":
                    return self._reply(400, {"error": f"the stand-in does not handle '{item['key']}'"})
            oid = hashlib.sha1(body).hexdigest()
            with hub.lock:
                hub.commits.append(Commit(repo_id, revision, header["summary"], files, lfs_paths))
            return self._reply(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{oid}", "commitOid": oid})

        def do_POST(self):
            self._handle("POST")

        def do_PUT(self):
            self._handle("PUT")

        def do_GET(self):
            self._handle("GET")

    return Handler


class running_standin:
    """Context manager: start a stand-in on a free port of 127.0.0.1, yield its `HubStandin`, stop it after."""

    def __init__(self, token: str):
        self.hub = HubStandin(token=token)

    def __enter__(self) -> HubStandin:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self.hub))
        self.server.daemon_threads = True
        self.hub.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self.hub

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
