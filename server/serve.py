"""Running the app: the listening socket, the Dashboard line, server.json, signals and stdin.

Signals. The first SIGINT or SIGTERM asks the trainer to quit at once (down the pipe, so it
saves if configured) and lets uvicorn shut down; the app's lifespan then waits, bounded, for
the trainer to exit. A second SIGINT kills the trainer and leaves immediately. Unlike plain
uvicorn, a caught signal is not re-raised after shutdown, so Ctrl-C ends with no traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Generator
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn

from server.settings import ServerSettings, url_host

SERVER_FILE = "server.json"
GRACEFUL_SHUTDOWN_S = 3.0
STDIN_CHUNK = 4096
BACKGROUND_RECHECK_S = 1.0
# Accepted sockets inherit this from the listener (and lose kernel autotuning up to 4 MiB): a
# client that stops reading is noticed after a few hundred KiB rather than megabytes, which
# bounds the kernel memory it can hold. Plenty for a dashboard, even through an SSH tunnel.
SEND_BUFFER_BYTES = 128 * 1024


class ListenError(OSError):
    """The server cannot listen where it was asked to."""


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket, so ``--port 0`` knows its real port before anything is printed."""
    try:
        # IPv4 first: "localhost" must be reachable as the browser will most likely resolve it.
        found = sorted(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM), key=lambda a: a[0] != socket.AF_INET)
        family, kind, proto, _, address = found[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        raise ListenError(f"cannot listen on {url_host(host)}:{port}: {exc.strerror or exc}") from None
    return sock


def dashboard_url(settings: ServerSettings, shown_host: str) -> str:
    return f"http://{url_host(shown_host)}:{settings.port}/?token={settings.token}"


def write_server_file(run_dir: Path, url: str, settings: ServerSettings) -> Path:
    """RUN_DIR/server.json (mode 0600: it holds the token) for scripts that need the URL."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / SERVER_FILE
    data = {"url": url, "host": settings.host, "port": settings.port, "pid": os.getpid(), "token": settings.token}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        os.fchmod(handle.fileno(), 0o600)
        json.dump(data, handle, indent=2)
        handle.write("\n")
    return path


def remove_server_file(path: Path) -> None:
    """Remove server.json unless another server has taken it over since."""
    with contextlib.suppress(OSError, ValueError):
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()


class Server(uvicorn.Server):
    """uvicorn with traindeck's signal policy (see the module docstring)."""

    def __init__(self, config: uvicorn.Config, on_stop: Callable[[], None], on_abort: Callable[[], None]) -> None:
        super().__init__(config)
        self.on_stop = on_stop
        self.on_abort = on_abort

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await super().shutdown(sockets)
        if self.force_exit:
            # uvicorn skips the lifespan on a forced exit; ours is quick once the trainer is killed,
            # and skipping it would leave its task to be cancelled (and logged) by asyncio.run.
            await self.lifespan.shutdown()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit:
            if sig == signal.SIGINT:
                self.force_exit = True
                self.on_abort()
            return
        self.should_exit = True
        self.on_stop()


def uvicorn_config(app: Any, settings: ServerSettings) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,  # query strings may carry the token
        ws_max_size=settings.hub.max_frame_bytes,
        ws_per_message_deflate=False,  # small JSON frames gain little; compressing per client costs a lot
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        lifespan="on",
        server_header=False,
    )


def _in_background() -> bool:
    """A background job reading its terminal would be stopped by SIGTTIN."""
    try:
        return os.isatty(0) and os.tcgetpgrp(0) != os.getpgrp()
    except OSError:
        return False


def read_stdin_lines(on_line: Callable[[str], None], fd: int = 0) -> threading.Thread:
    """Feed stdin lines to ``on_line`` from a daemon thread; EOF just ends the thread.

    ``os.read`` rather than ``sys.stdin``: a daemon thread blocked inside the buffered reader
    would hold its lock while the interpreter shuts down.
    """

    def loop() -> None:
        pending = b""
        while True:
            if _in_background():
                threading.Event().wait(BACKGROUND_RECHECK_S)
                continue
            try:
                chunk = os.read(fd, STDIN_CHUNK)
            except OSError:
                return
            if not chunk:
                return
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                on_line(raw.decode("utf-8", "replace"))

    thread = threading.Thread(target=loop, name="traindeck-stdin", daemon=True)
    thread.start()
    return thread


def say(text: str, *, err: bool = False) -> None:
    stream = sys.stderr if err else sys.stdout
    print(text, file=stream, flush=True)
