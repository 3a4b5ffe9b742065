"""Kubernetes nodes and the devices they run on, and the effective verdicts of those devices.

Admission and the rollout gate name nodes; the verifier attests devices. ``verifier_nodes``
maps each node name to one registered device (a DonkeyCar's board is one node), with a copy
of the node's labels for the gate's label selector. A device is on at most one node.

Reading a verdict here always goes through ``verifier.verdicts.effective_verdict`` at the
time of the request, so a trusted verdict past its expiry reads as unknown. A node without a
mapping and a device the verifier does not attest read as unknown too, so every consumer
treats them as not trusted.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from sqlalchemy import JSON, DateTime, ForeignKey, String, delete, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from edgetrust.db import Base
from registrar.models import DEVICE_ID_MAX_LENGTH, RegisteredDevice
from verifier.models import VerifierDevice
from verifier.verdicts import (
    NOT_ATTESTED,
    Verdict,
    VerdictStatus,
    effective_verdict,
    unknown_verdict,
)

# A node name is a DNS-1123 subdomain: at most 253 characters of lowercase letters, digits,
# '-' and '.', starting and ending with a letter or digit.
NODE_NAME_MAX_LENGTH: Final = 253
_NODE_NAME: Final = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")

# Reason codes of the unknown verdicts built here.
NODE_NOT_MAPPED: Final = "node-not-mapped"
DEVICE_NOT_IN_VERIFIER: Final = "verifier-device-not-found"
VERDICT_INVALID: Final = "verdict-invalid"


class NodeError(Exception):
    """A node name or mapping that cannot be used; ``code`` is stable kebab-case."""

    def __init__(self, message: str, *, code: str, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.field = field


class Node(Base):
    """A Kubernetes node and the registered device it runs on."""

    __tablename__ = "verifier_nodes"

    node_name: Mapped[str] = mapped_column(String(NODE_NAME_MAX_LENGTH), primary_key=True)
    device_id: Mapped[str] = mapped_column(
        String(DEVICE_ID_MAX_LENGTH),
        ForeignKey("registered_devices.device_id", ondelete="CASCADE"),
        unique=True,
    )
    # The node's Kubernetes labels, name to value, as last written.
    labels: Mapped[dict[str, str]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


def check_node_name(unverified_name: object) -> str:
    """Return ``unverified_name`` if it is a valid node name, else raise NodeError."""
    if (not isinstance(unverified_name, str) or len(unverified_name) > NODE_NAME_MAX_LENGTH
            or not _NODE_NAME.fullmatch(unverified_name)):
        raise NodeError(
            f"node name {str(unverified_name)[:80]!r} is invalid; a node name is a DNS subdomain "
            f"of at most {NODE_NAME_MAX_LENGTH} lowercase letters, digits, '-' and '.'",
            code="node-name-invalid", field="node",
        )
    return unverified_name


# --- mapping ----------------------------------------------------------------------------------


def set_node(session: Session, node_name: str, device_id: str,
             labels: Mapping[str, str] | None = None, *, now: datetime | None = None) -> Node:
    """Map ``node_name`` to ``device_id`` and store its labels, replacing an earlier mapping of
    the node. Raises NodeError ``device-not-found`` for a device the registrar does not know
    and ``device-on-other-node`` for a device already mapped to another node."""
    check_node_name(node_name)
    now = now or datetime.now(UTC)
    if session.scalar(select(RegisteredDevice.id).where(RegisteredDevice.device_id == device_id)) is None:
        raise NodeError(f"device {device_id!r} is not registered", code="device-not-found",
                        field="device_id")
    other = session.scalar(select(Node.node_name).where(Node.device_id == device_id,
                                                        Node.node_name != node_name))
    if other is not None:
        raise NodeError(f"device {device_id!r} is already mapped to node {other!r}; delete that "
                        "mapping first", code="device-on-other-node", field="device_id")

    node = session.get(Node, node_name)
    if node is None:
        node = Node(node_name=node_name, device_id=device_id, labels=dict(labels or {}),
                    created_at=now, updated_at=now)
        session.add(node)
    else:
        node.device_id = device_id
        node.labels = dict(labels or {})
        node.updated_at = now
    session.flush()
    return node


def delete_node(session: Session, node_name: str) -> bool:
    """Remove the mapping of ``node_name``; return whether there was one."""
    result = session.execute(delete(Node).where(Node.node_name == node_name))
    return bool(result.rowcount)  # type: ignore[attr-defined] # CursorResult of a DELETE


def device_of_node(session: Session, node_name: str) -> str | None:
    """Return the id of the device on ``node_name``, or None if the node is not mapped."""
    return session.scalar(select(Node.device_id).where(Node.node_name == node_name))


def nodes_named(session: Session, node_names: Iterable[str]) -> dict[str, Node]:
    """Return the mapped nodes among ``node_names``, by name."""
    names = sorted(set(node_names))
    if not names:
        return {}
    return {node.node_name: node
            for node in session.scalars(select(Node).where(Node.node_name.in_(names)))}


def nodes_with_labels(session: Session, selector: Mapping[str, str]) -> list[Node]:
    """Return the nodes whose labels include every name and value of ``selector``, by name.

    NOTE: the labels are compared in Python, because SQLite and PostgreSQL query JSON
    differently. Each call therefore reads every mapped node.
    """
    nodes = session.scalars(select(Node).order_by(Node.node_name))
    return [node for node in nodes
            if all(node.labels.get(name) == value for name, value in selector.items())]


# --- verdicts ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceTrust:
    """A device's effective verdict at one time, and the node it was found through."""

    device_id: str
    node: str | None
    verdict: Verdict

    @property
    def status(self) -> VerdictStatus:
        return self.verdict.status


def device_verdicts(session: Session, device_ids: Sequence[str], at: datetime) -> dict[str, Verdict]:
    """Return the effective verdict at ``at`` of each device, unknown for a device that the
    verifier does not attest."""
    wanted = sorted(set(device_ids))
    rows = {device.device_id: device for device in session.scalars(
        select(VerifierDevice).where(VerifierDevice.device_id.in_(wanted)))} if wanted else {}
    verdicts = {}
    for device_id in wanted:
        row = rows.get(device_id)
        if row is None:
            verdicts[device_id] = unknown_verdict(
                device_id, DEVICE_NOT_IN_VERIFIER,
                f"device {device_id!r} is not attested by the verifier", issued_at=at)
        else:
            verdicts[device_id] = stored_verdict(row, at)
    return verdicts


def node_trust(session: Session, node_name: str, at: datetime) -> DeviceTrust | None:
    """Return the effective verdict of the device on ``node_name``, or None if the node is not
    mapped to a device."""
    device_id = device_of_node(session, node_name)
    if device_id is None:
        return None
    verdict = device_verdicts(session, [device_id], at)[device_id]
    return DeviceTrust(device_id, node_name, verdict)


def stored_verdict(device: VerifierDevice, at: datetime) -> Verdict:
    """Return the effective verdict at ``at`` of the verdict stored in ``device``'s row."""
    # Imported here so that loading this table's module does not load the verifier's views.
    from verifier.api import stored_verdict as issued_verdict

    try:
        verdict = issued_verdict(device)
    except ValueError as error:
        return unknown_verdict(device.device_id, VERDICT_INVALID,
                               f"the stored verdict {device.verdict_id} is inconsistent: {error}",
                               issued_at=at)
    if verdict is None:
        return unknown_verdict(device.device_id, NOT_ATTESTED,
                               f"device {device.device_id!r} has not been attested since it was "
                               "added", issued_at=at)
    return effective_verdict(verdict, at)
