"""The dynvm CLI client against a real running service and simulator."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from dynvm.cli import build_cli


def run(service, *args: str, token: str | None = None):  # type: ignore[no-untyped-def]
    env = {"DYNVM_SERVER": service.url, "DYNVM_TOKEN": token or ""}
    return CliRunner().invoke(build_cli(), list(args), env=env)


def test_get_ls_extend_release(serve):
    service = serve(hosts=2)
    got = run(service, "get", "--os", "centos", "--count", "2", "--name", "cli")
    assert got.exit_code == 0, got.output
    lines = [line for line in got.stdout.splitlines() if line.startswith("cli")]
    assert [line.split()[0] for line in lines] == ["cli1", "cli2"]
    assert all(line.split()[1].startswith("127.77.") for line in lines)
    listed = json.loads(run(service, "ls", "--json").stdout)
    assert sorted(lease["name"] for lease in listed) == ["cli1", "cli2"]
    extended = run(service, "extend", "cli1", "30")
    assert extended.exit_code == 0
    assert "cli1 now expires in 30 min" in extended.stdout
    released = run(service, "release", "cli1", "cli2", "--json")
    assert json.loads(released.stdout) == ["cli1", "cli2"]
    assert json.loads(run(service, "ls", "--json").stdout) == []


def test_get_json_for_scripts(serve):
    service = serve()
    result = run(service, "get", "--name", "scripted", "--json")
    assert result.exit_code == 0
    status = json.loads(result.stdout)
    assert status["state"] == "ready"
    assert status["vms"][0]["name"] == "scripted"


def test_failures_exit_non_zero_with_the_reason(serve):
    service = serve()
    unknown = run(service, "get", "--os", "rhel9", "--name", "x")
    assert unknown.exit_code == 1
    assert "unknown OS 'rhel9'" in unknown.output
    missing = run(service, "release", "nothing-here")
    assert missing.exit_code == 1
    assert "no VM named nothing-here" in missing.output


def test_capacity_and_tokens(serve):
    service = serve()
    capacity = json.loads(run(service, "capacity", "--json").stdout)
    assert capacity["capacity"]["centos"] == 8
    assert capacity["hosts"][0]["state"] == "up"
    token = service.services.tokens.create("dana")
    run(service, "get", "--name", "owned", token=token)
    assert service.http.get("/api/v1/leases/owned").json()["caller"] == "dana"
    refused = run(service, "extend", "owned", "5", token=service.services.tokens.create("eve"))
    assert refused.exit_code == 1
    assert "belongs to dana" in refused.output


def test_an_unreachable_server_is_a_clear_error():
    result = CliRunner().invoke(build_cli(), ["ls"], env={"DYNVM_SERVER": "http://127.0.0.1:9"})
    assert result.exit_code == 1
    assert "cannot reach dynvm at http://127.0.0.1:9" in result.output


def test_release_tries_every_name_and_reports_each(serve):
    service = serve()
    assert run(service, "get", "--name", "kept").exit_code == 0
    result = run(service, "release", "ghost", "kept")
    assert result.exit_code == 1
    assert "released kept" in result.stdout
    assert "ghost: Error: no VM named ghost" in result.output
    assert service.services.engine.lease_store.active() == []


def test_ls_by_user_extend_says_when_capped_and_version(serve):
    service = serve()
    run(service, "get", "--name", "mine")
    run(service, "get", "--name", "theirs")
    listed = json.loads(run(service, "ls", "--user", "mine", "--json").stdout)
    assert [lease["name"] for lease in listed] == ["mine"]
    capped = run(service, "extend", "mine", "100000")
    assert capped.exit_code == 0
    assert "capped at the maximum" in capped.stdout
    from dynvm import __version__

    assert run(service, "--version").stdout.strip() == f"dynvm {__version__}"


def test_help_keeps_the_config_keys_in_brackets():
    result = CliRunner().invoke(build_cli(), ["serve", "--help"], env={"COLUMNS": "200"})
    assert "[common] db.url" in result.output
    assert "[xenhostN]" in CliRunner().invoke(build_cli(), ["get", "--help"], env={"COLUMNS": "200"}).output


def test_a_name_clash_hint_releases_exactly_the_names_that_clash(serve):
    service = serve()
    assert service.get("/getservers/clash", count=2).status_code == 200
    same = service.get("/getservers/clash", count=2)
    assert same.status_code == 409
    assert "release them first (releaseservers/clash?count=2)" in same.text
    partly = service.get("/getservers/clash", count=3)
    assert "clash1, clash2 already leased by dynvm: release them first (dynvm release clash1 clash2)" in partly.text


def test_get_wait_queues_until_room_frees(serve):
    import threading

    from dynvm.states import RequestState

    from ..sim.simtools import wait_for

    service = serve(host_cpus=8)  # room for two CentOS VMs
    assert run(service, "get", "--count", "2", "--name", "holder").exit_code == 0
    result: dict[str, object] = {}
    waiter = threading.Thread(target=lambda: result.update(r=run(service, "get", "--name", "waits", "--wait", "5m")))
    waiter.start()
    wait_for(lambda: service.services.engine.request_store.in_state(RequestState.QUEUED), timeout=10)
    assert run(service, "release", "holder1").exit_code == 0
    waiter.join(timeout=60)
    got = result["r"]
    assert got.exit_code == 0, got.output
    assert got.stdout.split()[0] == "waits"


def test_the_live_line_shows_the_place_in_the_queue_and_the_eta():
    from dynvm.cli import _progress_table

    status = {"id": "abcdef123456", "state": "queued", "position": 3, "eta": "2026-12-01T12:00:00Z"}
    table = _progress_table({**status, "eta_seconds": 42.0, "vms": []})
    assert table.title == "request abcdef12: queued, number 3 in the queue, ready in about 42 s (2026-12-01T12:00:00Z)"


def test_ctrl_c_on_a_queued_get_cancels_the_request(serve):
    import os
    import signal
    import subprocess
    import sys

    from dynvm.states import RequestState

    service = serve(host_cpus=8)
    assert run(service, "get", "--count", "2", "--name", "holder").exit_code == 0
    env = {**os.environ, "DYNVM_SERVER": service.url, "DYNVM_TOKEN": ""}
    cli = [sys.executable, "-m", "dynvm", "get", "--name", "impatient", "--wait", "10m"]
    process = subprocess.Popen(cli, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = process.stderr.readline()  # the CLI has its request's answer: it says where it is
    assert ": queued" in first
    [queued] = service.services.engine.request_store.in_state(RequestState.QUEUED)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=30)
    assert process.returncode == 130
    assert "cancelled" in err
    assert service.services.engine.request_store.get(queued.id).state == RequestState.CANCELLED


def test_ls_reads_whole_at_80_columns(serve):
    service = serve(hosts=2)
    name = "ci-integration-build-4711-"
    got = run(service, "get", "--count", "2", "--name", name, "--expires", "90")
    assert got.exit_code == 0, got.output
    env = {"DYNVM_SERVER": service.url, "DYNVM_TOKEN": "", "COLUMNS": "80"}
    listed = CliRunner().invoke(build_cli(), ["ls"], env=env, terminal_width=80)
    assert listed.exit_code == 0, listed.output
    assert [line for line in listed.stdout.splitlines() if len(line) > 80] == []
    assert "…" not in listed.stdout
    for n in (1, 2):  # whole on one line, as release needs it
        [row] = [line for line in listed.stdout.splitlines() if f"{name}{n} " in line]
        assert "127.77." in row
    longer = "jenkins-myorg-myproject-feature-branch-build-123"  # too long for a row of seven columns
    assert run(service, "get", "--name", longer, "--expires", "90").exit_code == 0
    listed = CliRunner().invoke(build_cli(), ["ls"], env=env, terminal_width=80)
    assert [line for line in listed.stdout.splitlines() if len(line) > 80] == []
    lines = listed.stdout.splitlines()
    assert longer in lines, listed.stdout
    at = lines.index(longer)  # its name whole, on a line of its own
    assert "centos · host" in lines[at + 1]
    assert "127.77." in lines[at + 1]
    assert "expires in 90 min" in lines[at + 1]
    assert f"{name}1" in listed.stdout  # and the others too, whole
