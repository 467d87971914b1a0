"""The ``dynvm`` command line. ``build_cli()`` makes the Typer app; nothing runs at import."""

from __future__ import annotations

import contextlib
import enum
import logging
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import bounds
from .progress_log import ProgressLog, describe
from .running_lab import RunningLab

if TYPE_CHECKING:
    from .auth import TokenStore
    from .client import DynvmClient
    from .config import Settings
    from .store.db import Database


def build_cli() -> typer.Typer:
    app = typer.Typer(
        name="dynvm",
        help="Disposable VMs for CI pipelines, on XenServer / XCP-ng, libvirt/KVM or existing machines.",
        no_args_is_help=True,
        add_completion=False,
        rich_markup_mode=None,  # help texts name config keys in brackets ([common] db.url): keep them
    )
    app.callback()(_root)
    # click shows a command's first sentence in 'dynvm --help', cut with "..." past
    # 78 - 6 - len("check-config") = 60 characters at any terminal width: these fit
    app.command("sim", short_help="Run a simulated Xen lab (xapi XML-RPC) until Ctrl-C.")(sim_command)
    app.command("check-config", short_help="Validate the config and list its hosts.")(check_config_command)
    app.command("doctor", short_help="Log in to every host and check what the config names.")(doctor_command)
    app.command("serve")(serve_command)
    app.command("lab", short_help="A lab and dynvm serving it on 127.0.0.1, until Ctrl-C.")(lab_command)
    app.command("replay", short_help="Replay a demand trace and report what users saw.")(replay_command)
    tokens = typer.Typer(help="API tokens: create, list, revoke.", no_args_is_help=True, rich_markup_mode=None)
    tokens.command("create")(token_create_command)
    tokens.command("list")(token_list_command)
    tokens.command("revoke")(token_revoke_command)
    tokens.callback()(_group_options)
    app.add_typer(tokens, name="token")
    history = typer.Typer(help="dynvm's VM history.", no_args_is_help=True, rich_markup_mode=None)
    history.command("export", short_help="Export the history as a demand trace (CSV).")(history_export_command)
    history.callback()(_group_options)
    app.add_typer(history, name="history")
    installation = typer.Typer(
        help="This database's installation: the id on every VM it makes.", no_args_is_help=True, rich_markup_mode=None
    )
    installation.command("show", short_help="Print the installation id and its last claim.")(installation_show_command)
    installation.command("new", short_help="Make this database (a copy) an installation of its own.")(
        installation_new_command
    )
    installation.callback()(_group_options)
    app.add_typer(installation, name="installation")
    image = typer.Typer(
        help="The tiny guest image for libvirt labs and tests.", no_args_is_help=True, rich_markup_mode=None
    )
    image.command("build", short_help="Build the tiny guest image from Debian packages.")(_image_build)
    app.add_typer(image, name="image")
    for name, command, short in (
        ("get", get_command, "Get VMs, showing their progress; prints names and IPs."),
        ("release", release_command, None),
        ("ls", ls_command, None),
        ("capacity", capacity_command, None),
        ("pools", pools_command, "The ready pools: VMs kept booted per OS."),
        ("extend", extend_command, None),
    ):
        app.command(name, short_help=short)(command)
    return app


def _image_build(
    directory: Annotated[
        Path | None,
        typer.Option(
            help="Where the image is kept (default: $DYNVM_IMAGE_DIR, else /var/cache/dynvm/images); "
            "reused while its inputs are the same."
        ),
    ] = None,
) -> None:
    """Build the tiny guest image from this machine's Debian packages (kernel, busybox,
    dropbear): a bootable qcow2, and a kernel and initramfs for direct boot."""
    from .libvirt.commands import build_image, image_dir

    build_image(directory or image_dir())


def _print_version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"dynvm {__version__}")
        raise typer.Exit()


def _root(
    ctx: typer.Context,
    server: Annotated[
        str | None,
        typer.Option(
            "--server", envvar="DYNVM_SERVER", help="dynvm's URL, for get, release, ls, capacity, pools, extend."
        ),
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="The .dynvmservice.ini, for the commands that read one.")
    ] = None,
    version: Annotated[
        bool, typer.Option("--version", help="Print dynvm's version and exit.", is_eager=True, callback=_print_version)
    ] = False,
) -> None:
    """Disposable VMs for CI pipelines, on XenServer / XCP-ng, libvirt/KVM or existing machines."""
    # 'dynvm --server URL ls' = 'dynvm ls --server URL': the values given before the command
    # become the defaults of the command's own options (one given after it still wins)
    given = {name: value for name, value in (("server", server), ("config", config)) if value is not None}
    if given:
        ctx.default_map = _defaults_for(ctx.command, given)


def _group_options(
    ctx: typer.Context,
    config: Annotated[
        Path | None, typer.Option("--config", help="The .dynvmservice.ini, for the commands that read one.")
    ] = None,
) -> None:
    """'dynvm history --config X export' = 'dynvm history export --config X', as at the
    root: the value becomes the default of the group's commands (one given after the
    command still wins; this one wins over one given before the group)."""
    if config is None:
        return
    inherited = ctx.default_map or {}
    mine = _defaults_for(ctx.command, {"config": config})
    ctx.default_map = {name: {**inherited.get(name, {}), **values} for name, values in mine.items()}


def _defaults_for(group: Any, given: dict[str, Any]) -> dict[str, Any]:
    """A click ``default_map`` giving every command under ``group`` that has an option
    named in ``given`` (server, config) that value."""
    out: dict[str, Any] = {}
    for name, command in group.commands.items():
        if hasattr(command, "commands"):  # token, history, installation, image
            out[name] = _defaults_for(command, given)
        else:
            out[name] = {p.name: given[p.name] for p in command.params if p.name in given}
    return out


