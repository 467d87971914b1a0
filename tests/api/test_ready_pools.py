"""The ready pools as users see them: GET /api/v1/pools, `dynvm pools`, /metrics."""

from __future__ import annotations

from typer.testing import CliRunner

from dynvm.cli import build_cli

from ..engine.test_ready_pools import fill, with_pools
from .conftest import RunningService


def test_the_pools_route_the_cli_and_the_metrics_show_target_ready_and_time_to_vm(make_services, sim_lab):
    lab = with_pools(sim_lab, "centos.ready=2")
    services, _ = make_services(lab=lab)
    fill(services)
    service = RunningService(services, lab)
    try:
        assert service.get("/getservers/warm", count=1).status_code == 200
        assert service.get("/getservers/cold", count=1, cpus=2).status_code == 200
        pools = service.http.get("/api/v1/pools").json()
        assert pools == [
            {
                "os": "centos",
                "target": 2,
                "ready": 1,
                "refilling": 0,
                "handed_out": 1,
                "recycled": 0,
                "sizing": "fixed",
                "forecast": None,
            }
        ]
        metrics = service.http.get("/metrics").text
        assert 'dynvm_pool_ready{os="centos"} 1.0' in metrics
        assert 'dynvm_pool_target{os="centos"} 2.0' in metrics
        assert 'dynvm_time_to_vm_seconds_count{how="warm"} 1.0' in metrics
        assert 'dynvm_time_to_vm_seconds_count{how="cold"} 1.0' in metrics
        result = CliRunner().invoke(build_cli(), ["pools", "--server", str(service.http.base_url)])
        assert result.exit_code == 0, result.output
        assert "centos" in result.output
        assert "ready pools" in result.output
    finally:
        service.stop()


def test_v1_takes_ready_vms_too_and_its_request_says_they_are_ready_at_once(make_services, sim_lab):
    lab = with_pools(sim_lab, "centos.ready=2")
    services, _ = make_services(lab=lab)
    fill(services)
    service = RunningService(services, lab)
    try:
        answer = service.http.post("/api/v1/leases", params={"wait": "true"}, json={"os": "centos", "name": "v1job"})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["state"] == "ready"
        assert [vm["stage"] for vm in body["vms"]] == ["ready"]
        [lease] = services.engine.lease_store.by_name(["v1job"])
        assert lease.pooled_at is not None
    finally:
        service.stop()
