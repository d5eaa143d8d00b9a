"""A narrow client for the Docker Engine API on its unix socket, built on httpx.

Why not the `docker` SDK: the agent already carries httpx, and the SDK would add a second HTTP
stack (requests, urllib3) to a process with a 60 MB RSS budget, for the dozen calls we make.
The Engine API is a stable, versioned REST API; each method below is one documented endpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import httpx

API_VERSION = "v1.41"  # Docker 20.10+: device requests, labels filters, stop timeouts
DEFAULT_SOCKET = "/var/run/docker.sock"


class DockerError(Exception):
    """`unavailable` is True when the daemon itself cannot be reached."""

    def __init__(self, message: str, status: int | None = None, unavailable: bool = False) -> None:
        super().__init__(message)
        self.status, self.unavailable = status, unavailable


@dataclass(frozen=True)
class Container:
    id: str
    name: str
    running: bool
    status: str  # created, running, exited, ...
    exit_code: int | None
    labels: dict[str, str]
    started_at: str
    restart_count: int


@dataclass(frozen=True)
class ImageConfig:
    """What an image says about itself: its environment and labels (GET /images/{name}/json)."""

    env: tuple[str, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)


class Docker:
    def __init__(self, socket_path: str = DEFAULT_SOCKET, timeout: float = 30.0) -> None:
        self.socket_path = socket_path
        self._http = httpx.Client(transport=httpx.HTTPTransport(uds=socket_path),
                                  base_url=f"http://docker/{API_VERSION}", timeout=timeout)

    def close(self) -> None:
        self._http.close()

    # -- plumbing

    def _request(self, method: str, path: str, ok: tuple[int, ...] = (200, 201, 204, 304), **kw: Any) -> httpx.Response:
        try:
            resp = self._http.request(method, path, **kw)
        except (httpx.TransportError, OSError) as e:
            raise self._unreachable(e) from None
        if resp.status_code not in ok:
            raise DockerError(_message(resp), status=resp.status_code)
        return resp

    def _unreachable(self, e: Exception) -> DockerError:
        return DockerError(f"Docker is not reachable at {self.socket_path} ({type(e).__name__}): "
                           "start it with `systemctl start docker`", unavailable=True)

    # -- daemon and images

    def ping(self) -> None:
        self._request("GET", "/_ping")

    def image_exists(self, ref: str) -> bool:
        return self._request("GET", f"/images/{ref}/json", ok=(200, 404)).status_code == 200

    def image_config(self, ref: str) -> ImageConfig:
        """The image's Config.Env and Config.Labels (the engine keeps the image's LD_LIBRARY_PATH,
        and the CUDA gate reads its CUDA version from them)."""
        config = self._request("GET", f"/images/{ref}/json").json().get("Config") or {}
        return ImageConfig(env=tuple(config.get("Env") or ()), labels=dict(config.get("Labels") or {}))

    def pull(self, ref: str, progress: Callable[[str], None]) -> None:
        """Pull an image, reporting one line of progress at a time; raises if the pull fails."""
        image, _, tag = ref.rpartition(":") if ":" in ref.rsplit("/", 1)[-1] else (ref, "", "latest")
        try:
            with self._http.stream("POST", "/images/create", params={"fromImage": image, "tag": tag}, timeout=None) as resp:
                if resp.status_code != 200:
                    resp.read()
                    raise DockerError(_message(resp), status=resp.status_code)
                for event in _json_lines(resp.iter_lines()):
                    if "error" in event:
                        raise DockerError(event["error"])
                    progress(_progress_line(event))
        except (httpx.TransportError, OSError) as e:
            raise self._unreachable(e) from None

    # -- containers

    def container(self, name: str) -> Container | None:
        resp = self._request("GET", f"/containers/{name}/json", ok=(200, 404))
        if resp.status_code == 404:
            return None
        d = resp.json()
        st = d["State"]
        return Container(
            id=d["Id"], name=d["Name"].lstrip("/"), running=bool(st.get("Running")), status=st.get("Status", "?"),
            exit_code=st.get("ExitCode"), labels=d["Config"].get("Labels") or {}, started_at=st.get("StartedAt", ""),
            restart_count=d.get("RestartCount", 0),
        )

    def create(self, name: str, body: dict[str, Any]) -> str:
        return self._request("POST", "/containers/create", params={"name": name}, json=body).json()["Id"]

    def start(self, name: str) -> None:
        self._request("POST", f"/containers/{name}/start")

    def stop(self, name: str, timeout_s: int) -> None:
        # Docker sends the stop signal, waits timeout_s, then kills; our HTTP wait must outlast it.
        self._request("POST", f"/containers/{name}/stop", params={"t": timeout_s}, timeout=timeout_s + 30)

    def remove(self, name: str) -> None:
        self._request("DELETE", f"/containers/{name}", params={"force": "true"}, ok=(200, 204, 404))

    def logs(self, name: str, tail: int = 20, since: int = 0) -> list[str]:
        """The last `tail` lines, of those written at or after `since` (Unix seconds; 0: all,
        including a restarted container's earlier runs)."""
        params = {"stdout": 1, "stderr": 1, "tail": tail, "since": since}
        resp = self._request("GET", f"/containers/{name}/logs", params=params, ok=(200, 404))
        return _demux(resp.content).splitlines()[-tail:] if resp.status_code == 200 else []


def _message(resp: httpx.Response) -> str:
    try:
        return str(resp.json().get("message", resp.text))
    except ValueError:
        return f"HTTP {resp.status_code}"


def _json_lines(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    for line in lines:
        if line.strip():
            try:
                yield json.loads(line)
            except ValueError:
                continue


def _progress_line(event: dict[str, Any]) -> str:
    parts = [event.get("id", ""), event.get("status", ""), event.get("progress", "")]
    return " ".join(p for p in parts if p)


def _demux(raw: bytes) -> str:
    """Container logs without a TTY come in frames: 8-byte header (stream, 0, 0, 0, size)."""
    out, i = [], 0
    while i + 8 <= len(raw):
        size = int.from_bytes(raw[i + 4:i + 8], "big")
        out.append(raw[i + 8:i + 8 + size])
        i += 8 + size
    if i != len(raw):  # not framed (a TTY container): take it whole
        return raw.decode(errors="replace")
    return b"".join(out).decode(errors="replace")
