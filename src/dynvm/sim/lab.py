"""A lab of simulated hosts in one process: what ``dynvm sim`` runs.

It builds N pools (one host each unless ``pool_size`` says more) sharing one timer thread,
starts each pool on a port of its own, every member of it on its own loopback address
(``127.0.0.1`` the master, ``127.0.0.2`` the next member, ...: ``node.py``), plus a
control port, and writes a ``.dynvmservice.ini`` with one section per pool that points
dynvm at the pool's master (``members_in_config``: a section per member instead, as a
lab that grew into a pool is often written).
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import ssl
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .catalogue import GiB, os_keys, template_for_key
from .control import Control
from .host import member_address
from .node import HostNode, MemberNode
from .population import build_host
from .scheduler import Scheduler
from .server import Endpoint
from .services import free_port
from .settings import HostSpec, Timing
from .tls import server_context, write_self_signed


@dataclass
class LabOptions:
    hosts: int = 4
    base_port: int = 0
    control_port: int = 0
    host_cpus: int = 32
    host_memory_gib: float = 128
    sr_tib: float = 2
    foreign_vms: int = 0
    apipa_rate: float = 0.0
    tls: bool = False
    seed: int | None = None
    timing: Timing = field(default_factory=Timing)
    xenserver_version: tuple[int, int] = (8, 2)
    pool_size: int = 1  # hosts per pool; above 1 they share a master (and an SR, unless storage="local")
    storage: str = ""  # "shared" or "local" (an SR per member, all named alike); "": by pool size
    members_in_config: bool = False  # the config names every member of a pool, a section each
    # where booted guests' sshd and WinRM listen, on their own addresses (None: a free port
    # the lab picks, so labs side by side never answer each other's probes; 0: no services)
    service_port: int | None = None
    winrm_port: int | None = None


class Lab:
    def __init__(self, options: LabOptions, files_prefix: Path | None = None) -> None:
        """``files_prefix``: where ``--tls`` writes ``<prefix>.sim-cert.pem`` and its key
        (beside the config it writes); a temporary directory when not given."""
        if options.hosts < 1:
            raise ValueError("a lab needs at least one host")
        if options.pool_size < 1:
            raise ValueError("a pool needs at least one host")
        self.options = options
        self.scheduler = Scheduler()
        self.nodes: list[HostNode] = []
        self.members: dict[int, list[MemberNode]] = {}  # pool index -> members that are not its master
        self._by_password: dict[str, HostNode] = {}
        self.cert_path: Path | None = None
        tls = None
        contexts: list[ssl.SSLContext] = []
        if options.tls:
            # a certificate per member address, as each host of a real pool has its own; the
            # file dynvm is given (host.tls.ca_file) holds them all
            prefix = str(files_prefix or Path(tempfile.mkdtemp(prefix="dynvm-sim-")) / "lab")
            Path(prefix).parent.mkdir(parents=True, exist_ok=True)
            self.cert_path = Path(prefix + ".sim-cert.pem")
            pems = []
            for position in range(options.pool_size):
                suffix = "" if position == 0 else f"-h{position + 1}"
                cert_path = Path(f"{prefix}.sim-cert{suffix}.pem")
                key_path = Path(f"{prefix}.sim-key{suffix}.pem")
                write_self_signed(cert_path, key_path, f"dynvm-sim{suffix}", member_address(position))
                pems.append(cert_path.read_bytes())
                contexts.append(server_context(cert_path, key_path))
            self.cert_path.write_bytes(b"".join(pems))
            tls = contexts[0]
        self.control = Control(self._by_password.get)
        self.service_port = free_port() if options.service_port is None else options.service_port
        self.winrm_port = free_port() if options.winrm_port is None else options.winrm_port
        for index in range(1, options.hosts + 1):
            spec = HostSpec(
                index=index,
                password=secrets.token_urlsafe(12),
                cpus=options.host_cpus,
                memory=int(options.host_memory_gib * GiB),
                sr_size=int(options.sr_tib * 1024 * GiB),
                foreign_vms=options.foreign_vms,
                xenserver_version=options.xenserver_version,
                pool_size=options.pool_size,
                storage=options.storage,
                service_port=self.service_port,
                winrm_port=self.winrm_port,
            )
            seed = None if options.seed is None else options.seed + index
            timing = dataclasses.replace(options.timing)  # each host's timing can then change alone
            host = build_host(spec, timing, self.scheduler, seed=seed)
            host.faults.apipa_rate = options.apipa_rate
            port = options.base_port + index - 1 if options.base_port else 0
            node = HostNode(host, self.control.route, port, tls, (lambda p: contexts[p]) if contexts else None)
            self.nodes.append(node)
            self._by_password[spec.password] = node
            self.members[index] = [MemberNode(node, position) for position in range(1, options.pool_size)]
        self.control_endpoint = Endpoint(self.control.route, options.control_port)

    def member_nodes(self) -> list[MemberNode]:
        return [member for members in self.members.values() for member in members]

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        self.control_endpoint.start()

    def stop(self) -> None:
        endpoints = [endpoint for node in self.nodes for endpoint in node.endpoints]
        endpoints.append(self.control_endpoint)
        stoppers = [threading.Thread(target=e.stop) for e in endpoints]  # in parallel: fast for 100 hosts
        for thread in stoppers:
            thread.start()
        for thread in stoppers:
            thread.join()
        self.scheduler.stop()
        for node in self.nodes:
            node.host.services.stop()

    def config_text(self) -> str:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        lines = [
            f"; Written by `dynvm sim` at {stamp}: {self._lab_words()} on 127.0.0.1.",
            f"; dynvm-sim-control: {self.control_endpoint.url}/",
            ";   sim.* methods (see docs/SIMULATOR.md); each takes the host's password first.",
            "",
            "[couchbase]",
            "; Fill in to also keep VM history in Couchbase; empty keeps it in dynvm's database only.",
            "couchbase.server=",
            "couchbase.bucket=",
            "couchbase.username=",
            "couchbase.userpassword=",
            "",
            "[common]",
            "vm.expiry.minutes=720",
            "vm.network.timeout.secs=400",
            "",
            "[probe]",
            "; the simulated guests' sshd and WinRM listen on these ports of their own addresses",
            f"port={self.service_port}" if self.service_port else "enabled=false",
            *(
                [f"{key}.port={self.winrm_port}" for key in os_keys() if template_for_key(key).windows]
                if self.service_port and self.winrm_port
                else []
            ),
        ]
        section = 0
        for index, node in enumerate(self.nodes, start=1):
            spec = node.host.spec
            urls = [node.url] + [m.url for m in self.members[index]]
            lines += [""]
            if self.members[index] and not self.options.members_in_config:
                lines.append(f"; a pool of {spec.pool_size} hosts; its other members answer on {', '.join(urls[1:])}")
            elif self.members[index]:
                lines.append(f"; a pool of {spec.pool_size} hosts, a section for each member")
            for url in urls if self.options.members_in_config else urls[:1]:
                section += 1
                lines += [
                    f"[xenhost{section}]",
                    f"host.name={url}",
                    f"host.user={spec.user}",
                    f"host.password={spec.password}",
                    f"host.storage.name={spec.storage_name}",
                ]
                if self.cert_path is not None:
                    lines.append(f"host.tls.ca_file={self.cert_path}")
                lines += [f"{key}.template={template_for_key(key).name_label}" for key in os_keys()]
        return "\n".join(lines) + "\n"

    def _lab_words(self) -> str:
        if self.options.pool_size == 1:
            return f"{len(self.nodes)} simulated Xen hosts"
        return f"{len(self.nodes)} simulated Xen pools of {self.options.pool_size} hosts"

    def write_config(self, path: Path) -> None:
        """Write the config atomically: a reader sees the old file or the whole new one.
        It holds passwords, so only its owner may read it."""
        path = path.expanduser().resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(self.config_text())
            os.chmod(tmp, 0o600)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
