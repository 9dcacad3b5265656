"""The read routes of a served run: status, metrics, events, checkpoints, the page and static files."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from tests.server.conftest import Served, pid_alive, read_json


def test_status_reports_the_state_step_and_trainer_pid(served: Served) -> None:
    status = served.status()
    assert status["state"] == "paused"
    assert status["step"] >= 3
    assert isinstance(status["pid"], int) and status["pid"] != served.proc.pid and pid_alive(status["pid"])
    assert status["exit_code"] is None and status["read_only"] is False
    assert {"iterations", "lr", "metrics_dropped", "ws_clients"} <= status.keys()


def test_metrics_without_names_returns_every_metric_downsampled(served: Served) -> None:
    with served.http() as client:
        everything = client.get("/api/metrics").json()
        assert "train/loss" in everything
        one = client.get("/api/metrics", params={"names": "train/loss", "max_points": 2}).json()
    assert list(one) == ["train/loss"]
    series = one["train/loss"]
    assert set(series) == {"step", "value", "min", "max"}
    assert 1 <= len(series["step"]) <= 2
    assert all(lo <= v <= hi for lo, v, hi in zip(series["min"], series["value"], series["max"], strict=True))


def test_metrics_honours_the_step_range(served: Served) -> None:
    with served.http() as client:
        params = {"names": "train/loss,train/lr", "from_step": 2, "to_step": 3}
        ranged = client.get("/api/metrics", params=params).json()
        inverted = client.get("/api/metrics", params={"names": "train/loss", "from_step": 5, "to_step": 2}).json()
        assert inverted == {"train/loss": {"step": [], "value": [], "min": [], "max": []}}
        assert client.get("/api/metrics", params={"max_points": 0}).status_code == 422
        assert client.get("/api/metrics", params={"max_points": 10**9}).status_code == 422
    assert ranged["train/loss"]["step"] == [2, 3]
    assert set(ranged) == {"train/loss", "train/lr"}


def test_events_since_id_returns_only_newer_events(served: Served) -> None:
    with served.http() as client:
        events = client.get("/api/events").json()
        assert events and events[0]["kind"] == "start"
        assert {"id", "time", "step", "kind", "data"} <= events[0].keys()
        newer = client.get("/api/events", params={"since_id": events[0]["id"]}).json()
        assert client.get("/api/events", params={"since_id": -1}).status_code == 422
    assert all(e["id"] > events[0]["id"] for e in newer)


def test_checkpoints_lists_checkpoints_and_exports_with_their_kind(served: Served) -> None:
    assert served.command("save").status_code == 200
    assert served.command("export", {"name": "listed"}).status_code == 200
    with served.http() as client:
        listing = client.get("/api/checkpoints").json()
    kinds = {item["kind"] for item in listing}
    assert kinds == {"checkpoint", "export"}
    checkpoint = next(item for item in listing if item["kind"] == "checkpoint")
    assert {"step", "path", "time", "bytes"} <= checkpoint.keys()
    assert any(item["kind"] == "export" and item["name"] == "listed" for item in listing)


def test_the_dashboard_page_renders_with_the_run_name(served: Served) -> None:
    with served.http() as client:
        page = client.get("/")
        assert client.get("/static/favicon.svg").status_code == 200
        assert client.get("/static/../server/cli.py").status_code == 404
    assert page.status_code == 200
    assert "run" in page.text and 'data-read-only="false"' in page.text
    assert page.headers["x-frame-options"] == "DENY"


def test_api_docs_need_no_cdn(served: Served) -> None:
    with served.http() as client:
        assert client.get("/docs").status_code == 404
        assert client.get("/redoc").status_code == 404
        schema = client.get("/openapi.json").json()
    assert "/api/metrics" in schema["paths"]


def test_server_json_is_private_and_names_the_url(served: Served) -> None:
    path = Path(served.status()["run_dir"]) / "server.json"
    info = read_json(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert info["port"] == served.port and info["pid"] == served.proc.pid
    assert info["url"].startswith(served.base) and served.token in info["url"]


def test_the_page_carries_the_metric_names_and_no_name_can_close_its_script(tmp_path: Path) -> None:
    import httpx

    from tests.server.conftest import InProcessServer
    from trainer_core.store import MetricsStore

    with MetricsStore(tmp_path / "metrics.sqlite") as store:
        store.log_metrics(1, {"train/loss": 1.0, "odd</script><b>": 2.0})
    server = InProcessServer(tmp_path)
    try:
        page = httpx.get(f"{server.base}/", headers={"Authorization": f"Bearer {server.token}"}).text
    finally:
        server.close()
    embedded = page.split('<script type="application/json" id="metric-names">', 1)[1].split("</script>", 1)[0]
    assert json.loads(embedded) == ["odd</script><b>", "train/loss"]
    assert "<" not in embedded
