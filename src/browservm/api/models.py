"""The shapes of the REST API, as pydantic models: what a client sends and what it gets back.

Requests forbid unknown fields and take numbers strictly (no "1", no 1.0, no true), so a
mistyped field is a 422 that names it rather than a VM with a surprising size.
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from browservm.access.principal import TENANT_PATTERN
from browservm.vm.records import VmRecord


class CreateVm(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user: StrictStr = Field(min_length=1, max_length=64, description="whose VM it is; limits count per user")
    vcpus: StrictInt | None = Field(None, description="virtual CPUs (default 1)")
    mem_mib: StrictInt | None = Field(None, description="memory in MiB (default 1024)")
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


class VmOut(BaseModel):
    vm_id: str
    state: str = Field(description="creating, booting, ready, failed, destroying or ended")
    user: str
    tenant: str = Field(description="the tenant it belongs to; empty: the operator's own")
    vcpus: int
    mem_mib: int
    created_at: float
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
    desktop_path: str = Field(description="how the controller reaches its desktop: rfb (x11vnc on :5901) or "
                                          "websockify (:6080)")
    viewers: int = Field(description="viewers connected now")
    idle_s: float | None = Field(description="seconds without a viewer; null while one is connected")

    @classmethod
    def of(cls, record: VmRecord, viewers: int, idle_s: float | None, building: str | None = None) -> VmOut:
        failure = record.failure
        return cls(
            vm_id=record.vm_id, state=record.state.value, user=record.user, tenant=record.tenant, vcpus=record.vcpus,
            mem_mib=record.mem_mib, created_at=record.created_at, uptime_s=round(time.time() - record.created_at, 1),
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
