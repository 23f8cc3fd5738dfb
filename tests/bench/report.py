"""The bench's output: a console table, JSON, and a markdown table for the README; goals as ratios.

The goals are issue 6's, each computed from rows of the same run.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .load import Row


@dataclass
class Goal:
    """One goal of issue 6 and where this run put it."""

    goal: str
    measured: str
    met: bool | None  # None: could not be computed (a row is missing)

    @property
    def verdict(self) -> str:
        return "n/a" if self.met is None else ("met" if self.met else "not met")


DIRECT_AS_GATEWAY = "server-everything direct (session at"


def find(rows: Iterable[Row], group: str, name_start: str, concurrency: int) -> Row | None:
    """The measured row of `group` whose name starts with `name_start`, at `concurrency`."""
    for row in rows:
        if row.group == group and row.name.startswith(name_start) and row.concurrency == concurrency and row.requests:
            return row
    return None


def goals(rows: Sequence[Row], memory: dict[str, Any]) -> list[Goal]:
    found: list[Goal] = []

    direct_1 = find(rows, "stdio", "direct pipes, 1 process (era", 1)
    for era in ("handshake era", "2026-07-28"):
        via = find(rows, "stdio", f"gateway, {era}", 1)
        if direct_1 and via:
            delta = via.p50_ms - direct_1.p50_ms
            found.append(Goal(f"stdio c=1 ({era} client): p50 within 0.35 ms of direct pipes",
                              f"{via.p50_ms:.2f} - {direct_1.p50_ms:.2f} = +{delta:.2f} ms", delta <= 0.35))
        else:
            found.append(Goal(f"stdio c=1 ({era} client): p50 within 0.35 ms of direct pipes", "missing rows", None))

    peers = [row for row in (find(rows, "stdio", name, 8) for name in ("mcp-proxy", "supergateway")) if row]
    best_peer = max(peers, key=lambda row: row.rps) if peers else None
    direct_4 = find(rows, "stdio", "direct pipes, 4 processes", 8)
    for era in ("handshake era", "2026-07-28"):
        via = find(rows, "stdio", f"gateway, {era}", 8)
        if via and best_peer:
            ratio = via.rps / best_peer.rps
            found.append(Goal(f"stdio c=8, 4 processes ({era} client): >= 1.5x the best peer",
                              f"{via.rps:,.0f} / {best_peer.rps:,.0f} ({best_peer.name.split()[0]}) = {ratio:.2f}x",
                              ratio >= 1.5))
        else:
            found.append(Goal(f"stdio c=8 ({era} client): >= 1.5x the best peer", "missing rows", None))
        if via and direct_4:
            ratio = via.rps / direct_4.rps
            found.append(Goal(f"stdio c=8 ({era} client): aim 0.75x direct 4 processes",
                              f"{via.rps:,.0f} / {direct_4.rps:,.0f} = {ratio:.2f}x", ratio >= 0.75))

    nginx_8, nginx_1 = find(rows, "http", "nginx", 8), find(rows, "http", "nginx", 1)
    # What the server alone takes longer in the protocol version of the gateway's own session.
    everything_1 = find(rows, "http", "server-everything direct (session)", 1)
    everything_newest_1 = find(rows, "http", DIRECT_AS_GATEWAY, 1)
    server_extra = (f"; the server alone takes {everything_newest_1.p50_ms - everything_1.p50_ms:+.2f} ms more in the "
                    "version of the gateway's own session" if everything_1 and everything_newest_1 else "")
    for mode in ("gateway, handshake era, client session", "gateway, handshake era, no session",
                 "gateway, 2026-07-28 client (bridged"):
        via_8, via_1 = find(rows, "http", mode, 8), find(rows, "http", mode, 1)
        label = mode.removeprefix("gateway, ").removesuffix(" (bridged")
        if via_8 and nginx_8:
            ratio = via_8.rps / nginx_8.rps
            found.append(Goal(f"HTTP c=8 ({label}): >= 0.75x nginx proxy_pass",
                              f"{via_8.rps:,.0f} / {nginx_8.rps:,.0f} = {ratio:.2f}x", ratio >= 0.75))
        else:
            found.append(Goal(f"HTTP c=8 ({label}): >= 0.75x nginx proxy_pass", "missing rows", None))
        if via_1 and nginx_1:
            delta = via_1.p50_ms - nginx_1.p50_ms
            bridged = "client session" not in mode
            found.append(Goal(f"HTTP c=1 ({label}): p50 within 0.3 ms of nginx",
                              f"{via_1.p50_ms:.2f} - {nginx_1.p50_ms:.2f} = +{delta:.2f} ms"
                              + (server_extra if bridged else ""), delta <= 0.3))

    loop = memory.get("rss_loop") or {}
    if loop.get("requests"):
        growth = loop["growth_mb"]
        short = loop["requests"] < 100_000
        found.append(Goal("gateway RSS grows < 10 MB over 100,000 requests",
                          f"+{growth:.1f} MB over {loop['requests']:,} requests "
                          f"({loop['before_mb']:.1f} -> {loop['after_mb']:.1f} MB, master+workers)"
                          + (" - a shorter loop than the goal's" if short else ""),
                          False if growth >= 10 else (None if short else True)))
    else:
        found.append(Goal("gateway RSS grows < 10 MB over 100,000 requests", "not run", None))
    return found


def machine() -> dict[str, Any]:
    """What the run ran on, for the README."""
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30

    def version(argv: list[str]) -> str:
        if not shutil.which(argv[0]) and not Path(argv[0]).exists():
            return "not installed"
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        except OSError:
            return "?"
        text = (done.stdout + done.stderr).strip().splitlines()
        return text[0].split(" [")[0].replace("nginx version: ", "") if text else "?"

    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(memory_gb, 1),
        "kernel": platform.release(), "python": platform.python_version(),
        "wrk": version(["wrk", "--version"]), "nginx": version(["/usr/sbin/nginx", "-v"]),
        "node": version(["node", "--version"]), "load_average_at_start": os.getloadavg(),
    }


def _fmt_row(row: Row) -> list[str]:
    if not row.requests:
        return [row.group, row.name, str(row.concurrency), "-", "-", "-", "-", "-", row.note]
    busy = row.extra.get("other_cpu_percent")
    return [row.group, row.name, str(row.concurrency), f"{row.rps:,.0f}", f"{row.p50_ms:.2f}", f"{row.p99_ms:.2f}",
            str(row.failures), "-" if busy is None else f"{busy:.0f}%", row.note]


HEADER = ["group", "what", "c", "req/s", "p50 ms", "p99 ms", "failures", "busy elsewhere", "note"]


def console(rows: Sequence[Row], goal_list: Sequence[Goal], memory: dict[str, Any], scaling: Sequence[Row]) -> str:
    table = [HEADER, *(_fmt_row(row) for row in [*rows, *scaling])]
    widths = [max(len(line[i]) for line in table) for i in range(len(HEADER))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)).rstrip() for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    lines.extend(_memory_lines(memory))
    lines.append("")
    lines.extend(f"[{goal.verdict:>7}] {goal.goal}: {goal.measured}" for goal in goal_list)
    return "\n".join(lines)


def _memory_lines(memory: dict[str, Any]) -> list[str]:
    lines = []
    for label, key in (("at start", "ready"), ("after the measured rows", "after_rows"), ("at the end", "end")):
        snapshot = memory.get(key)
        if snapshot:
            lines.append(
                f"gateway memory {label}: master+workers RSS {snapshot['gateway_rss_mb']} MB "
                f"(PSS {snapshot['gateway_pss_mb']} MB; workers {snapshot['worker_rss_mb']} MB); "
                f"{snapshot['pooled_processes']} pooled processes RSS {snapshot['pooled_rss_mb']} MB "
                f"(PSS {snapshot['pooled_pss_mb']} MB)")
    loop = memory.get("rss_loop")
    if loop and loop.get("requests"):
        lines.append(f"RSS over {loop['requests']:,} requests ({loop['seconds']:.0f} s, {loop['mix']}): "
                     f"{loop['before_mb']} -> {loop['after_mb']} MB (+{loop['growth_mb']} MB), "
                     f"pooled processes {loop['pooled_before_mb']} -> {loop['pooled_after_mb']} MB, "
                     f"failures {loop['failures']}")
    streams = memory.get("idle_streams")
    if streams:
        release = streams["release"]
        lines.append(
            f"idle GET streams: {streams['held']} of {streams['wanted']} held ({streams['failed']} failed) in "
            f"{streams['open_seconds']} s; c=8 load beside them: throughput x{streams['throughput_ratio']}, "
            f"p99 x{streams['p99_ratio']} of the load alone; worker RSS {streams['rss_growth_kb_per_stream']} KB per "
            f"stream; client disconnect to upstream release: {release['released']} of {release['closed']} closed "
            f"streams released within {release['within_s']:g} s"
            + (f" (median {release['median_ms']} ms, max {release['max_ms']} ms)" if release["released"] else ""))
        sockets = streams.get("websockets")
        if sockets:
            release = sockets["release"]
            lines.append(
                f"idle WebSockets beside them: {sockets['held']} of {sockets['wanted']} held ({sockets['failed']} failed) "
                f"in {sockets['open_seconds']} s, {sockets['alive_after_load']} still open after the load "
                f"(/status: {sockets['status_gauge']}); worker RSS {sockets['rss_growth_kb_per_websocket']} KB per "
                f"WebSocket; client gone (FIN) to the worker dropping it: {release['released']} of "
                f"{release['closed']} within {release['within_s']:g} s"
                + (f" (median {release['median_ms']} ms, max {release['max_ms']} ms)" if release["released"] else ""))
    return lines


def markdown(rows: Sequence[Row], goal_list: Sequence[Goal], memory: dict[str, Any], scaling: Sequence[Row],
             info: dict[str, Any], settings: dict[str, Any]) -> str:
    intro = (f"Run of {info['date']} on {info['cores']} cores ({info['cpu']}), {info['memory_gb']} GB, "
             f"Linux {info['kernel']}, Python {info['python']}, {info['wrk']}, {info['nginx']}, node {info['node']}. "
             f"Settings: {', '.join(f'{k}={v}' for k, v in settings.items())}. "
             "\"busy elsewhere\" is CPU used by processes outside the bench during the row (100% = one core).")
    out = [intro, ""]
    out.append("| " + " | ".join(HEADER) + " |")
    out.append("|" + "|".join("---" for _ in HEADER) + "|")
    out.extend("| " + " | ".join(cell.replace("|", "\\|") for cell in _fmt_row(row)) + " |" for row in rows)
    if scaling:
        pools = sorted({row.extra["pool"] for row in scaling if row.group == "scaling stdio"})
        workers = sorted({row.extra["workers"] for row in scaling})
        title = ("Scaling, c=8, req/s (stdio: mcp-server-time, handshake-era client; HTTP: server-everything, "
                 "session pass-through):")
        out += ["", title, "",
                "| workers | " + " | ".join(f"stdio, pool {p}/worker" for p in pools) + " | HTTP |",
                "|---|" + "---|" * (len(pools) + 1)]
        for w in workers:
            cells = []
            for p in pools:
                row = next((r for r in scaling if r.group == "scaling stdio" and r.extra["workers"] == w
                            and r.extra["pool"] == p), None)
                cells.append(_cell(row))
            http = next((r for r in scaling if r.group == "scaling http" and r.extra["workers"] == w), None)
            out.append(f"| {w} | " + " | ".join(cells) + f" | {_cell(http)} |")
    out += ["", *(f"- {line}" for line in _memory_lines(memory))]
    out += ["", "| goal (issue 6) | measured | verdict |", "|---|---|---|"]
    out.extend(f"| {goal.goal} | {goal.measured} | {goal.verdict} |" for goal in goal_list)
    return "\n".join(out) + "\n"


def _cell(row: Row | None) -> str:
    if row is None or not row.requests:
        return "-"
    text = f"{row.rps:,.0f}"
    return text + (f" ({row.failures} failed)" if row.failures else "")


README_START = "<!-- bench:table:start -->"
README_END = "<!-- bench:table:end -->"


def update_readme(readme: Path, table: str) -> bool:
    """Put `table` between the README's bench markers; False if the README has none."""
    text = readme.read_text()
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        return False
    readme.write_text(text[: start + len(README_START)] + "\n" + table + text[end:])
    return True


def write(folder: Path, rows: Sequence[Row], goal_list: Sequence[Goal], memory: dict[str, Any],
          scaling: Sequence[Row], info: dict[str, Any], settings: dict[str, Any], leftovers: list[Any],
          log_problems: dict[str, dict[str, Any]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    data = {
        "machine": info, "settings": settings,
        "rows": [row.as_dict() for row in rows], "scaling": [row.as_dict() for row in scaling],
        "memory": memory,
        "goals": [{"goal": g.goal, "measured": g.measured, "verdict": g.verdict} for g in goal_list],
        "processes_left": leftovers,
        "gateway_log_problems": log_problems,
    }
    (folder / "results.json").write_text(json.dumps(data, indent=2) + "\n")
    table = markdown(rows, goal_list, memory, scaling, info, settings)
    if log_problems:
        table += "\nWarnings and errors in the gateways' logs during the run:\n\n" + "".join(
            f"- {name}: {p['count']}, first: `{p['first'][0][:240]}`\n" for name, p in log_problems.items())
    (folder / "table.md").write_text(table)