def sim_command(
    hosts: Annotated[int, typer.Option(min=1, max=1000, help="How many simulated hosts (pools with --pool-size).")] = 4,
    pool_size: Annotated[
        int, typer.Option(min=1, max=16, help="Hosts per pool: a master and members, each on 127.0.0.N.")
    ] = 1,
    storage: Annotated[
        str,
        typer.Option(help="A pool's SR: 'shared' (one every member reaches) or 'local' (one per member, named alike)."),
    ] = "",
    members_in_config: Annotated[
        bool, typer.Option(help="Write a [xenhostN] section for every member of a pool, not only its master.")
    ] = False,
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
    service_seconds: Annotated[
        float, typer.Option(min=0, help="Then until the guest's sshd (WinRM on Windows) answers on its address.")
    ] = 0.5,
    service_port: Annotated[
        int | None,
        typer.Option(min=0, max=65535, help="Port Linux guests' sshd listens on; default a free one; 0 = none."),
    ] = None,
    winrm_port: Annotated[
        int | None,
        typer.Option(min=0, max=65535, help="Port Windows guests' WinRM listens on; default a free one; 0 = none."),
    ] = None,
    latency_ms: Annotated[float, typer.Option(min=0, help="Added to every xapi call.")] = 0.0,
    foreign_vms: Annotated[int, typer.Option(min=0, help="Running VMs per host that dynvm did not create.")] = 0,
    apipa_rate: Annotated[float, typer.Option(min=0, max=1, help="Fraction of boots that get only 169.254.x.y.")] = 0.0,
    host_cpus: Annotated[int, typer.Option(min=1, help="Physical CPUs per host.")] = 32,
    host_memory_gib: Annotated[float, typer.Option(min=8, help="Memory per host in GiB (dom0 takes 4).")] = 128,
    sr_tib: Annotated[float, typer.Option(min=0.01, help="Size of each host's local SR in TiB.")] = 2,
    time_scale: Annotated[float, typer.Option(min=0, help="Multiplies every delay (0.1 = ten times faster).")] = 1.0,
    heartbeat_seconds: Annotated[
        float, typer.Option(min=0, help="From a member going down (sim.member_down) to its master marking it not live.")
    ] = 0.0,
    tls: Annotated[
        bool, typer.Option(help="Serve HTTPS with a self-signed certificate written beside the config.")
    ] = False,
    seed: Annotated[int | None, typer.Option(help="Seed for MACs, APIPA draws: repeatable runs.")] = None,
    xenserver_version: Annotated[
        str, typer.Option(help="The XenServer release the hosts act as (e.g. 7.0: no VIF.move nor VM.set_memory).")
    ] = "8.2",
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log every call.")] = False,
) -> None:
    """Run a simulated Xen lab that speaks xapi's XML-RPC, until Ctrl-C or SIGTERM."""
    from .sim.lab import Lab, LabOptions
    from .sim.settings import Timing

    if storage not in ("", "shared", "local"):
        raise typer.BadParameter(f"'shared' or 'local', not {storage!r}", param_hint="--storage")
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    console = Console()
    options = LabOptions(
        hosts=hosts,
        base_port=base_port,
        control_port=control_port,
        host_cpus=host_cpus,
        host_memory_gib=host_memory_gib,
        sr_tib=sr_tib,
        foreign_vms=foreign_vms,
        apipa_rate=apipa_rate,
        tls=tls,
        seed=seed,
        xenserver_version=_version(xenserver_version),
        pool_size=pool_size,
        storage=storage,
        members_in_config=members_in_config,
        service_port=service_port,
        winrm_port=winrm_port,
        timing=Timing(
            latency_ms=latency_ms,
            clone_seconds=clone_seconds,
            boot_seconds=boot_seconds,
            ip_seconds=ip_seconds,
            service_seconds=service_seconds,
            heartbeat_seconds=heartbeat_seconds,
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
        title = f"dynvm sim: {hosts} host(s)" if pool_size == 1 else f"dynvm sim: {hosts} pool(s) of {pool_size}"
        table = Table(title=title, show_lines=False)
        for column in ("section", "host", "xapi URL", "storage", "CPUs", "memory"):  # the URL whole
            table.add_column(column, no_wrap=column == "xapi URL", overflow="fold")
        for index, node in enumerate(lab.nodes, start=1):
            spec = node.host.spec
            size = f"{spec.memory / 2**30:g} GiB"
            table.add_row(f"xenhost{index}", spec.member_name(0), node.url, spec.storage_name, str(spec.cpus), size)
            where = "(shared)" if spec.shared_storage else f"{spec.storage_name} (its own)"
            for member in lab.members[index]:
                name = spec.member_name(member.position) + " (member)"
                table.add_row("", name, member.url, where, str(spec.cpus), size)
        console.print(table)
        console.print(f"config:  {config_path}")
        console.print(f"control: {lab.control_endpoint.url}/  (sim.* methods)")
        if lab.service_port or lab.winrm_port:
            console.print(f"guests:  sshd on port {lab.service_port}, WinRM on {lab.winrm_port} of their own addresses")
        console.print("Ctrl-C or SIGTERM stops the lab.", style="dim")
        stop.wait()
    finally:
        lab.stop()
    console.print("dynvm sim stopped.")


def _version(text: str) -> tuple[int, int]:
    major, _, minor = text.partition(".")
    if not (major.isdigit() and (minor.isdigit() or not minor)):
        raise typer.BadParameter(f"a version is MAJOR.MINOR (e.g. 7.0), not {text!r}", param_hint="--xenserver-version")
    return int(major), int(minor or 0)


ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="The .dynvmservice.ini (else $DYNVM_CONFIG, ~/.dynvmservice.ini, ./.dynvmservice.ini).",
    ),
]


