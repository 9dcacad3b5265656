"""Server benchmarks: loop overhead in serve mode, WebSocket fan-out, command round trip.

(a) Loop overhead: ``traindeck serve`` with one WebSocket client reading everything it is sent,
    against a bare PyTorch loop with the same model and data and a busy-wait standing in for the
    model's compute (1 ms and 0.1 ms steps). The bare loop runs inside the served trainer
    process and the two take turns every 101 steps (see ``paired.py``), so both see the same
    machine and the server's own CPU use; each repeat is a fresh server.
(b) Fan-out: a trainer emitting ~1 000 metrics messages/s (sleeping 1 ms steps) to 20 clients;
    p50/p99 delivery latency (trainer send -> client receive) of the live clients without and
    with one stalled client, and the server's RSS over the run.
(c) Round trip of ``POST /command/status`` against one step of the same run.

    python bench/server.py [--repeats 5] [--duration 10] [--only loop,fanout,command]

``--duration`` is the fan-out time per phase (the target figure is for 60 s; ``make bench``
uses the shorter default). Ratios compare numbers measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
SPEC = f"{Path(__file__).resolve()}:build"
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "bench")]), "OMP_NUM_THREADS": "1"}
DASHBOARD_RE = re.compile(r"Dashboard: (http://([^/]+))/\?token=(\S+)")
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(REPO)  # run as a script: the package `server`, not this file, must win
    sys.path.append(str(REPO / "bench"))

import paired  # noqa: E402  (bench/paired.py, found through the path set just above)

# -- the synthetic recipe (loaded by the trainer process from this file) -----------------------

def build(config: Any) -> Any:
    from trainer_core.recipe import Recipe

    torch.set_num_threads(1)
    model, data = paired.make_parts(config.trainer.seed)
    wait_s = float(config.recipe["step_ms"]) / 1000
    wait = time.sleep if config.recipe.get("mode") == "sleep" else paired.spin
    handover = paired.Handover(config.recipe, config.trainer.iterations) if "result" in config.recipe else None

    def step(engines: Any, batch: Any) -> torch.Tensor:
        if handover is not None:
            handover()
        x, y = batch
        loss = nn.functional.mse_loss(engines.model(x), y)
        wait(wait_s)
        return loss

    return Recipe(models=model, dataset=data, step=step)


def settings(steps: int, step_ms: float, mode: str) -> list[str]:
    return [f"trainer.iterations={steps}", "data.batch_size=8", "data.sampler=random", f"recipe.step_ms={step_ms}",
            f"recipe.mode={mode}", "trainer.save_on_quit=false", "trainer.log_every=0"]


# -- a served run ----------------------------------------------------------------------------------

class Served:
    def __init__(self, steps: int, step_ms: float, mode: str, run_dir: Path, extra: list[str] | None = None) -> None:
        args = [sys.executable, "-m", "server.cli", "serve", SPEC, "--port", "0", "--run-dir", str(run_dir)]
        for item in settings(steps, step_ms, mode) + (extra or []):
            args += ["--set", item]
        self.proc = subprocess.Popen(args, cwd=REPO, env=ENV, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            match = DASHBOARD_RE.search(line)
            if match:
                self.base, self.hostport, self.token = match.group(1), match.group(2), match.group(3)
                break
        else:
            raise RuntimeError("the server exited before printing its Dashboard line")
        self.port = int(self.hostport.rsplit(":", 1)[1])
        self.ws_url = self.base.replace("http", "ws", 1) + "/ws"
        self.headers = {"Authorization": f"Bearer {self.token}"}
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        """Keep reading the server's stdout so it never blocks on a full pipe."""
        assert self.proc.stdout is not None
        for _ in self.proc.stdout:
            pass

    def status(self) -> dict[str, Any]:
        import httpx

        return httpx.get(f"{self.base}/api/status", headers=self.headers, timeout=60).json()

    def wait_running(self) -> None:
        deadline = time.monotonic() + 180
        while self.status()["state"] != "running":
            if time.monotonic() > deadline:
                raise RuntimeError("the trainer did not start")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def serve_loop(steps: int, step_ms: float) -> dict[str, dict[str, float]]:
    """Steps/s of a served run while a WebSocket client reads everything it is sent, and of the bare loop.

    The client only drains its socket: a browser's CPU is on the user's laptop, not on the
    training machine, so the client here should cost the trainer's machine next to nothing.
    """
    with tempfile.TemporaryDirectory() as tmp:
        run_dir, result = Path(tmp) / "run", Path(tmp) / "result.json"
        served = Served(steps, step_ms, "spin", run_dir, paired.settings(step_ms, result))
        try:
            sock = websocket_socket(served.port, served.hostport, served.token)
            received = [0]
            reader = threading.Thread(target=drain, args=(sock, received), daemon=True)
            reader.start()
            while served.status()["state"] not in ("finished", "stopped", "crashed"):
                time.sleep(0.5)
            sock.close()
            reader.join(10)
            if received[0] < steps * 50:  # ~100 bytes or more per metrics message
                raise RuntimeError(f"the WebSocket client got only {received[0]} bytes")
        finally:
            served.stop()
        return paired.read_result(result)


