"""kill -9 inside DELETE ?rebase=true, then a restart, on the embedded model: every committed edit
comes back intact and replayed, and the model answers as the journal says (bit-identical prompt
log-probabilities): with the later edit's old delta before the row switch, its rebased delta
after it. The process dies at the rebase's crash points (editserve/faults.py REBASE_POINTS).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest

from editserve.faults import REBASE_POINTS
from tests.integration.conftest import LiveServer
from tests.reliability.test_crash_recovery import (
    EIFFEL,
    JAPAN,
    crash_during,
    journal_view,
    post_edit,
    probe_logprobs,
)

pytestmark = [pytest.mark.integration, pytest.mark.reliability]


def payloads(state_dir: Path) -> list[str]:
    return sorted(p.name for p in (state_dir / "edits").iterdir())


def delete(url: str, edit_id: str, rebase: bool = False) -> httpx.Response:
    suffix = "?rebase=true" if rebase else ""
    return httpx.delete(f"{url}/edits/{edit_id}{suffix}", timeout=300)


def test_kill_9_inside_a_rebase_loses_no_committed_edit(tmp_path: Path) -> None:
    # Two committed ROME edits; every scenario below starts from a copy of this state folder.
    setup = LiveServer(tmp_path / "setup", tmp_path).start()
    try:
        base = probe_logprobs(setup.url)
        first = post_edit(setup.url, EIFFEL).json()["id"]
        second = post_edit(setup.url, JAPAN).json()["id"]
    finally:
        setup.stop()

    def server_on_copy(name: str) -> LiveServer:
        shutil.copytree(tmp_path / "setup", tmp_path / name)
        (tmp_path / f"logs-{name}").mkdir()
        return LiveServer(tmp_path / name, tmp_path / f"logs-{name}")

    # What the journal must come back as: a plain undo keeps the second edit's old delta...
    plain = server_on_copy("plain").start()
    try:
        assert delete(plain.url, first).status_code == 200
        with_old = probe_logprobs(plain.url)
        plain_version = httpx.get(f"{plain.url}/health").json()["model_version"]
    finally:
        plain.stop()
    # ...a finished rebase gives it a new one, and a restart replays that.
    done = server_on_copy("rebased").start()
    try:
        r = delete(done.url, first, rebase=True)
        assert r.status_code == 200 and r.json()["rebased"] == [second], r.text
        with_new = probe_logprobs(done.url)
        assert with_new != with_old  # recomputed without the first edit: another delta
        done.stop()
        done.start()
        assert probe_logprobs(done.url) == with_new
    finally:
        done.stop()

    expected = {"after_rebase_payload": with_old, "after_rebase_switch": with_new}
    for point in REBASE_POINTS:
        server = server_on_copy(point)
        try:
            crash_during(server, point, lambda url=server.url: delete(url, first, rebase=True))
            server.start()
            assert journal_view(server.url) == [(first, "undone"), (second, "applied")], point
            health = httpx.get(f"{server.url}/health").json()
            assert health["edits_not_replayed"] == [], (point, server.log())
            assert "NOT replayed" not in server.log_path.read_text()
            assert probe_logprobs(server.url) == expected[point], point
            # One payload per row, the one it names; the crash's leftover was swept.
            files = payloads(tmp_path / point)
            assert len(files) == 2 and f"{first}.safetensors" in files, (point, files)
            if point == "after_rebase_payload":
                assert f"{second}.safetensors" in files
                # The versions served mid-rebase are not these weights: a fresh one.
                assert health["model_version"] > plain_version
            else:
                assert any(f.startswith(f"{second}.rebase-") for f in files), files
            # The later edit is live and undoes exactly.
            assert delete(server.url, second).status_code == 200
            assert probe_logprobs(server.url) == base, point
        finally:
            server.stop()
