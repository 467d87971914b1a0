"""The API on pools of several hosts: members shown, the seed's host keys kept."""

from __future__ import annotations

import json
import re


def test_the_api_shows_members_and_keeps_the_seeds_host_keys(serve):
    service = serve(hosts=2, pool_size=2)
    assert service.get("/getservers/pooled", os="centos", count=2).status_code == 200
    hosts = service.get("/api/v1/hosts").json()
    assert [h["ref"] for h in hosts] == ["1", "2"]
    for host in hosts:
        assert [m["name"] for m in host["members"]] == [host["name"], host["name"] + "-h2"]
        assert host["members"][0]["master"]
        assert not host["members"][1]["master"]
        assert host["cpus"] == sum(m["cpus"] for m in host["members"])
        assert sum(m["running_vms"] for m in host["members"]) == host["running_vms"]
    showall = service.get("/showall")
    assert re.fullmatch(r'\{\n  "1": \[.*\],\n  "2": \[.*\]\n\}', showall.text, re.S)  # the seed's keys
    entries = [e for per_host in json.loads(showall.text).values() for e in per_host]
    assert sorted(e["name"] for e in entries) == ["pooled1", "pooled2"]
    names = {m["name"] for h in hosts for m in h["members"]}
    assert all(e["member"] in names for e in entries)
    vms = service.get("/api/v1/vms").json()
    assert {v["name"]: v["member"] for v in vms} == {e["name"]: e["member"] for e in entries}


def test_a_lone_hosts_showall_entries_keep_the_seeds_six_keys(serve):
    service = serve()
    assert service.get("/getservers/alone", os="centos").status_code == 200
    [entry] = json.loads(service.get("/showall").text)["1"]
    assert set(entry) == {"name", "name_description", "power_state", "vcpus", "memory_static_max", "networkinfo"}
