"""The installation's claim on its hosts: which process group acts for an installation id.

A database carries its installation's id (``xen/marker.py``), and so does every copy of
it: a staging dynvm started from a copy of production's database would manage
production's VMs. So the leader keeps a claim on every host it manages, renewed every
``CLAIM_INTERVAL`` seconds: a sequence number, a random token, the process that wrote it
and when. The database remembers the number and token of the last claim it wrote — its
own history, which a copy shares only up to the moment it was copied.

Before it writes, and at start-up, a process reads the hosts' claims:

- none, the last one its database wrote, or an older one: it is the installation;
- a later one its database never wrote (a replica records its claim in the database before
  it writes it on the hosts), renewed less than ``CLAIM_STALE`` seconds ago by a process
  that is not an earlier life of this replica: another process group acts for
  this installation. This database is a copy; it touches nothing (``Contested``) until
  ``dynvm installation new`` makes it an installation of its own;
- a later one whose writer has stopped renewing it: this database is older than the
  hosts (restored from a backup). It goes on and takes the claim over; the holder on each
  VM's marker keeps it from handing out or destroying what it no longer knows.

A graceful stop withdraws the claim (its time set to 0), so a restore can start at once.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from ..config import Settings
from ..model import LeaseError
from ..provider import Provider
from ..store.installation import InstallationStore

log = logging.getLogger(__name__)

CLAIM_INTERVAL = 20.0  # seconds between renewals by the leader
CLAIM_STALE = 90.0  # a claim not renewed for this long is its writer's no more


class Contested(LeaseError):
    """Another process group acts for this installation: this one touches no host."""

    status = 503
    title = "Installation contested"


@dataclass(frozen=True)
class Claim:
    seq: int
    token: str
    writer: str
    at: float

    def dump(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def load(cls, raw: str) -> Claim | None:
        try:
            data = json.loads(raw)
            return cls(int(data["seq"]), str(data["token"]), str(data["writer"]), float(data["at"]))
        except (ValueError, TypeError, KeyError):
            return None


class ClaimKeeper:
    """Reads and renews the claim. ``live_owners`` are the processes this database knows
    alive (its replicas)."""

    def __init__(
        self,
        store: InstallationStore,
        provider: Provider,
        settings: Callable[[], Settings],
        owner: str,
        clock: Callable[[], float],
        live_owners: Callable[[], set[str]],
    ) -> None:
        self.store = store
        self.provider = provider
        self.settings = settings
        self.owner = owner
        self.clock = clock
        self.live_owners = live_owners
        self.contested: str | None = None  # why this process touches no host, once it is known

    def check(self) -> list[Claim]:
        """The hosts' claims later than this database's; raises ``Contested`` (and
        remembers why) when one of them is another live process group's."""
        seq, token = self.store.claim_mark()
        later: list[Claim] = []
        for section, claim in self._hosts_claims():
            if claim.seq >= seq:  # a replica may have renewed it since
                seq, token = self.store.claim_mark()
            if claim.seq < seq or (claim.seq == seq and claim.token == token):
                continue
            later.append(claim)  # this database never wrote it
            age = self.clock() - claim.at
            if age < CLAIM_STALE and not self._same_replica(claim.writer):
                self.contested = (
                    f"another dynvm ({claim.writer}) acts for this installation on {section}: it renewed "
                    f"its claim {max(0.0, age):.0f} s ago, and this database never wrote that claim, so one of "
                    "the two databases is a copy of the other: this dynvm touches no host. Stop the copy's dynvm "
                    "and run `dynvm installation new` on the COPY's database (never on production's: its leases "
                    "would end and their VMs be left to the other)"
                )
                raise Contested(self.contested)
        return later

    def settle(self, wait: float = CLAIM_INTERVAL + 5.0, poll: float = 0.5) -> None:
        """At start-up, before the first renewal. A fresh claim this database wrote, by a
        replica it does not know alive, may be the claim of another database's dynvm: a
        copy of this one made before that dynvm renewed it. Wait for the writer's next
        renewal (at most ``wait`` seconds): one this database never wrote raises
        ``Contested``; none means the writer has stopped, and this process goes on."""
        deadline = time.monotonic() + wait
        while self._unexplained_writers():
            if time.monotonic() >= deadline:
                log.warning("the last writer of the installation's claim stopped renewing it: going on")
                return
            time.sleep(poll)
            self.check()

    def _unexplained_writers(self) -> set[str]:
        alive = self.live_owners()
        return {
            claim.writer
            for _, claim in self._hosts_claims()
            if self.clock() - claim.at < CLAIM_STALE
            and not self._same_replica(claim.writer)
            and claim.writer not in alive
        }

    def _hosts_claims(self) -> list[tuple[str, Claim]]:
        """(section, claim) for each host that keeps a readable claim of this installation;
        a host that cannot be read now says nothing."""
        out = []
        for host in self.settings().hosts:
            try:
                raw = self.provider.read_claim(host)
            except Exception as e:
                log.debug("claim on %s not read: %s", host.section, e)
                continue
            claim = Claim.load(raw) if raw else None
            if claim is not None:
                out.append((host.section, claim))
        return out

    def _same_replica(self, writer: str) -> bool:
        """This process, or an earlier life of this replica (the same ``<replica name>#``):
        restarted after a crash on a restored database, it wrote that claim itself. A
        replica of this database would have recorded its claim in it first."""
        return writer.rsplit("#", 1)[0] == self.owner.rsplit("#", 1)[0]

    def renew(self) -> None:
        """Check, then write the next claim on every host (the leader, every
        ``CLAIM_INTERVAL``, and at start-up). Called before anything touches a host."""
        later = self.check()
        if later:
            log.warning(
                "the hosts carry a claim this database never wrote, not renewed for %.0f s or more: this "
                "database is older than the hosts (restored from a backup?). Taking the claim over; VMs the "
                "hosts say are held by requests it does not know are quarantined, never handed out",
                CLAIM_STALE,
            )
        seq, _ = self.store.claim_mark()
        claim = Claim(max([seq, *(c.seq for c in later)]) + 1, secrets.token_hex(16), self.owner, self.clock())
        if not self.store.record_claim(claim.seq, claim.token):
            return  # another replica renewed it meanwhile
        self._write(claim)

    def withdraw(self) -> None:
        """A graceful stop of the last replica: the claim stays the database's, but is stale
        at once (a restore may start). Called once this process's heartbeat is gone."""
        if self.contested is not None or self.live_owners() - {self.owner}:
            return  # not ours to withdraw, or another replica leads on
        seq, token = self.store.claim_mark()
        if token is not None:
            self._write(Claim(seq, token, self.owner, 0.0))

    def _write(self, claim: Claim) -> None:
        raw = claim.dump()
        for host in self.settings().hosts:
            try:
                self.provider.write_claim(host, raw)
            except Exception as e:  # renewed at the next pass
                log.warning("could not renew the installation's claim on %s: %s", host.section, e)
