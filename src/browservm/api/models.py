"""The shapes of the REST API, as pydantic models: what a client sends and what it gets back.

Requests forbid unknown fields and take numbers strictly (no "1", no 1.5, no true; 2.0 is 2, as JSON
Schema has it), so a mistyped field is a 422 that names it rather than a VM with a surprising size.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from annotated_types import Ge, Le
from fastapi import Path
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictInt, StrictStr, StringConstraints

from browservm.access.principal import TENANT_PATTERN
from browservm.api.tokens import MAX_TOKEN_LENGTH
from browservm.ids import VM_ID_PATTERN
from browservm.names import CONTROLS, NAME_PATTERN
from browservm.templates import DEFAULT, Template
from browservm.templates import NAME_PATTERN as TEMPLATE_PATTERN
from browservm.vm.parts import Limits
from browservm.vm.records import VmRecord
from browservm.vm.state import VmState


def whole(value: object) -> object:
    """2.0 is the whole number 2 (JSON Schema's `integer`); anything else goes on to StrictInt as it is."""
    return int(value) if isinstance(value, float) and value.is_integer() and abs(value) < 2**63 else value


WholeNumber = Annotated[StrictInt, BeforeValidator(whole)]
# At module level: FastAPI resolves route annotations by name. The pattern is documented, and enforced by
# validate_vm_id, whose refusal says in words what is wrong with the id.
VmId = Annotated[str, Path(description="a VM's id", json_schema_extra={"pattern": VM_ID_PATTERN, "maxLength": 63})]
LABEL_KEY = r"^[a-z0-9][a-z0-9._/-]{0,62}$"
LabelKey = Annotated[str, StringConstraints(pattern=LABEL_KEY)]
LabelValue = Annotated[str, StringConstraints(max_length=256, pattern=f"^[^{CONTROLS}]*$")]
USER_PATTERN = NAME_PATTERN
MAX_TIMEOUT_S = 30 * 86400
_LIMITS = Limits()


def rfc3339(seconds: float | None) -> str | None:
    """A timestamp as RFC 3339 (UTC, milliseconds), beside the number it is."""
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class CreateVm(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user: StrictStr = Field(min_length=1, max_length=64, pattern=USER_PATTERN,
                            description="whose VM it is; limits count per user")
    # The ranges are documented here and enforced by the manager (vm/create.py check_request), in its words.
    template: StrictStr = Field(DEFAULT, pattern=TEMPLATE_PATTERN,
                                description="what it is made from: its image, size and desktop path (GET "
                                            "/v1/templates lists them)")
    vcpus: WholeNumber | None = Field(None, description="virtual CPUs (default: the template's)", json_schema_extra={
        "minimum": _LIMITS.vcpus[0], "maximum": _LIMITS.vcpus[1]})
    mem_mib: WholeNumber | None = Field(None, description="memory in MiB (default: the template's)",
                                        json_schema_extra={"minimum": _LIMITS.mem_mib[0],
                                                           "maximum": _LIMITS.mem_mib[1]})
    labels: dict[LabelKey, LabelValue] = Field(default_factory=dict, max_length=16,
                                               json_schema_extra={"additionalProperties": False},
                                               description="up to 16 labels of the client's own, to find its VMs by "
                                                           "(GET /v1/vms?label=key=value)")
    # The bounds before the validator: after it, pydantic writes them as no JSON Schema keyword.
    timeout_s: Annotated[StrictInt, Ge(60), Le(MAX_TIMEOUT_S), BeforeValidator(whole)] | None = Field(None,
                                        description="end the VM this many seconds after its creation (capped at the "
                                                    "controller's max_lifetime; POST /v1/vms/{id}/extend moves it)")
    profile: Literal["ephemeral", "persistent"] = Field(
        "ephemeral", description="persistent: the user's browser profile (cookies, sign-ins, settings) is loaded at "
                                 "the start and saved at the end, kept on the host only as ciphertext sealed in the "
                                 "VM; one VM per user at a time (409). DELETE /v1/users/{user}/profile forgets it")
    tenant: StrictStr | None = Field(None, pattern=TENANT_PATTERN,
                                     description="whose VM it is: an admin key may name a tenant (default: none, "
                                                 "the operator's own); a tenant key's VMs are always its tenant's")


class FailureOut(BaseModel):
    hop: str = Field(description="the hop that failed, from the one list of hops")
    reason: str
    hint: str
    evidence: list[str] = Field(description="the last console lines")
    vmm_log: list[str] = Field(description="the last lines of the VMM's own log (its stderr), kept from before "
                                           "the VM's directory was removed")
    cleanup: list[str] = Field(description="resources that could not be released, each with its error")


class EgressOut(BaseModel):
    egress: Literal["internet", "none"] = Field(description="whether its VMs reach the public internet")
    egress_allow: list[str] = Field(description="networks its VMs reach even if private (or egress is none)")
    egress_deny: list[str] = Field(description="networks its VMs never reach; wins over egress_allow")


class TemplateOut(BaseModel):
    name: str
    vcpus: int = Field(description="of its VMs, unless a create gives vcpus")
    mem_mib: int = Field(description="of its VMs, unless a create gives mem_mib")
    image_profile: str | None = Field(description="the image the controller builds (full, minimal, oauth), or null "
                                                  "for an image file")
    rootfs: str | None = Field(description="the image file its VMs boot (a tenant key sees its name only), or null "
                                           "for a built profile")
    desktop_path: str = Field(description="how the controller reaches its VMs' desktops: rfb or websockify")
    pool: int = Field(description="VMs of it the warm pool keeps ready (0: none)")
    clipboard: Literal["both", "paste", "copy", "none"] = Field(
        description="which way its VMs' viewers' clipboard goes: paste (into the VM), copy (out of it)")
    egress: EgressOut | None = Field(description="its own egress policy, in place of the host's allowlist (the "
                                                 "host's denylist still applies); null: the host's policy")

    @classmethod
    def of(cls, template: Template, pool: int) -> TemplateOut:
        return cls(**template.describe(), pool=pool)


class VmOut(BaseModel):
    vm_id: str
    state: VmState
    user: str
    template: str = Field(description="what it was made from (GET /v1/templates)")
    tenant: str = Field(description="the tenant it belongs to; empty: the operator's own")
    labels: dict[str, str]
    profile: str = Field(description="persistent: the user's browser profile is loaded at its start (hop "
                                     "profile.load) and saved at its end; ephemeral: a new empty one")
    expires_at: float | None = Field(description="when it is ended (unix seconds): its timeout, or its maximum "
                                                 "lifetime")
    expires_at_rfc3339: str | None
    vcpus: int
    mem_mib: int
    created_at: float
    created_at_rfc3339: str
    uptime_s: float
    address: str
    tap: str
    mac: str
    driver: str
    accel: str = Field(description="kvm or tcg (empty until the VMM starts)")
    accel_reason: str = Field(description="why that accelerator: the KVM probe's evidence, a demotion, or the "
                                          "setting")
    retried_after: dict[str, Any] | None = Field(
        description="the first attempt's failure when the create was retried under TCG after KVM stopped its guest "
                    "(accel, hop, reason, stages, evidence, vmm_log)")
    building: str | None = Field(None, description="while the VM waits for its kernel or image to be built: the step "
                                                   "under way, e.g. 'building the guest kernel, step 5 of 7: vmlinux'")
    pid: int | None
    stages: dict[str, float] = Field(description="seconds after creation each hop passed")
    failure: FailureOut | None
    ended_reason: str
    started_from: str = Field(description="cold (booted), restored (from a snapshot) or pooled (taken ready)")
    in_pool: bool = Field(description="kept ready in the warm pool, not yet handed to a user (set by the pool alone)")
    snapshot: str = Field(description="the snapshot it was restored from (its key), or empty")
    desktop_path: str = Field(description="how the controller reaches its desktop: rfb (the VNC server on :5901) or "
                                          "websockify (:6080)")
    viewers: int = Field(description="viewers connected now")
    idle_s: float | None = Field(description="seconds without a viewer; null while one is connected")

    @classmethod
    def of(cls, record: VmRecord, viewers: int, idle_s: float | None, building: str | None = None,
           expires_at: float | None = None) -> VmOut:
        failure = record.failure
        return cls(
            vm_id=record.vm_id, state=record.state, user=record.user, template=record.template, tenant=record.tenant,
            labels=record.labels, profile=record.profile,
            expires_at=expires_at, expires_at_rfc3339=rfc3339(expires_at), vcpus=record.vcpus,
            mem_mib=record.mem_mib, created_at=record.created_at, created_at_rfc3339=rfc3339(record.created_at) or "",
            uptime_s=round(time.time() - record.created_at, 1),
            address=record.address, tap=record.tap, mac=record.mac, driver=record.driver, accel=record.accel,
            accel_reason=record.accel_reason, retried_after=record.retried_after, building=building, pid=record.pid,
            stages=record.stages, ended_reason=record.ended_reason, viewers=viewers,
            started_from=record.started_from, in_pool=record.in_pool, snapshot=record.snapshot,
            desktop_path=record.desktop_path, idle_s=None if idle_s is None else round(idle_s, 1),
            failure=None if failure is None else FailureOut(hop=failure.hop, reason=failure.reason, hint=failure.hint,
                                                            evidence=list(failure.evidence),
                                                            vmm_log=list(failure.vmm_log),
                                                            cleanup=list(failure.cleanup)))


class ViewerOut(BaseModel):
    url: str = Field(description="the viewer page, carrying the token")
    token: str
    expires_at: int = Field(description="unix seconds")
    expires_at_rfc3339: str


class RenewViewer(BaseModel):
    model_config = ConfigDict(extra="forbid")

    token: str = Field(max_length=MAX_TOKEN_LENGTH, description="the viewer's token, still valid")


class ExtendVm(BaseModel):
    model_config = ConfigDict(extra="forbid")

    timeout_s: WholeNumber = Field(ge=60, le=MAX_TIMEOUT_S, description="end the VM this many seconds from now "
                                                                      "(capped at its maximum lifetime)")


class ConsoleOut(BaseModel):
    vm_id: str
    lines: list[str]


class ErrorBody(BaseModel):
    type: str
    message: str
    field: str | None = None
    limit: str | None = None
    state: str | None = None


class ErrorOut(BaseModel):
    error: ErrorBody