def load_or_exit(config: Path | None, console: Console, hint: str = "") -> Settings:
    """Load the configuration, or print why it is invalid (or missing) and exit with code 2.
    The error and the warnings go to stderr whatever ``console`` prints to: a script that
    reads a command's output never reads them as its answer."""
    from .config import ConfigError, load_settings, locate_config

    errors = console if console.stderr else Console(stderr=True)
    try:
        settings = load_settings(locate_config(config))
    except ConfigError as e:
        errors.print(f"Error: {e}{hint}", style="red", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    for warning in settings.warnings:
        errors.print(f"warning: {warning}", style="yellow", markup=False, highlight=False, soft_wrap=True)
    return settings


def check_config_command(
    config: ConfigOption = None,
    connect: Annotated[
        bool, typer.Option("--connect", help="Also log in to every host and check it, as 'dynvm doctor' does.")
    ] = False,
) -> None:
    """Validate the configuration and show the hosts it names (never their passwords)."""
    console = Console()
    settings = load_or_exit(config, console)
    table = Table(title=f"{settings.source}: {len(settings.hosts)} host(s)")
    for column in ("ref", "section", "address", "details", "OS keys"):  # fold: never cut a URL at 80 columns
        table.add_column(column, overflow="fold" if column in ("address", "details") else "ellipsis")
    for host in settings.hosts:
        table.add_row(host.ref, host.section, host.address, host.details, str(len(host.templates)))
    console.print(table)
    console.print(f"OS keys: {', '.join(settings.os_keys) or 'none'}", markup=False)
    common = settings.common
    console.print(
        f"expiry: {common.expiry_minutes:g} min · network timeout: {common.network_timeout_secs:g} s · "
        f"cpu overcommit: {common.cpu_overcommit:g} · history in Couchbase: "
        f"{'yes' if settings.couchbase.enabled else 'no'}"
    )
    if connect:
        doctor_command(config)


def doctor_command(
    config: ConfigOption = None,
    timeout: Annotated[float, typer.Option(min=0.5, help="Seconds to wait for each host.")] = 10.0,
) -> None:
    """Log in to every host and check what the config names: credentials, a template per
    OS key (present, unambiguous), storage and network. Exits 1 on any problem."""
    from concurrent.futures import ThreadPoolExecutor

    from .xen.doctor import examine, same_pools

    console = Console()
    settings = load_or_exit(config, console)
    if not settings.hosts:
        console.print("Error: the config names no [xenhostN] section", style="red", markup=False)
        raise typer.Exit(1)
    with ThreadPoolExecutor(max_workers=min(16, len(settings.hosts))) as pool:
        reports = list(pool.map(lambda host: examine(host, timeout), settings.hosts))
    for report in reports:
        title = escape(f"[{report.host.section}] {report.host.url}")  # else rich takes [xenhost1] for a style
        table = Table(title=title, title_justify="left", box=box.SIMPLE)
        for column in ("check", "", "detail"):
            table.add_column(column, overflow="fold")
        for check in report.checks:
            table.add_row(check.what, "ok" if check.ok else "PROBLEM", check.detail, style=None if check.ok else "red")
        console.print(table)
    groups = same_pools(reports)
    for first, group in groups.items():
        sections = ", ".join(f"[{r.host.section}]" for r in group)
        console.print(
            f"{sections} name one pool ({group[0].pool_name or 'unnamed'}): dynvm counts it once, as [{first}]",
            markup=False,
            soft_wrap=True,
        )
    bad = [report.host.section for report in reports if not report.ok]
    if bad:
        console.print(f"problems on {', '.join(bad)}", style="red", markup=False)
        raise typer.Exit(1)
    pools = len(reports) - sum(len(group) - 1 for group in groups.values())
    if pools == len(reports):
        console.print(f"all {len(reports)} host(s) fine", style="green")
    else:
        console.print(f"all {len(reports)} section(s) fine: {pools} pool(s)", style="green")


def serve_command(
    config: ConfigOption = None,
    db: Annotated[
        str | None,
        typer.Option(help="Database URL (else [common] db.url, else SQLite in ~/.local/share/dynvm/)."),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to bind. Only 127.0.0.1 unless you say otherwise.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 5000,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
    shutdown_grace: Annotated[
        float, typer.Option(min=0, help="On SIGTERM, seconds creates in flight may finish before they are rolled back.")
    ] = 30.0,
    request_timeout: Annotated[
        float, typer.Option(min=0.1, help="Seconds a client has to send a whole request before it is cut off.")
    ] = 30.0,
    clock_speed: Annotated[
        float, typer.Option(min=0.001, hidden=True, help="dynvm replay --live only: time runs this many times as fast.")
    ] = 1.0,
    clock_start: Annotated[
        float | None, typer.Option(hidden=True, help="dynvm replay --live only: what the clock reads at the start.")
    ] = None,
) -> None:
    """Serve the dynvm API (no debugger, no auto-reload). SIGTERM stops it cleanly.

    The port is bound, and the config checked, before anything touches a Xen host."""
    import socket
    import time

    import uvicorn

    from .api.app import create_app
    from .api.server import PortTaken, bind, protocol_with_request_timeout
    from .config import ConfigError, locate_config
    from .runtime import Intervals, build_services

    console = Console(stderr=True)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    load_or_exit(config, console)  # a clear message and exit code 2 for an invalid file
    try:
        listener = bind(host, port)
    except PortTaken as e:
        console.print(f"Error: {e} (is another dynvm serve running?)", style="red", markup=False, soft_wrap=True)
        raise typer.Exit(1) from None
    try:
        # uvicorn gives requests in flight the grace period (a create that finishes in time is
        # answered); what is still running after it is cancelled and rolled back at once.
        clock, monotonic, compressed = time.time, time.monotonic, None
        if clock_speed != 1.0 or clock_start is not None:  # a live replay's compressed time (clock.py)
            from .clock import CompressedTime

            compressed = CompressedTime(clock_speed, time.time() if clock_start is None else clock_start)
            clock, monotonic = compressed.now, compressed.monotonic
        services = build_services(
            locate_config(config),
            db,
            clock=clock,
            monotonic=monotonic,
            intervals=Intervals(shutdown_grace=0.5),
            replica=f"{socket.gethostname()}:{port}",
        )
        if compressed is not None:
            services.on_started = compressed.run  # time passes once start-up is done
    except ConfigError as e:
        console.print(f"Error: {e}", style="red", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except Exception as e:
        console.print(f"Error: cannot open the database: {e}", style="red", markup=False, soft_wrap=True)
        raise typer.Exit(1) from None
    if host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"warning: binding {host}: dynvm is reachable from other machines", style="yellow")
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(services),
            host=host,
            port=port,
            log_level=log_level,
            reload=False,
            timeout_graceful_shutdown=max(1, round(shutdown_grace)),
            lifespan="on",
            http=protocol_with_request_timeout(request_timeout),
        )
    )
    # uvicorn re-raises the signal that stopped it once it has shut down; with these
    # handlers in place that ends here instead of killing the process: a clean stop exits 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    signal.signal(signal.SIGINT, lambda *_: None)
    server.run(sockets=[listener])
    if not server.started:
        raise typer.Exit(1)


