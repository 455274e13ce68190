"""A loopback stand-in for the Hugging Face Hub's HTTP API: the only fake the tests use.

The real `huggingface_hub` client talks to it (HfApi(endpoint=...) / HF_ENDPOINT). It records every request
and keeps what commits put, so a test can assert what the client sent and download it back.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeHub:
    def __init__(self):
        self.requests: list[tuple[str, str, dict]] = []  # (method, path, headers with lower-case names)
        self.repos: dict[str, dict] = {}  # repo -> {"private": bool, "files": {path: bytes}}
        self.commits: list[dict] = []  # {"repo", "summary", "files": [paths]}
        self.validated: list[str] = []  # model card texts sent to /api/validate-yaml
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, code: int, body: bytes = b"", headers: dict | None = None, head: bool = False):
                self.send_response(code)
                for k, v in (headers or {"Content-Type": "application/json"}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _json(self, obj, code=200):
                self._send(code, json.dumps(obj).encode())

            def _body(self) -> bytes:
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def do_POST(self):  # noqa: N802
                hub.requests.append(("POST", self.path, {k.lower(): v for k, v in self.headers.items()}))
                body = self._body()
                path = self.path.split("?")[0]
                if path == "/api/repos/create":
                    data = json.loads(body)
                    repo = f"{data.get('organization') or 'me'}/{data['name']}"
                    hub.repos.setdefault(repo, {"private": bool(data.get("private")), "files": {}})
                    return self._json({"url": f"{hub.endpoint}/{repo}", "name": repo, "id": repo})
                if path == "/api/validate-yaml":  # the model card's metadata, checked before the commit
                    import yaml

                    content = json.loads(body)["content"]
                    hub.validated.append(content)
                    try:
                        meta = yaml.safe_load(content.split("---")[1]) if content.startswith("---") else None
                    except yaml.YAMLError as e:
                        return self._json({"errors": [{"message": str(e)}]}, 400)
                    if not isinstance(meta, dict):
                        return self._json({"errors": [{"message": "no metadata"}]}, 400)
                    return self._json({"errors": [], "warnings": []})
                parts = path.strip("/").split("/")  # api models ORG NAME (preupload|commit) REV
                if len(parts) == 6 and parts[0] == "api" and parts[1] == "models":
                    repo = f"{parts[2]}/{parts[3]}"
                    if repo not in hub.repos:
                        return self._json({"error": "Repository not found"}, 404)
                    if parts[4] == "preupload":
                        files = json.loads(body)["files"]
                        return self._json({"files": [dict(path=f["path"], uploadMode="regular", shouldIgnore=False,
                                                          oid=None) for f in files], "commitOid": "0" * 40})
                    if parts[4] == "commit":
                        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                        header = next(item["value"] for item in lines if item["key"] == "header")
                        added = {}
                        for item in lines:
                            if item["key"] == "file":
                                added[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                            elif item["key"] in ("lfsFile", "deletedFile", "deletedFolder", "copyFile"):
                                return self._json({"error": f"fake hub: {item['key']} not supported"}, 400)
                        hub.repos[repo]["files"].update(added)
                        oid = hashlib.sha1(json.dumps(sorted(hub.repos[repo]["files"])).encode()).hexdigest()
                        hub.commits.append({"repo": repo, "summary": header.get("summary"), "files": sorted(added)})
                        return self._json({"commitUrl": f"{hub.endpoint}/{repo}/commit/{oid}", "commitOid": oid,
                                           "success": True})
                return self._json({"error": f"fake hub: no route POST {path}"}, 404)

            def _resolve(self, head: bool):
                headers = {k.lower(): v for k, v in self.headers.items()}
                hub.requests.append(("HEAD" if head else "GET", self.path, headers))
                parts = self.path.split("?")[0].strip("/").split("/")  # ORG NAME resolve REV PATH...
                if len(parts) >= 5 and parts[2] == "resolve":
                    repo, path = f"{parts[0]}/{parts[1]}", "/".join(parts[4:])
                    files = hub.repos.get(repo, {}).get("files", {})
                    if path in files:
                        data = files[path]
                        etag = hashlib.sha256(data).hexdigest()
                        return self._send(200, data, {"Content-Type": "application/octet-stream",
                                                      "X-Repo-Commit": "1" * 40, "ETag": f'"{etag}"'}, head)
                    return self._send(404, b"", {"X-Error-Code": "EntryNotFound"}, head)
                return self._send(404, b"", {}, head)

            def do_HEAD(self):  # noqa: N802
                self._resolve(head=True)

            def do_GET(self):  # noqa: N802
                self._resolve(head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def client_env(self, cache) -> dict:
        """The environment of a fresh process whose real huggingface_hub client reads from this Hub."""
        return {"HF_ENDPOINT": self.endpoint, "HF_HUB_OFFLINE": "0", "HF_HUB_CACHE": str(cache),
                "HF_HUB_DISABLE_XET": "1"}

    def __enter__(self) -> "FakeHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
