"""What the controller answers, as typed results.

Fields the controller adds later (or a cluster's front adds: `host`, `placement`) are kept, not refused
(`extra="allow"`), so an older client reads a newer controller. A front's VM that is still being
placed has few fields: those it lacks have defaults. `model_dump(exclude_unset=True)` gives back
what the controller sent.
"""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, field_validator

VM_TERMINAL = ("ready", "failed", "ended", "destroyed")  # the events that end a VM's stream
VM_NOTES = ("build", "retry")  # events with a `detail` in words: a build step the VM waits for, a retry
LOGIN_FINAL = ("captured", "failed", "timed-out", "cancelled")


class _Answer(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    def as_json(self) -> dict[str, Any]:
        """The fields as the controller sent them (none added by defaults), JSON types only."""
        return self.model_dump(mode="json", exclude_unset=True)


class Failure(_Answer):
    hop: str
    reason: str
    hint: str = ""
    evidence: list[str] = Field(default_factory=list)
    vmm_log: list[str] = Field(default_factory=list)
    cleanup: list[str] = Field(default_factory=list)


class Vm(_Answer):
    vm_id: str
    state: str  # creating, booting, ready, failed, destroying or ended
    user: str = ""
    template: str = "default"  # what it was made from (GET /v1/templates)
    profile: str = "ephemeral"  # or persistent: the user's browser profile, loaded at its start, saved at its end
    vcpus: int | None = None
    mem_mib: int | None = None
    created_at: float | None = None
    uptime_s: float | None = None
    address: str = ""
    tap: str = ""
    mac: str = ""
    driver: str = ""
    accel: str = ""
    accel_reason: str = ""
    retried_after: dict[str, Any] | None = None
    building: str | None = None
    pid: int | None = None
    stages: dict[str, float] = Field(default_factory=dict)
    failure: Failure | None = None
    ended_reason: str = ""
    started_from: str = ""
    in_pool: bool = False
    snapshot: str = ""
    desktop_path: str = ""
    viewers: int = 0
    idle_s: float | None = None

    @property
    def settled(self) -> bool:
        """Neither being created nor booting: ready, failed, or gone."""
        return self.state not in ("creating", "booting")


class Viewer(_Answer):
    url: str
    token: str
    expires_at: int  # unix seconds


class Event(NamedTuple):
    """One Server-Sent Event of a stream: its name and its JSON data."""

    kind: str
    data: dict[str, Any]


class Login(_Answer):
    login_id: str
    user: str
    provider: str
    state: str  # booting, starting, waiting-for-user, captured, failed, timed-out or cancelled
    vm_id: str
    keep_vm: bool = False
    vm_destroyed: bool = False
    created_at: float | None = None
    ended_at: float | None = None
    states: dict[str, float] = Field(default_factory=dict)
    auth_url_host: str | None = None
    hop: str | None = None
    reason: str | None = None
    exit_status: int | None = None
    output: list[str] = Field(default_factory=list)
    files: int = 0
    sha256: str | None = None

    @property
    def final(self) -> bool:
        return self.state in LOGIN_FINAL


class StartedLogin(Login):
    viewer_url: str  # where the person completes the login


class CancelledLogin(_Answer):
    login: Login
    cancelled: bool  # false when the login had already ended


class Profile(_Answer):
    """A user's persistent browser profile, as the controller keeps it (sealed in the guest)."""

    user: str
    tenant: str = ""
    size_bytes: int = 0  # the sealed profile last saved (0: never saved yet)
    saved_at: float | None = None
    in_use_by: str | None = None  # the live VM that has it


class Credentials(_Answer):
    user: str
    provider: str
    login_id: str
    captured_at: float
    files: dict[str, bytes]  # path inside the VM -> the file's bytes (sent in base64)

    @field_validator("files", mode="before")
    @classmethod
    def _decoded(cls, files: object) -> object:
        if not isinstance(files, dict):
            return files
        return {path: base64.b64decode(data, validate=True) if isinstance(data, str) else data
                for path, data in files.items()}

    def __repr__(self) -> str:  # never the bytes of a credential in a log or a traceback
        return (f"Credentials(user={self.user!r}, provider={self.provider!r}, login_id={self.login_id!r}, "
                f"files={sorted(self.files)!r})")

    __str__ = __repr__


class Provider(_Answer):
    name: str
    package: str = ""
    browser: str = ""
    callback: str = ""
    credentials: list[str] = Field(default_factory=list)
    timeout_s: int = 0


class Host(_Answer):
    """A host of a cluster, as a front reports it."""

    name: str
    state: str  # ready, suspect, lost or draining
    state_reason: str = ""
    capacity: int = 0
    allocated: int = 0
    pending: int = 0
    heartbeat_at: datetime
    viewer_address: str = ""


class ApiKey(_Answer):
    """An API key as the controller lists it: never the key itself."""

    key_id: str
    name: str
    role: str  # admin or tenant
    tenant: str = ""  # "" for an admin key
    created_at: float
    last_used_at: float | None = None  # to the minute
    revoked_at: float | None = None


class NewKey(ApiKey):
    """A key just made, with its secret: in this answer only, kept nowhere by the controller."""

    key: str

    def __repr__(self) -> str:  # never the secret in a log or a traceback
        return f"NewKey(key_id={self.key_id!r}, name={self.name!r}, role={self.role!r}, tenant={self.tenant!r})"

    __str__ = __repr__


class Quota(_Answer):
    """A tenant's limits; None: no limit of its own (the host's still hold)."""

    max_vms: int | None = None
    max_mem_mib: int | None = None
    logins_per_hour: int | None = None


class Tenant(_Answer):
    tenant: str
    quota: Quota
    clipboard: str = "both"  # which way its viewers' clipboard may go: both, paste, copy or none
    usage: dict[str, int] = Field(default_factory=dict)  # vms, mem_mib, logins_last_hour


class AuditEntry(_Answer):
    id: int
    at: float
    key_id: str  # the key's id (never the key); "" for a viewer
    tenant: str
    action: str
    target: str
    outcome: str
    detail: str = ""
    request_id: str = ""


class AuditPage(_Answer):
    entries: list[AuditEntry]
    next: int | None = None  # pass as `after` for the next page; None: no more now