class LabProvider(enum.StrEnum):
    xen = "xen"
    libvirt = "libvirt"


def lab_command(
    hosts: Annotated[int, typer.Option(min=1, max=50, help="Simulated hosts (pools with --pool-size).")] = 4,
    pool_size: Annotated[int, typer.Option(min=1, max=16, help="Hosts per pool: a master and its members.")] = 1,
    port: Annotated[int, typer.Option(min=1, max=65535)] = 5000,
    directory: Annotated[Path, typer.Option(help="Where the lab keeps its config and database.")] = Path(".lab"),
    provider: Annotated[
        LabProvider,
        typer.Option(
            help="xen: a simulated Xen lab. libvirt: real guests under libvirt/QEMU on this machine "
            "(starts libvirtd where none runs; run it inside a network namespace: ip netns exec NAME ...)."
        ),
    ] = LabProvider.xen,
) -> None:
    """A lab and dynvm serving it on 127.0.0.1, together, until Ctrl-C: simulated Xen hosts,
    or real guests under libvirt (--provider libvirt)."""
    import json
    import subprocess
    import sys
    import time
    import urllib.request

    from .api.server import PortTaken, bind
    from .store.installation import installation_of

    console = Console()
    try:  # before anything starts: a lab must never report another process's service as its own
        bind("127.0.0.1", port).close()
    except PortTaken as e:
        console.print(
            f"Error: {e}: another process serves it; stop it, or choose another port (--port N; make lab PORT=N)",
            style="red",
            markup=False,
        )
        raise typer.Exit(1) from None
    stop = threading.Event()  # set by Ctrl-C or SIGTERM (handlers of our own: SIGINT may arrive ignored)
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    directory.mkdir(parents=True, exist_ok=True)
    config_path = (directory / "dynvmservice.ini").resolve()
    config_path.unlink(missing_ok=True)
    python = [sys.executable, "-m", "dynvm"]
    if provider is LabProvider.libvirt:
        from .libvirt.commands import libvirt_lab

        made = libvirt_lab(directory, config_path, console)
    else:
        made = _xen_lab(python, config_path, hosts, pool_size, console)
    serve = None
    with made as lab:
        try:
            deadline = time.monotonic() + 60
            db_url = f"sqlite:///{(directory / 'dynvm.db').resolve()}"
            # the lab's database in its config, so that 'dynvm token … --config' finds the same one
            config_path.write_text(with_db_url(config_path.read_text(), db_url))
            serve = subprocess.Popen(
                [*python, "serve", "--config", str(config_path), "--port", str(port), "--log-level", "warning"],
                start_new_session=True,
            )
            base = f"http://127.0.0.1:{port}"
            while True:
                if serve.poll() is not None or time.monotonic() > deadline:
                    console.print(f"Error: dynvm serve did not start on port {port}", style="red", markup=False)
                    raise typer.Exit(1)
                try:
                    with urllib.request.urlopen(f"{base}/healthz?detail=true", timeout=1) as answer:
                        answered = json.loads(answer.read())
                        break
                except (OSError, ValueError):
                    time.sleep(0.2)
            if serve.poll() is not None or answered.get("installation") != installation_of(db_url):
                console.print(f"Error: port {port} is answered by another service, not this lab's", style="red")
                raise typer.Exit(1)
            console.print(f"dynvm serves {lab.what} at {base}", markup=False)
            console.print(f"Its configuration: {config_path}", markup=False, soft_wrap=True)
            console.print(f"The dashboard: {base}/", markup=False)
            console.print("Try a session:", style="bold")
            os = lab.os
            for line in (
                f"curl {base}/getavailablecount/{os}",
                f"curl '{base}/getservers/demoserver?os={os}&count=3'",
                f"curl {base}/getavailablecount/{os}",
                f"curl '{base}/getservers/demoserver9?os={os}&count=2&format=detailed&expiresin=0.5'",
                f"curl {base}/showall/{os}",
                f"curl '{base}/releaseservers/demoserver?os={os}&count=3'",
                f"curl {base}/getavailablecount/{os}",
                *lab.hints,
            ):
                console.print(f"  {line}", markup=False, highlight=False, soft_wrap=True)
            console.print("Tokens (needed once [auth] required=true is set in the config):", style="bold", markup=False)
            console.print(
                f"  {Path(sys.argv[0]).resolve().parent / 'dynvm'} token create $USER --config {config_path}",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )
            console.print("Ctrl-C stops both.", style="dim")
            while lab.alive() and serve.poll() is None and not stop.wait(0.5):
                pass
        finally:
            if serve is not None and serve.poll() is None:  # dynvm first, then the lab
                serve.terminate()
                try:
                    serve.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    serve.kill()
    console.print("lab stopped.")


