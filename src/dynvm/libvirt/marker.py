"""dynvm's marker on libvirt: one element in a domain's ``<metadata>``, in dynvm's own XML
namespace, and the names of the clone volumes. The one place that knows them. ::

    <metadata>
      <dynvm:vm xmlns:dynvm="urn:dynvm:libvirt:1" lease="..." installation="..."
                os="tiny" holder="..." quarantined-at="..."/>
    </metadata>

- ``lease``, ``installation``: the lease the domain was made for and the installation
  that made it (a second dynvm with a database of its own has another id and never touches
  it). A domain without the element is not dynvm's: it is never touched.
- ``holder``: the request that holds it, written at its hand-out; none while a ready-pool
  VM waits. The host, not the database, says who holds a VM.
- ``quarantined-at``: set when reconcile found a domain of this installation whose lease
  its database does not know: it is stopped and kept until the quarantine ends.

The domain is defined, marked, before its disk exists and before it starts, so no step of a
create leaves an unmarked domain. Its disk is the volume ``dynvm-<installation>-<lease>``
(and ``.qcow2``): a volume left when a delete failed is known by its name alone.

The installation's claim on a host (``engine/claim.py``) is a libvirt secret of the host,
not private, whose UUID is derived from the installation id: a value the host keeps for
every client, where a copy of the database finds the claim its original renews.
"""

from __future__ import annotations

import enum
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass

NAMESPACE = "urn:dynvm:libvirt:1"
PREFIX = "dynvm"
ELEMENT = "vm"
DOMAIN_PREFIX = "dynvm-"
VOLUME_PREFIX = "dynvm-"
VOLUME_SUFFIX = ".qcow2"


@dataclass(frozen=True)
class Mark:
    lease: str
    installation: str
    os: str = ""
    holder: str | None = None
    quarantined_at: float | None = None

    def xml(self, bare: bool = False) -> str:
        """The element, as a domain's ``<metadata>`` holds it; ``bare``: without its
        namespace, as ``virDomainSetMetadata`` takes it (libvirt adds the namespace)."""
        element = ET.Element(ELEMENT) if bare else ET.Element(f"{PREFIX}:{ELEMENT}", {f"xmlns:{PREFIX}": NAMESPACE})
        element.set("lease", self.lease)
        element.set("installation", self.installation)
        if self.os:
            element.set("os", self.os)
        if self.holder is not None:
            element.set("holder", self.holder)
        if self.quarantined_at is not None:
            element.set("quarantined-at", repr(self.quarantined_at))
        return ET.tostring(element, encoding="unicode")


def read(domain_xml: str) -> Mark | None:
    """The mark in a domain's XML, or None when it carries none (not dynvm's)."""
    try:
        root = ET.fromstring(domain_xml)
    except ET.ParseError:
        return None
    found = root.find(f"metadata/{{{NAMESPACE}}}{ELEMENT}")
    if found is None:
        return None
    return from_element(found)


def read_metadata(metadata_xml: str) -> Mark | None:
    """The mark as ``virDomain.metadata(ELEMENT, NAMESPACE)`` returns it (no namespace)."""
    try:
        return from_element(ET.fromstring(metadata_xml))
    except ET.ParseError:
        return None


def from_element(element: ET.Element) -> Mark | None:
    lease, installation = element.get("lease"), element.get("installation")
    if not lease or not installation:
        return None
    raw = element.get("quarantined-at")
    try:
        quarantined = float(raw) if raw is not None else None
    except ValueError:
        quarantined = None
    return Mark(lease, installation, element.get("os", ""), element.get("holder"), quarantined)


class Ownership(enum.Enum):
    OURS = "ours"
    OTHER_INSTALLATION = "other installation"
    NOT_DYNVM = "not dynvm"


def ownership(mark: Mark | None, installation: str) -> Ownership:
    if mark is None:
        return Ownership.NOT_DYNVM
    return Ownership.OURS if mark.installation == installation else Ownership.OTHER_INSTALLATION


def domain_name(lease_id: str) -> str:
    """Domain names are unique on a host; a lease's id is unique: the VM's own name (the
    lease's, shown by the API) is the domain's title."""
    return f"{DOMAIN_PREFIX}{lease_id}"


def volume_name(installation: str, lease_id: str) -> str:
    return f"{VOLUME_PREFIX}{installation}-{lease_id}{VOLUME_SUFFIX}"


def lease_of_volume(name: str, installation: str) -> str | None:
    """The lease a clone volume of this installation was made for, or None (not ours)."""
    head = f"{VOLUME_PREFIX}{installation}-"
    if not name.startswith(head) or not name.endswith(VOLUME_SUFFIX):
        return None
    return name.removeprefix(head).removesuffix(VOLUME_SUFFIX) or None


CLAIM_NAMESPACE = uuid.UUID("5d0c54a4-8f5e-4f55-9a0e-6f2b3c9d7e11")  # dynvm's, for claim secrets' UUIDs


def claim_secret(installation: str) -> str:
    """The UUID of the secret that holds ``installation``'s claim on a host."""
    return str(uuid.uuid5(CLAIM_NAMESPACE, installation))


def claim_secret_xml(secret_uuid: str, installation: str) -> str:
    secret = ET.Element("secret", ephemeral="no", private="no")
    ET.SubElement(secret, "uuid").text = secret_uuid
    ET.SubElement(secret, "description").text = f"dynvm: the claim of installation {installation}"
    return ET.tostring(secret, encoding="unicode")
