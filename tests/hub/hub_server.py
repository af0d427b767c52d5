"""A local stand-in for the Hugging Face Hub, enough for huggingface_hub to create a repo, commit files (uploaded
inline, as the Hub takes small "regular" files) and download them again, as ``from_pretrained`` does. Tests point
huggingface_hub at it with HF_ENDPOINT.

    with hub_server() as server:
        subprocess.run([...], env={**os.environ, "HF_ENDPOINT": server.endpoint})
        server.repos["me/model"]  # {path: bytes}

Routes: POST /api/repos/create; POST /api/validate-yaml; POST /api/models/{repo}/preupload/{revision}; POST /api/models/{repo}/commit/
{revision} (NDJSON: header, then files with base64 content); GET /api/models/{repo}[/revision/{revision}]; GET /api/models/{repo}/tree/{revision}/{path};
HEAD and GET /{repo}/resolve/{revision}/{path}. Anything else answers 404 and is recorded in ``unknown``.
"""

import base64
import contextlib
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class HubState:
    def __init__(self):
        self.repos: dict[str, dict[str, bytes]] = {}
        self.commits: dict[str, str] = {}
        self.unknown: list[str] = []
        self.endpoint = ""


def _handler(state: HubState):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _reply(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False):
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _json(self, value, status: int = 200):
            self._reply(status, json.dumps(value).encode(), {"Content-Type": "application/json"})

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _not_found(self, code: str = "RepoNotFound", head: bool = False):
            self._reply(404, b"" if head else json.dumps({"error": code}).encode(), {"X-Error-Code": code}, head=head)

        def do_POST(self):
            path = self.path.split("?")[0]
            if path == "/api/repos/create":
                request = json.loads(self._body())
                name = request["name"] if not request.get("organization") else f"{request['organization']}/{request['name']}"
                if name in state.repos:
                    return self._json({"error": "already exists", "url": f"{state.endpoint}/{name}"}, 409)
                state.repos[name] = {}
                state.commits[name] = hashlib.sha1(name.encode()).hexdigest()
                return self._json({"url": f"{state.endpoint}/{name}", "name": name})
            if path == "/api/validate-yaml":  # the client checks a README's metadata before committing it
                self._body()
                return self._json({"errors": [], "warnings": []})
            match = re.fullmatch(r"/api/models/(.+)/(preupload|commit)/([^/]+)", path)
            if match is None or match.group(1) not in state.repos:
                state.unknown.append(f"POST {self.path}")
                return self._not_found()
            repo, action = match.group(1), match.group(2)
            body = self._body()
            if action == "preupload":
                listed = json.loads(body)["files"]
                return self._json({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                             for f in listed]})
            for line in body.decode().splitlines():
                entry = json.loads(line)
                if entry["key"] == "file":
                    state.repos[repo][entry["value"]["path"]] = base64.b64decode(entry["value"]["content"])
                elif entry["key"] == "deletedFile":
                    state.repos[repo].pop(entry["value"]["path"], None)
                elif entry["key"] != "header":
                    state.unknown.append(f"commit entry {entry['key']}")
            state.commits[repo] = hashlib.sha1(repr(sorted(state.repos[repo].items())).encode()).hexdigest()
            return self._json({"commitUrl": f"{state.endpoint}/{repo}/commit/{state.commits[repo]}",
                               "commitOid": state.commits[repo], "pullRequestUrl": None})

        def _get(self, head: bool):
            path = self.path.split("?")[0]
            match = re.fullmatch(r"/api/models/(.+?)(?:/revision/([^/]+))?", path)
            if match is not None and match.group(1) in state.repos:
                repo = match.group(1)
                return self._json({"id": repo, "modelId": repo, "sha": state.commits[repo], "private": False,
                                   "siblings": [{"rfilename": name} for name in sorted(state.repos[repo])]})
            match = re.fullmatch(r"/api/models/(.+?)/tree/([^/]+)(?:/(.*))?", path)
            if match is not None and match.group(1) in state.repos:
                repo, folder = match.group(1), (match.group(3) or "").strip("/")
                prefix = f"{folder}/" if folder else ""
                entries = [{"type": "file", "path": name, "size": len(content),
                            "oid": hashlib.sha1(content).hexdigest()}
                           for name, content in sorted(state.repos[repo].items()) if name.startswith(prefix)]
                return self._json(entries) if entries else self._not_found("EntryNotFound", head=head)
            match = re.fullmatch(r"/(.+)/resolve/([^/]+)/(.+)", path)
            if match is None or match.group(1) not in state.repos:
                state.unknown.append(f"{'HEAD' if head else 'GET'} {self.path}")
                return self._not_found(head=head)
            repo, name = match.group(1), match.group(3)
            if name not in state.repos[repo]:
                return self._reply(404, b"", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": state.commits[repo]},
                                   head=head)
            content = state.repos[repo][name]
            headers = {"X-Repo-Commit": state.commits[repo], "ETag": f'"{hashlib.sha256(content).hexdigest()}"',
                       "Content-Type": "application/octet-stream"}
            return self._reply(200, content, headers, head=head)

        def do_GET(self):
            self._get(head=False)

        def do_HEAD(self):
            self._get(head=True)

    return Handler


@contextlib.contextmanager
def hub_server():
    """A running server on a free local port; yields its :class:`HubState` (``endpoint``, ``repos``, ``unknown``)."""
    state = HubState()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