@contextlib.contextmanager
def _xen_lab(
    python: list[str], config_path: Path, hosts: int, pool_size: int, console: Console
) -> Iterator[RunningLab]:
    """The simulator, in a session of its own (Ctrl-C reaches the lab command only, which
    stops dynvm first and the simulator second, so dynvm never sees its hosts vanish while
    it shuts down); its config written to ``config_path``."""
    import subprocess
    import time

    sim = subprocess.Popen(
        [
            *python,
            "sim",
            "--hosts",
            str(hosts),
            "--pool-size",
            str(pool_size),
            "--write-config",
            str(config_path),
            "--foreign-vms",
            "2",
        ],
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not config_path.exists():
            if sim.poll() is not None or time.monotonic() > deadline:
                console.print("Error: the simulated lab did not start", style="red")
                raise typer.Exit(1)
            time.sleep(0.1)
        yield RunningLab(f"{hosts} simulated hosts", "centos", lambda: sim.poll() is None)
    finally:
        if sim.poll() is None:
            sim.terminate()
            try:
                sim.wait(timeout=60)
            except subprocess.TimeoutExpired:
                sim.kill()


def with_db_url(config_text: str, db_url: str) -> str:
    """The config with ``db.url`` first in its ``[common]`` section (added if missing)."""
    lines = config_text.splitlines()
    if "[common]" not in (line.strip() for line in lines):
        lines.append("[common]")
    at = next(i for i, line in enumerate(lines) if line.strip() == "[common]")
    lines.insert(at + 1, f"db.url={db_url}")
    return "\n".join(lines) + "\n"


DbOption = Annotated[
    str | None, typer.Option("--db", help="Database URL (else [common] db.url, else the default SQLite file).")
]


def database_url(config: Path | None, db: str | None, console: Console) -> str:
    """The database ``dynvm serve`` would use with the same ``--config`` and ``--db``:
    ``--db``, else ``[common] db.url`` of the config, else the default SQLite file. Without
    ``--db``, a config that cannot be found or read is an error (as for ``doctor``), never
    a silent default: a command run on the wrong machine or from the wrong folder must not
    make an empty database of its own and answer from it."""
    from .store.db import default_db_url

    if db is not None:
        return db
    settings = load_or_exit(config, console, hint=" (or name the database with --db URL)")
    return settings.common.db_url or default_db_url()


def _database(config: Path | None, db: str | None, console: Console) -> Database:
    """The database the config (or ``--db``) names, migrated; its name on stderr."""
    from .store.db import Database, describe_url

    url = database_url(config, db, console)
    Console(stderr=True).print(f"database: {describe_url(url)}", style="dim", markup=False, highlight=False)
    database = Database(url)
    database.migrate()
    return database


def _token_store(config: Path | None, db: str | None, console: Console) -> TokenStore:
    from .auth import TokenStore

    return TokenStore(_database(config, db, console))


def installation_show_command(config: ConfigOption = None, db: DbOption = None) -> None:
    """Print this database's installation id and its last claim on the hosts."""
    from .store.installation import InstallationStore

    store = InstallationStore(_database(config, db, Console()))
    seq, _ = store.claim_mark()
    typer.echo(f"{store.installation_id()} (claims written: {seq})")


def installation_new_command(
    config: ConfigOption = None,
    db: DbOption = None,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask.")] = False,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Go on although processes beat in this database: a fresh copy carries its source's "
            "heartbeats for a few seconds.",
        ),
    ] = False,
) -> None:
    """Make this database an installation of its own: for a copy (a staging dynvm) that
    must never touch the VMs of the installation it was copied from. Every lease it holds
    ends, its VMs left alone (they are the other installation's); run it with dynvm stopped."""
    import time
    import uuid

    from .engine.context import REPLICA_STALE_SECONDS
    from .store.installation import InstallationStore
    from .store.leases import LeaseStore
    from .store.replicas import ReplicaStore

    console = Console(stderr=True)
    database = _database(config, db, console)
    store = InstallationStore(database)
    alive = ReplicaStore(database).live_owners(time.time(), REPLICA_STALE_SECONDS)
    if alive and not force:
        console.print(
            f"Error: a dynvm is running on this database ({', '.join(sorted(alive))}): stop it first "
            "(a copy made seconds ago carries its source's heartbeats: wait, or use --force)",
            style="red",
            markup=False,
        )
        raise typer.Exit(1)
    active = len(LeaseStore(database).active())
    old = store.installation_id()
    if not yes:
        typer.confirm(
            f"Installation {old}: end its {active} active lease(s) here, leaving their VMs to that installation, "
            "and make a new installation of this database?",
            abort=True,
        )
    new = str(uuid.uuid4())
    old, ended = store.become_new_installation(
        new, time.time(), f"this database became installation {new}; the VM is installation {old}'s"
    )
    console.print(
        f"installation {old} -> {new}: {ended} lease(s) ended here; their VMs stay the old installation's, "
        "untouched by this one",
        markup=False,
    )
    typer.echo(new)


