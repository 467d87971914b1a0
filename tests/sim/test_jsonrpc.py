"""xapi's JSON-RPC endpoint (``POST /jsonrpc``), as XenServer 8's SDKs and Xen Orchestra
call it, over a real socket: the same calls as XML-RPC, answered with JSON's types."""

from __future__ import annotations

import re

import httpx
import pytest

from .simtools import new_vm


@pytest.fixture
def rpc(node):
    client = httpx.Client(base_url=node.url, timeout=10)

    def call(method: str, *params: object, version: str = "2.0", call_id: object = 1) -> dict:
        body: dict[str, object] = {"method": method, "params": list(params), "id": call_id}
        if version == "2.0":
            body["jsonrpc"] = "2.0"
        answer = client.post("/jsonrpc", json=body)
        assert answer.status_code == 200
        assert answer.headers["content-type"] == "application/json"
        return answer.json()

    yield call
    client.close()


@pytest.fixture
def token(rpc, node) -> str:
    """A session ref, logged in over JSON-RPC."""
    return rpc("session.login_with_password", "root", node.host.spec.password, "2.21", "jsonrpc-test")["result"]


def test_records_come_with_jsons_own_types(rpc, token, xapi):
    vm = new_vm(xapi, "typed")
    answer = rpc("VM.get_record", token, vm)
    assert set(answer) == {"jsonrpc", "result", "id"}
    record = answer["result"]
    assert record["memory_static_max"] == 4 * 1024**3  # a number, where XML-RPC sends "4294967296"
    assert isinstance(record["VCPUs_max"], int)
    assert record["is_a_template"] is False
    assert record["name_label"] == "typed"
    assert isinstance(record["other_config"], dict)
    metrics = rpc("VM_metrics.get_record", token, record["metrics"])["result"]
    assert re.fullmatch(r"\d{8}T\d\d:\d\d:\d\dZ", metrics["install_time"])  # xapi's datetime string
    records = rpc("host.get_all_records", token)["result"]
    [host] = records.values()
    assert isinstance(host["memory_overhead"], int)
    assert rpc("host.compute_free_memory", token, next(iter(records)))["result"] > 0
    assert rpc("VM.get_memory_static_max", token, vm)["result"] == 4 * 1024**3


def test_an_int_may_be_sent_as_a_number(rpc, token, xapi):
    vm = new_vm(xapi, "grown")
    [disk] = [xapi.VBD.get_VDI(b) for b in xapi.VM.get_VBDs(vm) if xapi.VBD.get_type(b) == "Disk"]
    size = int(xapi.VDI.get_virtual_size(disk))
    assert rpc("VDI.resize", token, disk, size * 2)["result"] == ""
    assert int(xapi.VDI.get_virtual_size(disk)) == size * 2


def test_a_failure_is_an_error_object_with_xapis_code_and_parameters(rpc, node):
    answer = rpc("session.login_with_password", "root", "wrong", call_id="login")
    assert answer == {
        "jsonrpc": "2.0",
        "error": {"code": 1, "message": "SESSION_AUTHENTICATION_FAILED", "data": ["root", "Authentication failure"]},
        "id": "login",
    }
    unknown = rpc("VM.teleport", "OpaqueRef:NULL")
    assert unknown["error"]["message"] == "MESSAGE_METHOD_UNKNOWN"


def test_json_rpc_1_0_answers_with_a_null_error_or_the_description(rpc, node, token):
    ok = rpc("VM.get_all", token, version="1.0")
    assert set(ok) == {"result", "error", "id"}
    assert ok["error"] is None
    assert isinstance(ok["result"], list)
    failed = rpc("VM.get_record", token, "OpaqueRef:nothing", version="1.0")
    assert failed["result"] is None
    assert failed["error"][0] == "HANDLE_INVALID"


def test_event_from_over_json_rpc(rpc, token, xapi):
    batch = rpc("event.from", token, ["vm"], "", 0.0)["result"]
    assert isinstance(batch["valid_ref_counts"]["vm"], int)
    [some] = [e for e in batch["events"] if e["snapshot"].get("is_control_domain")][:1]
    assert isinstance(some["snapshot"]["memory_static_max"], int)


def test_a_member_answers_host_is_slave_over_json_rpc(make_lab):
    pool = make_lab(pool_size=2)
    member = pool.members[1][0]
    answer = httpx.post(
        member.url + "/jsonrpc",
        json={"jsonrpc": "2.0", "method": "session.login_with_password", "params": ["root", "x"], "id": 7},
    ).json()
    assert answer["error"] == {"code": 1, "message": "HOST_IS_SLAVE", "data": ["127.0.0.1"]}


def test_a_request_it_cannot_read_gets_a_bare_500(node):
    for body in (b"{not json", b'{"jsonrpc": "2.0", "method": "VM.get_all"}', b"[1, 2]"):
        answer = httpx.post(node.url + "/jsonrpc", content=body, headers={"Content-Type": "application/json"})
        assert answer.status_code == 500