def drain(sock: socket.socket, received: list[int]) -> None:
    with contextlib.suppress(OSError):
        while chunk := sock.recv(1 << 16):
            received[0] += len(chunk)


def bench_loop(args: argparse.Namespace) -> None:
    print("(a) loop overhead: serve mode with a WebSocket client reading everything, vs a bare PyTorch loop")
    print(f"{'step':>8} {'clock':>6} {'bare':>9} {'serve+ws':>9} {'ratio':>6} {'range':>13} {'target':>7}")
    for step_ms, steps, target in ((1.0, args.steps_1ms, 0.98), (0.1, args.steps_01ms, 0.95)):
        runs = [serve_loop(steps, step_ms) for _ in range(args.repeats)]
        for clock, bare, served, ratio, low, high in paired.summary(runs):
            print(f"{step_ms:>6}ms {clock:>6} {bare:>9.1f} {served:>9.1f} {ratio:>6.3f} {low:>6.3f}-{high:<6.3f} "
                  f"{target:>7}", flush=True)
    print("ratio: median over the repeats of served/bare steps/s (range: lowest-highest repeat)")


# -- (b) fan-out -----------------------------------------------------------------------------------

class InProcessServer:
    """The real app (read-only, over an empty run) under uvicorn in a thread of this process.

    A publisher thread feeds its hub at a fixed rate, the way the supervisor's pipe reader does,
    so the fan-out is measured at exactly the target rate whatever a trainer could reach here.
    """

    def __init__(self, run_dir: Path) -> None:
        from server.app import create_app
        from server.auth import new_token
        from server.serve import Server, bind_socket, uvicorn_config
        from server.settings import ServerSettings

        self.sock = bind_socket("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.settings = ServerSettings(token=new_token(), run_dir=run_dir, port=self.port, read_only=True)
        self.app = create_app(self.settings)
        self.server = Server(uvicorn_config(self.app, self.settings), on_stop=lambda: None, on_abort=lambda: None)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        self.hostport = f"127.0.0.1:{self.port}"
        self.token = self.settings.token
        self.ws_url = f"ws://{self.hostport}/ws"

    def _run(self) -> None:
        self.loop.run_until_complete(self.server.serve(sockets=[self.sock]))

    def publish_for(self, seconds: float, rate: float, stop: threading.Event) -> int:
        """Metrics messages at ``rate``/s in 10 ms batches, as a fast trainer's pipe delivers them."""
        hub = self.app.state.ctx.hub
        per_batch = max(1, round(rate / 100))
        sent, start = 0, time.perf_counter()
        while not stop.is_set() and time.perf_counter() - start < seconds:
            now = time.time()
            batch = [{"type": "metrics", "step": sent + i, "time": now,
                      "values": {"train/loss": 1.0, "train/lr": 1e-3, "train/grad_norm": 0.5}}
                     for i in range(per_batch)]
            self.loop.call_soon_threadsafe(lambda b=batch: [hub.broadcast(m) for m in b])
            sent += per_batch
            time.sleep(max(0.0, start + sent / rate - time.perf_counter()))
        return sent

    def stats(self) -> dict[str, int]:
        future = asyncio.run_coroutine_threadsafe(_stats(self.app.state.ctx.hub), self.loop)
        return future.result(30)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


async def _stats(hub: Any) -> dict[str, int]:
    return hub.stats()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def websocket_socket(port: int, hostport: str, token: str, rcvbuf: int | None = None) -> socket.socket:
    """A raw socket past the WebSocket handshake (reading it, or not, is up to the caller)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET /ws HTTP/1.1\r\nHost: {hostport}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                  f"Authorization: Bearer {token}\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    if not head.startswith(b"HTTP/1.1 101"):
        raise RuntimeError(f"WebSocket handshake refused: {head[:60]!r}")
    return sock


async def client_latencies(url: str, token: str, clients: int, duration: float) -> list[float]:
    """Run in a separate process: ``clients`` readers; latency = receive time - publish time.

    Prints ``ready`` once every client is connected, so the publisher starts the clock then.
    """
    from websockets.asyncio.client import connect

    latencies: list[float] = []
    sockets = [await connect(url, additional_headers={"Authorization": f"Bearer {token}"}, open_timeout=60,
                             max_queue=None) for _ in range(clients)]
    print("ready", flush=True)
    end = time.time() + duration

    async def read(ws: Any) -> None:
        while (left := end - time.time()) > 0:
            try:
                text = await asyncio.wait_for(ws.recv(), timeout=left)
            except TimeoutError:
                break
            now = time.time()
            message = json.loads(text)
            if message["type"] == "metrics":
                latencies.append(now - message["time"])
        await ws.close()

    await asyncio.gather(*(read(ws) for ws in sockets))
    return latencies


def run_clients(server: InProcessServer, clients: int, duration: float) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, __file__, "--clients-of", server.ws_url, server.token, str(clients),
                             str(duration)], cwd=REPO, env=ENV, stdout=subprocess.PIPE, text=True)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def fanout_phase(server: InProcessServer, stalled: bool, duration: float, rss: list[int]) -> tuple[float, float, float]:
    # a stalled client: handshake, then never read (a tiny receive buffer makes the stall bite at once)
    sock = websocket_socket(server.port, server.hostport, server.token, rcvbuf=1024) if stalled else None
    clients = run_clients(server, 19, duration + 2)
    assert clients.stdout is not None and clients.stdout.readline().strip() == "ready"
    stop = threading.Event()

    def sample_rss() -> None:
        while not stop.wait(1.0):
            rss.append(rss_kib(os.getpid()))

    sampler = threading.Thread(target=sample_rss, daemon=True)
    sampler.start()
    sent = server.publish_for(duration, 1000.0, stop)
    stop.set()
    out, _ = clients.communicate(timeout=120)
    if sock is not None:
        sock.close()
    latencies = json.loads(out)
    return percentile(latencies, 0.5), percentile(latencies, 0.99), len(latencies) / 19 / max(sent, 1)


def bench_fanout(args: argparse.Namespace) -> None:
    print(f"\n(b) fan-out: 1000 metrics messages/s to 20 clients, {args.duration:g} s per phase")
    rss: list[int] = []
    with tempfile.TemporaryDirectory() as tmp:
        server = InProcessServer(Path(tmp))
        try:
            fanout_phase(server, False, min(args.duration, 3.0), [])  # warm-up, not measured
            rows = []
            for i in range(args.repeats):  # ABBA order: neither phase always runs first
                order = (False, True) if i % 2 == 0 else (True, False)
                phases = {stalled: fanout_phase(server, stalled, args.duration, rss) for stalled in order}
                rows.append((phases[False], phases[True]))
            stats = server.stats()
        finally:
            server.close()
    p50 = [statistics.median(r[i][0] for r in rows) * 1000 for i in (0, 1)]
    p99 = [statistics.median(r[i][1] for r in rows) * 1000 for i in (0, 1)]
    got = [statistics.median(r[i][2] for r in rows) for i in (0, 1)]
    print(f"{'':>24} {'p50 ms':>8} {'p99 ms':>8} {'delivered':>10}")
    print(f"{'19 live, none stalled':>24} {p50[0]:>8.2f} {p99[0]:>8.2f} {got[0]:>10.1%}")
    print(f"{'19 live + 1 stalled':>24} {p50[1]:>8.2f} {p99[1]:>8.2f} {got[1]:>10.1%}")
    print(f"p99 ratio stalled/none: {p99[1] / p99[0]:.2f} (target <= 1.2); p50 ratio {p50[1] / p50[0]:.2f}")
    print(f"server process RSS: first {rss[0] / 1024:.1f} MiB, max {max(rss) / 1024:.1f} MiB, "
          f"last {rss[-1] / 1024:.1f} MiB; messages thinned for the stalled client: {stats['ws_dropped_messages']}")


# -- (c) command round trip -----------------------------------------------------------------------

def bench_command(args: argparse.Namespace) -> None:
    import httpx

    print("\n(c) POST /command/status round trip, trainer at 1 ms steps")
    with tempfile.TemporaryDirectory() as tmp:
        served = Served(10**9, 1.0, "spin", Path(tmp) / "run")
        try:
            served.wait_running()
            while not served.status().get("steps_per_s"):
                time.sleep(0.2)
            step_s = 1 / served.status()["steps_per_s"]
            times = []
            with httpx.Client(base_url=served.base, headers=served.headers, timeout=60) as client:
                for _ in range(args.commands):
                    started = time.perf_counter()
                    assert client.post("/command/status").status_code == 200
                    times.append(time.perf_counter() - started)
        finally:
            served.stop()
    median, p99 = statistics.median(times) * 1000, percentile(times, 0.99) * 1000
    print(f"median {median:.2f} ms, p99 {p99:.2f} ms; one step {step_s * 1000:.2f} ms; "
          f"median - step = {median - step_s * 1000:.2f} ms (target <= 50 ms)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps-1ms", type=int, default=2000)
    parser.add_argument("--steps-01ms", type=int, default=5000)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per fan-out phase (target: 60)")
    parser.add_argument("--commands", type=int, default=200)
    parser.add_argument("--only", default="loop,fanout,command")
    parser.add_argument("--clients-of", nargs=4, metavar=("URL", "TOKEN", "N", "SECONDS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.clients_of:
        url, token, n, seconds = args.clients_of
        print(json.dumps(asyncio.run(client_latencies(url, token, int(n), float(seconds)))))
        return
    torch.set_num_threads(1)
    parts = set(args.only.split(","))
    if "loop" in parts:
        bench_loop(args)
    if "fanout" in parts:
        bench_fanout(args)
    if "command" in parts:
        bench_command(args)


if __name__ == "__main__":
    main()