def _targets(text: str) -> dict[str, int]:
    """``centos=4,windows=1`` -> {"centos": 4, "windows": 1}."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        os, _, n = part.partition("=")
        if not os or not n.isdigit():
            raise typer.BadParameter(f"targets are os=N,os=N, not {part!r}", param_hint="--fixed")
        out[os.strip()] = int(n)
    return out


def replay_command(
    trace: Annotated[Path, typer.Argument(help="A demand trace: arrival_s,user,os,count,hold_s (see docs/REPLAY.md).")],
    history: Annotated[
        Path | None, typer.Option(help="A past trace loaded first, as a running lab would know it (learned sizing).")
    ] = None,
    hosts: Annotated[int, typer.Option(min=1, max=1000, help="Model hosts of the simulator's default size.")] = 10,
    create_seconds: Annotated[float, typer.Option(min=0, help="Clone+boot+IP in trace time.")] = 65.0,
    policy: Annotated[str, typer.Option(help="Ready pools: none, fixed (--fixed) or learned.")] = "learned",
    fixed: Annotated[str, typer.Option(help="Fixed targets per OS: centos=4,windows=1.")] = "",
    margin: Annotated[float, typer.Option(min=0, help="Learned sizing's safety margin.")] = 1.0,
    maximum: Annotated[
        int | None,
        typer.Option(min=0, help="Learned sizing's ceiling per OS (<os>.max; default: from the lab's size)."),
    ] = None,
    wait_minutes: Annotated[float, typer.Option(min=0, help="How long a request that does not fit waits.")] = 60.0,
    from_hour: Annotated[float, typer.Option(min=0, help="Replay from this hour of the trace on.")] = 0.0,
    hours: Annotated[
        float | None, typer.Option(min=0, help="Replay this many hours of it (default: to its end).")
    ] = None,
    live: Annotated[
        bool, typer.Option("--live", help="Against real dynvm serve and dynvm sim processes, time compressed.")
    ] = False,
    speed: Annotated[float, typer.Option(min=1, help="With --live: trace seconds per wall second.")] = 60.0,
    json_out: JsonOption = False,
) -> None:
    """Replay a demand trace on dynvm's own engine and report what users saw: in virtual time
    (a week in minutes), or with --live against real processes (a few hours of trace)."""
    import json

    from rich.progress import Progress

    from .replay.live import LiveReplay, LiveReplayError
    from .replay.runner import POLICIES, Replay, ReplayOptions, slice_of
    from .trace import TraceError, read_trace

    console = Console(stderr=True)
    if policy not in POLICIES:
        raise typer.BadParameter(f"one of {', '.join(POLICIES)}, not {policy!r}", param_hint="--policy")
    try:
        demands = read_trace(trace)
        past = read_trace(history) if history else []
    except (TraceError, OSError) as e:
        console.print(f"Error: {e}", style="red", markup=False)
        raise typer.Exit(2) from None
    options = ReplayOptions(
        hosts=hosts,
        create_seconds=create_seconds,
        policy=policy,
        fixed=_targets(fixed),
        margin=margin,
        maximum=maximum,
        wait_minutes=wait_minutes,
        start=from_hour * 3600,
        hours=hours,
    )
    played = slice_of(demands, from_hour, hours)  # the rest before it is what the lab knew
    if live:
        span = (played[-1].arrival_s - options.start) / speed if played else 0.0
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task(f"live replay, {speed:g}x: about {span / 60:.0f} min of wall time", total=len(played))
            replay = LiveReplay(
                demands, options, speed, past, progress=lambda done, _: bar.update(task, completed=done)
            )
            try:
                result = replay.run().summary()
            except LiveReplayError as e:
                console.print(f"Error: {e}", style="red", markup=False)
                raise typer.Exit(1) from None
    else:
        with console.status(f"replaying {len(played)} request(s) on {hosts} model host(s), policy {policy} ..."):
            result = Replay(demands, options, past).run().summary()
    if json_out:
        typer.echo(json.dumps(result, indent=2))
        return
    clock = f"live at {speed:g}x" if live else "virtual clock"
    title = f"replay of {trace.name} ({clock}): {hosts} hosts, create {create_seconds:g} s, policy {policy}"
    table = Table(title=title)
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key, value in result.items():
        table.add_row(key, str(value))
    Console(width=max(100, Console().width)).print(table)


def history_export_command(
    trace: Annotated[Path, typer.Option(help="Write the history as a demand trace (CSV) here.")],
    config: ConfigOption = None,
    db: DbOption = None,
) -> None:
    """Export the history as a demand trace: arrival_s,user,os,count,hold_s (see docs/REPLAY.md)."""
    import time

    from .store.history import HistoryStore
    from .trace import from_history, write_trace

    console = Console(stderr=True)
    database = _database(config, db, console)
    try:
        demands = from_history(HistoryStore(database).all(), time.time())
        rows = write_trace(trace, demands)
    except OSError as e:
        console.print(f"Error: cannot write {trace}: {e.strerror or e}", style="red", markup=False)
        raise typer.Exit(1) from None
    finally:
        database.close()
    vms = sum(d.count for d in demands)
    span = demands[-1].arrival_s / 3600 if demands else 0.0
    console.print(f"{trace}: {rows} request(s), {vms} VM(s), over {span:.1f} h", markup=False, highlight=False)


def token_create_command(
    user: Annotated[str, typer.Argument(help="The user the token acts for (letters, digits, . _ -).")],
    admin: Annotated[bool, typer.Option(help="May release and extend every user's leases.")] = False,
    config: ConfigOption = None,
    db: DbOption = None,
) -> None:
    """Make a token and print it once: dynvm keeps only its digest."""
    import re

    console = Console()
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", user):
        console.print("Error: a user name is 1 to 64 letters, digits, '.', '_' or '-'", style="red", markup=False)
        raise typer.Exit(2)
    token = _token_store(config, db, console).create(user, admin)
    typer.echo(token)
    Console(stderr=True).print(
        f"Token for {user}{' (admin)' if admin else ''}. It is shown this once; send it as "
        "'Authorization: Bearer <token>' or set DYNVM_TOKEN for the dynvm CLI.",
        style="dim",
        markup=False,
    )


def token_list_command(config: ConfigOption = None, db: DbOption = None) -> None:
    """List tokens (never the tokens themselves)."""
    console = Console()
    table = Table(box=box.SIMPLE)
    # the id and the user whole, even in an 80-column terminal ('revoke' needs the id); the
    # times wrap at their space
    table.add_column("id", no_wrap=True)
    table.add_column("user", no_wrap=True)
    table.add_column("admin")
    for column in ("created", "last used"):
        table.add_column(column, min_width=10, overflow="fold")
    for info in _token_store(config, db, console).list():
        table.add_row(info.id, info.user, "yes" if info.admin else "", _when(info.created_at), _when(info.last_used_at))
    console.print(table)


def token_revoke_command(
    token_id: Annotated[str, typer.Argument(help="The id shown by 'dynvm token list'.")],
    config: ConfigOption = None,
    db: DbOption = None,
) -> None:
    """Revoke a token: requests carrying it are refused from now on."""
    console = Console()
    if not _token_store(config, db, console).revoke(token_id):
        console.print(f"Error: no token with id {token_id}", style="red", markup=False)
        raise typer.Exit(1)
    console.print(f"revoked {token_id}", markup=False)


def _when(epoch: float | None) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M", time.localtime(epoch)) if epoch else "-"


ServerOption = Annotated[  # no envvar here: $DYNVM_SERVER must not override 'dynvm --server URL ls'
    str | None, typer.Option("--server", help="dynvm's URL (else $DYNVM_SERVER, else http://127.0.0.1:5000).")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON, for scripts.")]


def _client(server: str | None) -> DynvmClient:
    from .client import DynvmClient

    return DynvmClient(server)  # the token comes from $DYNVM_TOKEN, never from the command line


def _fail(console: Console, error: Exception) -> typer.Exit:
    console.print(f"Error: {error}", style="red", markup=False, soft_wrap=True)
    return typer.Exit(1)


def get_command(
    os: Annotated[str, typer.Option("--os", help="OS key, e.g. centos.")] = "centos",
    count: Annotated[int, typer.Option(min=bounds.COUNT.low, max=bounds.COUNT.high)] = 1,
    name: Annotated[str | None, typer.Option(help="VM name (count 1) or prefix; default: $USER-<random>.")] = None,
    cpus: Annotated[int | None, typer.Option(min=bounds.CPUS.low, max=bounds.CPUS.high)] = None,
    memory_gib: Annotated[
        float | None,
        typer.Option("--memory-gib", min=bounds.MEMORY.low / bounds.GiB, max=bounds.MEMORY.high / bounds.GiB),
    ] = None,
    expires: Annotated[
        float | None,
        typer.Option(min=0.01, max=bounds.LIFETIME_MINUTES.high, help="Minutes until the VMs are destroyed."),
    ] = None,
    host: Annotated[str | None, typer.Option(help="Pin to host N ([xenhostN]).")] = None,
    wait: Annotated[
        str | None,
        typer.Option(help="Wait in the queue up to this long if the VMs do not fit now: 30m, 90s, 2h (0: do not)."),
    ] = None,
    server: ServerOption = None,
    json_out: JsonOption = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the result: no progress.")] = False,
) -> None:
    """Get VMs: shows their progress, prints a "name ip" line per VM. Ctrl-C cancels.

    In a terminal the progress is live (while queued: the place in the queue and the ETA);
    in a log, a line when the state or the place changes, at most once a minute otherwise.
    Ctrl-C cancels the request, and what was built for it is removed."""
    import getpass
    import json
    import secrets

    from rich.live import Live

    from .client import ApiError

    console = Console(stderr=True)
    body = {
        "os": os,
        "count": count,
        "name": name or f"{getpass.getuser()}-{secrets.token_hex(3)}",
        "cpus": cpus,
        "memory": int(memory_gib * 1024**3) if memory_gib else None,
        "expires_in_minutes": expires,
        "host": host,
        "wait_minutes": _minutes(wait) if wait is not None else None,
    }
    client = _client(server)
    location = None
    try:
        location, status = client.request_leases({k: v for k, v in body.items() if v is not None})
        if json_out or quiet:
            status = client.follow(location, lambda s: None)
        elif not console.is_terminal:  # a log (CI): a line when the request moves, not every second
            log = ProgressLog()

            def say(update: dict[str, Any]) -> None:
                line = log.line(update)
                if line is not None:
                    console.print(line, soft_wrap=True, highlight=False, markup=False)

            say(status)
            status = client.follow(location, say)
        else:
            with Live(_progress_table(status), console=console, refresh_per_second=8) as live:
                status = client.follow(location, lambda s: live.update(_progress_table(s)))
    except KeyboardInterrupt:
        if location is not None:
            with contextlib.suppress(ApiError):
                client.cancel(location)
            console.print("cancelled: what was built for the request is removed")
        raise typer.Exit(130) from None
    except ApiError as e:
        raise _fail(console, e) from None
    finally:
        client.close()
    if json_out:
        typer.echo(json.dumps(status, indent=2))
    if status["state"] != "ready":
        raise _fail(console, Exception(status.get("error") or "the request failed"))
    if not json_out:
        for vm in status["vms"]:
            typer.echo(f"{vm['name']} {vm['ip']}")


def _minutes(text: str) -> float:
    """``30m``, ``90s``, ``2h`` or a number of minutes."""
    units = {"s": 1 / 60, "m": 1.0, "h": 60.0}
    raw = text.strip().lower()
    factor = units.get(raw[-1:])
    number = raw[:-1] if factor is not None else raw
    try:
        value = float(number) * (factor or 1.0)
    except ValueError:
        raise typer.BadParameter(f"a duration is like 30m, 90s or 2h, not {text!r}", param_hint="--wait") from None
    if value < 0 or value != value:
        raise typer.BadParameter(f"a duration cannot be negative: {text!r}", param_hint="--wait")
    return value


def _progress_table(status: dict[str, Any]) -> Table:
    table = Table(title=describe(status))
    for column in ("VM", "host", "stage", "IP / error"):  # a VM's name whole; an error folds
        table.add_column(column, no_wrap=column in ("VM", "host"), overflow="fold")
    for vm in status["vms"]:
        table.add_row(vm["name"], vm["host"], vm["stage"], vm["ip"] or vm["error"] or "")
    return table


def release_command(
    names: Annotated[list[str], typer.Argument(help="VM names to release.")],
    server: ServerOption = None,
    json_out: JsonOption = False,
) -> None:
    """Release VMs: destroys them and their disks. Tries every name and reports each;
    exits 1 if any could not be released."""
    import json

    from .client import ApiError

    console = Console(stderr=True)
    client = _client(server)
    results: dict[str, str] = {}
    try:
        for name in names:
            try:
                client.release(name)
                results[name] = "released"
            except ApiError as e:
                results[name] = f"Error: {e}"
    finally:
        client.close()
    released = [name for name, result in results.items() if result == "released"]
    if json_out:
        typer.echo(json.dumps(released))
    for name, result in results.items():
        if result == "released" and not json_out:
            typer.echo(f"released {name}")
        elif result != "released":
            console.print(f"{name}: {result}", style="red", markup=False, soft_wrap=True)
    if any(result != "released" for result in results.values()):
        raise typer.Exit(1)


def ls_command(
    user: Annotated[
        str | None, typer.Option(help="Only this user's leases (the token's user, or the name asked).")
    ] = None,
    server: ServerOption = None,
    json_out: JsonOption = False,
) -> None:
    """List the leases dynvm holds."""
    import json
    import time

    from .client import ApiError

    console = Console()
    client = _client(server)
    try:
        leases = client.leases(user)
    except ApiError as e:
        raise _fail(Console(stderr=True), e) from None
    finally:
        client.close()
    if json_out:
        typer.echo(json.dumps(leases, indent=2))
        return
    if not leases:
        console.print(f"no leases{f' of {user}' if user else ''}", markup=False, highlight=False)
        return
    rows = [
        (
            lease["name"],
            lease["os"],
            lease["host"],
            lease["state"],
            lease["ip"] or "",
            lease["caller"] or "-",
            f"{max(0, lease['expires_at'] - time.time()) / 60:.0f} min",
        )
        for lease in leases
    ]
    # the name whole (release needs it): a row each while that fits the terminal
    headers = ("name", "os", "host", "state", "IP", "caller", "expires")
    natural = sum(max(len(cell) for cell in column) for column in zip(headers, *rows, strict=True))
    if natural + 2 * (len(headers) - 1) <= console.width:
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
        for column in headers:
            table.add_column(column, no_wrap=True)
        for row in rows:
            table.add_row(*row)
        console.print(table)
        return
    for name, os, host, state, ip, caller, expires in rows:  # too wide for a row each: a record each
        console.print(name, markup=False, highlight=False, no_wrap=True, overflow="ignore", crop=False)
        details = f"  {os} · host {host} · {state} · {ip or 'no IP yet'} · caller {caller} · expires in {expires}"
        console.print(details, markup=False, highlight=False)


def capacity_command(server: ServerOption = None, json_out: JsonOption = False) -> None:
    """How many more VMs of each OS fit now, and the hosts' state."""
    import json

    from .client import ApiError

    console = Console()
    client = _client(server)
    try:
        capacity, hosts = client.capacity(), client.hosts()
    except ApiError as e:
        raise _fail(Console(stderr=True), e) from None
    finally:
        client.close()
    if json_out:
        typer.echo(json.dumps({"capacity": capacity, "hosts": hosts}, indent=2))
        return
    table = Table(title="available now")
    table.add_column("OS")
    table.add_column("VMs", justify="right")
    for os, n in capacity.items():
        table.add_row(os, str(n))
    console.print(table)
    for host in hosts:
        console.print(f"host {host['ref']} {host['url']}: {host['state']} {host['error']}".rstrip(), markup=False)


