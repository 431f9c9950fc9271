"""docs/grafana-dashboard.json only queries metrics a real server exports: every metric name
in every panel's query (and in the dashboard's variables) is a series scraped from
``/metrics`` of a ``phasecast serve`` process after it has served every kind of traffic the
panels chart."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from tests.support.clients import WSWatcher, sse_events
from tests.support.process import ServerProcess

from phasecast.client import PhasecastClient

DASHBOARD = Path(__file__).parents[2] / "docs" / "grafana-dashboard.json"
METRIC = re.compile(r"\bphasecast_[a-z0-9_]+")
# What the issue asks the dashboard to show, each as a metric it must chart.
REQUIRED = {
    "connections by transport": "phasecast_connections",
    "watchers": "phasecast_watchers",
    "updates by result": "phasecast_updates_total",
    "delivery latency percentiles": "phasecast_delivery_latency_seconds_bucket",
    "conflated states": "phasecast_messages_conflated_total",
}


def queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, expression) for every panel target and every query variable."""
    found = []
    for panel in dashboard["panels"]:
        assert panel.get("targets"), f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            found.append((panel["title"], target["expr"]))
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable["query"]
            found.append((f"variable {variable['name']}", query["query"] if isinstance(query, dict) else query))
    return found


async def scrape_after_traffic(server: ServerProcess, worker_token: str, viewer_token: str) -> set[str]:
    headers = {"Authorization": f"Bearer {worker_token}"}
    async with httpx.AsyncClient(base_url=server.url, headers=headers) as api:
        await api.post("/v1/jobs", json={"job_id": "charted", "owner": "alice"})
        watcher = await WSWatcher(server.url, viewer_token).connect()
        await watcher.subscribe("charted")
        await watcher.wait_seq("charted", 1)
        await api.post("/v1/jobs/charted/progress", json={"phase": "GENERATING", "phase_progress": 40})
        await api.post("/v1/jobs/charted/progress", json={"phase": "GENERATING", "phase_progress": 10})  # ignored
        refused = await api.post("/v1/jobs/charted/progress", headers={"Authorization": "Bearer nope"}, json={})
        assert refused.status_code == 401
        await api.post("/v1/jobs/charted/complete", json={})
        await watcher.wait_terminal("charted")
        await watcher.close()
        async with PhasecastClient(server.url, token=viewer_token, transports=("sse",)) as client:
            assert (await client.wait("charted")).terminal
        async for _ in sse_events(api, f"/v1/jobs/charted/events?access_token={viewer_token}", headers={"Authorization": ""}):
            break
        text = (await api.get("/metrics")).text
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


async def test_every_dashboard_query_names_a_metric_the_server_exports(
    sqlite_engine_url: str, tmp_path: Path, worker_token: str, make_token: Any
) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    with ServerProcess(sqlite_engine_url, log_path=tmp_path / "server.log") as server:
        exported = await scrape_after_traffic(server, worker_token, make_token("alice"))
    assert exported, "the server exported no metrics"
    charted: set[str] = set()
    for where, expression in queries(dashboard):
        names = set(METRIC.findall(expression))
        assert names, f"{where}: {expression!r} names no phasecast metric"
        missing = names - exported
        assert not missing, f"{where}: {sorted(missing)} not exported; the server has {sorted(exported)}"
        charted |= names
    for what, metric in REQUIRED.items():
        assert metric in charted, f"the dashboard does not chart {what} ({metric})"


def test_dashboard_is_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert dashboard["uid"]
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert {"x", "y", "w", "h"} <= panel["gridPos"].keys()
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
