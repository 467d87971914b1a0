"""The ``dynvm`` command line. ``build_cli()`` makes the Typer app; nothing runs at import."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from .config import Settings


def build_cli() -> typer.Typer:
    app = typer.Typer(
        name="dynvm",
        help="Disposable VMs on XenServer / XCP-ng hosts for CI pipelines.",
        no_args_is_help=True,
        add_completion=False,
    )
    app.callback()(_root)
    app.command("sim")(sim_command)
    app.command("check-config")(check_config_command)
    return app


def _root() -> None:
    """Disposable VMs on XenServer / XCP-ng hosts for CI pipelines."""


def sim_command(
    hosts: Annotated[int, typer.Option(min=1, max=1000, help="How many simulated hosts.")] = 4,
    write_config: Annotated[
        Path, typer.Option(help="Write a .dynvmservice.ini for the lab here once every host listens.")
    ] = Path(".dynvmservice.ini"),
    base_port: Annotated[
        int, typer.Option(min=0, max=65535, help="First host port (then +1 ...); 0 = free ports.")
    ] = 0,
    control_port: Annotated[
        int, typer.Option(min=0, max=65535, help="Port of the sim.* control endpoint; 0 = free.")
    ] = 0,
    clone_seconds: Annotated[float, typer.Option(min=0, help="Time VM.clone takes.")] = 0.5,
    boot_seconds: Annotated[float, typer.Option(min=0, help="From VM.start to the guest reporting os_version.")] = 2.0,
    ip_seconds: Annotated[float, typer.Option(min=0, help="Then until networks['0/ip'] appears.")] = 1.0,
    latency_ms: Annotated[float, typer.Option(min=0, help="Added to every xapi call.")] = 0.0,
    foreign_vms: Annotated[int, typer.Option(min=0, help="Running VMs per host that dynvm did not create.")] = 0,
    apipa_rate: Annotated[float, typer.Option(min=0, max=1, help="Fraction of boots that get only 169.254.x.y.")] = 0.0,
    host_cpus: Annotated[int, typer.Option(min=1, help="Physical CPUs per host.")] = 32,
    host_memory_gib: Annotated[float, typer.Option(min=8, help="Memory per host in GiB (dom0 takes 4).")] = 128,
    time_scale: Annotated[float, typer.Option(min=0, help="Multiplies every delay (0.1 = ten times faster).")] = 1.0,
    tls: Annotated[
        bool, typer.Option(help="Serve HTTPS with a self-signed certificate written beside the config.")
    ] = False,
    seed: Annotated[int | None, typer.Option(help="Seed for MACs, APIPA draws: repeatable runs.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log every call.")] = False,
) -> None:
    """Run a simulated Xen lab that speaks xapi's XML-RPC, until Ctrl-C or SIGTERM."""
    from .sim.lab import Lab, LabOptions
    from .sim.settings import Timing

    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    console = Console()
    options = LabOptions(
        hosts=hosts,
        base_port=base_port,
        control_port=control_port,
        host_cpus=host_cpus,
        host_memory_gib=host_memory_gib,
        foreign_vms=foreign_vms,
        apipa_rate=apipa_rate,
        tls=tls,
        seed=seed,
        timing=Timing(
            latency_ms=latency_ms,
            clone_seconds=clone_seconds,
            boot_seconds=boot_seconds,
            ip_seconds=ip_seconds,
            time_scale=time_scale,
        ),
    )
    config_path = write_config.expanduser().resolve()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        lab = Lab(options, files_prefix=config_path)
        lab.start()
    except OSError as e:
        console.print(f"[red]Error:[/red] cannot start the lab: {e}")
        raise typer.Exit(1) from None
    try:
        lab.write_config(config_path)
        table = Table(title=f"dynvm sim: {hosts} host(s)", show_lines=False)
        for column in ("section", "xapi URL", "storage", "CPUs", "memory"):
            table.add_column(column)
        for index, node in enumerate(lab.nodes, start=1):
            spec = node.host.spec
            table.add_row(
                f"xenhost{index}", node.url, spec.storage_name, str(spec.cpus), f"{spec.memory / 2**30:g} GiB"
            )
        console.print(table)
        console.print(f"config:  {config_path}")
        console.print(f"control: {lab.control_endpoint.url}/  (sim.* methods)")
        console.print("Ctrl-C or SIGTERM stops the lab.", style="dim")
        stop.wait()
    finally:
        lab.stop()
    console.print("dynvm sim stopped.")


ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="The .dynvmservice.ini (else $DYNVM_CONFIG, ~/.dynvmservice.ini, ./.dynvmservice.ini).",
    ),
]


def load_or_exit(config: Path | None, console: Console) -> Settings:
    """Load the configuration, or print why it is invalid and exit with code 2."""
    from .config import ConfigError, load_settings, locate_config

    try:
        settings = load_settings(locate_config(config))
    except ConfigError as e:
        console.print(f"Error: {e}", style="red", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    for warning in settings.warnings:
        console.print(f"warning: {warning}", style="yellow", markup=False, highlight=False, soft_wrap=True)
    return settings


def check_config_command(config: ConfigOption = None) -> None:
    """Validate the configuration and show the hosts it names (never their passwords)."""
    console = Console()
    settings = load_or_exit(config, console)
    table = Table(title=f"{settings.source}: {len(settings.hosts)} host(s)")
    for column in ("ref", "section", "xapi URL", "user", "storage", "TLS", "OS keys"):
        table.add_column(column)
    for host in settings.hosts:
        tls = (
            "-"
            if not host.url.startswith("https")
            else (f"CA {host.tls_ca_file}" if host.tls_ca_file else ("verified" if host.tls_verify else "NOT verified"))
        )
        table.add_row(host.ref, host.section, host.url, host.user, host.storage_name, tls, str(len(host.templates)))
    console.print(table)
    console.print(f"OS keys: {', '.join(settings.os_keys) or 'none'}", markup=False)
    common = settings.common
    console.print(
        f"expiry: {common.expiry_minutes:g} min · network timeout: {common.network_timeout_secs:g} s · "
        f"cpu overcommit: {common.cpu_overcommit:g} · history in Couchbase: "
        f"{'yes' if settings.couchbase.enabled else 'no'}"
    )


def main() -> None:
    build_cli()()