def pools_command(server: ServerOption = None, json_out: JsonOption = False) -> None:
    """The ready pools: per OS, VMs kept booted for getservers to take at once."""
    import json

    from .client import ApiError

    client = _client(server)
    try:
        pools = client.pools()
    except ApiError as e:
        raise _fail(Console(stderr=True), e) from None
    finally:
        client.close()
    if json_out:
        typer.echo(json.dumps(pools, indent=2))
        return
    if not pools:
        typer.echo("no ready pools: add [pools] <os>.ready=N to the configuration")
        return
    table = Table(title="ready pools")
    for column in ("OS", "target", "ready", "refilling", "handed out (24 h)", "recycled (24 h)"):
        table.add_column(column, justify="left" if column == "OS" else "right")
    for pool in pools:
        table.add_row(
            pool["os"],
            *(str(pool[k]) for k in ("target", "ready", "refilling", "handed_out", "recycled")),
        )
    Console().print(table)


def extend_command(
    name: Annotated[str, typer.Argument()],
    minutes: Annotated[float, typer.Argument(help="New lifetime from now (capped at the maximum).")],
    server: ServerOption = None,
    json_out: JsonOption = False,
) -> None:
    """Extend a lease's expiry."""
    import json
    import time

    from .client import ApiError

    client = _client(server)
    try:
        lease = client.extend(name, minutes)
    except ApiError as e:
        raise _fail(Console(stderr=True), e) from None
    finally:
        client.close()
    left = (lease["expires_at"] - time.time()) / 60
    capped = " (capped at the maximum, [common] vm.expiry.minutes)" if left < minutes - 0.5 else ""
    typer.echo(json.dumps(lease, indent=2) if json_out else f"{name} now expires in {left:.0f} min{capped}")


def main() -> None:
    build_cli()()
