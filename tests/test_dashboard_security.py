"""Issue 18, items 4 and 6, against real Voila processes: Host/Origin allow-list, a cap on kernels, idle kernels culled,
no tracebacks in pages, and `cyber-moe dashboard` stopping Voila and every kernel on SIGTERM."""

import base64
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from cyber_moe.dashboard import start, stop, wait_until_serving
from cyber_moe.testing import free_port


def _children(pid: int) -> set[int]:
    "Every live descendant of `pid` (from /proc)."
    parents: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(d.name))
    out, todo = set(), [pid]
    while todo:
        for c in parents.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _kernels(pid: int) -> list[int]:
    return [c for c in _children(pid) if b"ipykernel" in Path(f"/proc/{c}/cmdline").read_bytes()] if _alive(pid) else []


def _get(port: int, path: str = "/", **headers) -> tuple[int, str]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    "A two-cell notebook: one prints, one raises an error carrying a marker that must not reach the page."
    d = tmp_path_factory.mktemp("tiny")
    cells = [
        {"cell_type": "code", "id": f"c{i}", "metadata": {}, "execution_count": None, "outputs": [], "source": [src]}
        for i, src in enumerate(
            [
                "print('hello dashboard')",
                "raise ValueError('SECRET-MARKER-42 in ' + __file__ if '__file__' in dir() else 'SECRET-MARKER-42')",
            ]
        )
    ]
    nb = {
        "cells": cells,
        "metadata": {"kernelspec": {"display_name": "python3", "language": "python", "name": "python3"}},
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    (d / "tiny.ipynb").write_text(json.dumps(nb))
    return d / "tiny.ipynb"


@pytest.fixture(scope="module")
def voila(tiny, tmp_path_factory):
    "Voila on the tiny notebook with the dashboard's launcher: 2 kernels at most, culled after 4 idle seconds."
    port = free_port()
    log = open(tmp_path_factory.mktemp("voila-log") / "voila.log", "w")
    proc = start(
        outputs_dir=tiny.parent,
        notebook=tiny,
        port=port,
        max_kernels=2,
        cull_idle_seconds=4,
        cull_interval_seconds=1,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until_serving(f"http://127.0.0.1:{port}/", timeout=120, proc=proc)
        yield proc, port
    finally:
        stop(proc, timeout=30)
        log.close()


def test_foreign_host_and_origin_are_refused(voila):
    "DNS rebinding: a page of evil.example whose name now resolves to 127.0.0.1 sends Host: evil.example (and its Origin)."
    proc, port = voila
    assert _get(port, Host="evil.example")[0] == 403
    assert _get(port, Host=f"evil.example:{port}", Origin=f"http://evil.example:{port}")[0] == 403
    assert _get(port, "/voila/static/voila.js", Host="evil.example")[0] == 403
    assert _get(port, "/api/kernels/00000000-0000-0000-0000-000000000000/channels", Host="evil.example")[0] == 403
    assert _get(port, Origin="http://evil.example")[0] == 403  # cross-site, to the right host
    assert _kernels(proc.pid) == []  # none of these started a kernel
    assert _get(port, "/voila/static/voila.js", Host=f"localhost:{port}")[0] == 200


def test_kernels_capped_culled_and_no_tracebacks(voila):
    proc, port = voila
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(_get(port))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(c for c, _ in results)
    assert codes == [200, 200, 503, 503], codes  # 4 page views at once, 2 kernels at most
    page = next(body for c, body in results if c == 200)
    assert "hello dashboard" in page
    assert "SECRET-MARKER-42" not in page and "Traceback" not in page and "ValueError" not in page
    assert 1 <= len(_kernels(proc.pid)) <= 2
    deadline = time.monotonic() + 60  # the pages never connect: culled
    while _kernels(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _kernels(proc.pid) == []
    assert _get(port)[0] == 200  # capacity is back


def _ws_handshake(port: int, kernel_id: str, origin: str, host: str | None = None) -> int:
    "The HTTP status of a websocket upgrade to the kernel channels of `kernel_id`, sent from `origin` naming `host` (default 127.0.0.1:`port`)."
    key = base64.b64encode(os.urandom(16)).decode()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(
            (
                f"GET /api/kernels/{kernel_id}/channels HTTP/1.1\r\nHost: {host or f'127.0.0.1:{port}'}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nOrigin: {origin}\r\n\r\n"
            ).encode()
        )
        return int(s.recv(4096).split(b" ", 2)[1])


def test_foreign_origin_websocket_is_refused(voila):
    """A script on evil.example opening the websocket of a live kernel: refused, also after DNS rebinding (Host and Origin both
    evil.example, which jupyter_server's own same-origin check lets through); the page's own origin gets the upgrade (101)."""
    proc, port = voila
    code, page = _get(port)
    assert code == 200
    kernel_id = re.search(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", page)[0]
    assert _ws_handshake(port, kernel_id, "http://evil.example") == 403
    assert _ws_handshake(port, kernel_id, f"http://evil.example:{port}", host=f"evil.example:{port}") == 403  # rebinding
    assert _ws_handshake(port, kernel_id, f"http://127.0.0.1:{port}") == 101


def test_cli_dashboard_stops_voila_and_kernels_on_sigterm(cli, tmp_path):
    port = free_port()
    log = open(tmp_path / "cli.log", "w")
    proc = subprocess.Popen(
        [cli, "dashboard", "--outputs", str(tmp_path / "outputs"), "--port", str(port)], stdout=log, stderr=subprocess.STDOUT
    )
    seen: set[int] = set()
    try:
        wait_until_serving(f"http://127.0.0.1:{port}/", timeout=120, proc=proc)
        assert _get(port)[0] == 200  # a page view: one kernel
        seen = _children(proc.pid)
        assert any(b"ipykernel" in Path(f"/proc/{c}/cmdline").read_bytes() for c in seen if _alive(c)), "no kernel started"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) is not None
        deadline = time.monotonic() + 30
        while any(_alive(c) for c in seen) and time.monotonic() < deadline:
            time.sleep(0.3)
        assert not [c for c in seen if _alive(c)], "processes left running after SIGTERM"
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        for c in seen | _children(proc.pid):
            try:
                os.kill(c, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
