"""The controller service: the VM manager plus what a server adds around it.

    viewers     who is looking at which VM, since when nobody is (for the reaper and the API)
    tokens      viewer links, signed and bound to one VM (tokens.py)
    events      each VM's hops as they pass, for Server-Sent Events (events.py)
    metrics     Prometheus (metrics.py)
    reaper      ends a VM nobody has looked at for `idle_timeout`, or older than `max_lifetime`
    proxy       the WebSocket relay from a viewer to its VM's desktop (proxy.py)

Routes (app.py) only translate HTTP to calls on this class. Everything here runs on the event
loop; what blocks (the store, the console file, the host network) goes to threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from ipaddress import IPv4Address

from starlette.websockets import WebSocket

from browservm.access.audit import AuditEntry, AuditTrail
from browservm.access.keys import KeyRing
from browservm.access.principal import OPERATOR, Principal
from browservm.access.quotas import Quotas
from browservm.api.auth import Access, session_key
from browservm.api.events import EventBus, VmEvent
from browservm.api.idempotency import IdempotencyRecords
from browservm.api.metrics import Metrics
from browservm.api.models import CreateVm, ViewerOut, VmOut, rfc3339
from browservm.api.proxy import (
    MAX_VIEWERS_PER_LINK,
    MAX_VIEWERS_PER_VM,
    TOO_MANY_VIEWERS,
    VM_UNREACHABLE,
    Direction,
    Ended,
    Refused,
    Upstream,
    ViewerProxy,
)
from browservm.api.tokens import TokenRefused, ViewerTokens
from browservm.controller import Controller
from browservm.errors import BrowserVMError, StateConflict, VmmError, VmNotFound, WrongState
from browservm.hostnet.watch import RulesetWatch
from browservm.ids import validate_vm_id
from browservm.inotify import DirectoryWatch
from browservm.store import Store
from browservm.templates import CLIPBOARD
from browservm.vm.console import ConsoleLog
from browservm.vm.desktop_path import desktop_path
from browservm.vm.hops import DESKTOP_COMPLETE, RFB_AUTH
from browservm.vm.pool import WarmPool
from browservm.vm.records import Owner, VmQuery, VmRecord, VmRecords
from browservm.vm.state import VmState

log = logging.getLogger("browservm.service")
_LIVE = (VmState.CREATING, VmState.BOOTING, VmState.READY)
_REAP_EVERY_S = 10.0
_STREAM_POLL_S = 2.0
_FIREWALL_RECHECK_S = 30.0  # between notifications, in case one could not be had
PREPARED_FOR_CLAIM_S = 30.0  # a claimed VM's prepared desktop connection waits this long for its viewer
_CONSOLE_CAP_S = 5.0
_CAS_TRIES = 5  # a compare-and-set retried this often against other writers of one record


class _Metered:
    """The proxy's events, counted in Prometheus metrics."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def opened(self) -> None:
        self._metrics.viewers.inc()

    def closed(self, code: int) -> None:
        self._metrics.viewers.dec()
        self._metrics.proxy_closes.labels(code=str(code)).inc()

    def bytes(self, direction: Direction, n: int) -> None:
        self._metrics.proxy_bytes.labels(direction=direction).inc(n)


class ControllerService:
    def __init__(self, controller: Controller, *, api_key: str, tokens: ViewerTokens,
                 proxy: ViewerProxy | None = None) -> None:
        self.settings = controller.settings
        self.manager = controller.manager
        self.network = controller.network
        self._records = VmRecords(controller.store)  # for the metrics scrape (in its thread), listings, extend
        self.api_key = api_key
        # Who may do what (access/): the state directory's key is the first admin key. A connection of its
        # own to the state database: every request's key is read there, beside the manager's work.
        self.own_store = Store(controller.store.path)
        self.keys = KeyRing(self.own_store)
        self.keys.adopt_operator(api_key)
        self.quotas = Quotas(self.own_store)
        self.audit = AuditTrail(self.own_store, self.settings.audit_retention)
        self.idempotency = IdempotencyRecords(self.own_store)
        self.access = Access(self.keys, session_key(api_key))
        self.tokens = tokens
        self.metrics = Metrics(self._states)
        self.proxy = proxy or ViewerProxy(_Metered(self.metrics))
        self.events = EventBus()
        # Also told of each change, after the service (webhooks/: a VM's ready, failed, ended, destroyed).
        self.on_vm_change: list[Callable[[VmRecord, str], None]] = []
        self._viewers: dict[str, int] = {}
        self._per_link: dict[str, int] = {}  # viewers connected by each viewer token
        self._idle_since: dict[str, float] = {}
        self._gone: dict[str, set[Ended]] = {}  # each viewer's, by VM: ended with it
        self._tasks: list[asyncio.Task[None]] = []
        self._background: list[Callable[[], Awaitable[None]]] = []
        self.pools: dict[str, WarmPool] = self.manager.pools  # the manager made them (controller.warm_pools)
        for pool in self.pools.values():
            pool.on_claim = self._claimed
            self.run_in_background(pool.run)
        self.metrics.snapshot_age.set_function(self._snapshot_age)
        self._stop_hooks: list[Callable[[], Awaitable[None]]] = []
        self._started = time.time()
        self.stopping = asyncio.Event()
        self.manager.on_change = self._changed
        self.manager.on_note = self._noted
        self.run_in_background(self.audit.run)

    # --- life ---------------------------------------------------------------------------

    async def start(self) -> list[str]:
        """Host network up, reconcile with what runs, then watch VMs and reap idle ones. One line per action."""
        changes = await asyncio.to_thread(self.network.up)
        actions = [f"host network: {c.action} {c.piece}" for c in changes if c.action != "unchanged"]
        actions += await self.manager.reconcile()
        await self.manager.watch_all()
        self._tasks = [asyncio.create_task(self._watch_store()), asyncio.create_task(self._reap()),
                       asyncio.create_task(self._keep_firewall()), asyncio.create_task(self._cap_consoles())]
        self._tasks += [asyncio.ensure_future(work()) for work in self._background]
        return actions

    def run_in_background(self, work: Callable[[], Awaitable[None]]) -> None:
        """Run `work` from start() until stop(), as one of the service's own tasks (for the parts built
        on the service: logins, drift checks). Register before start()."""
        self._background.append(work)

    def on_stop(self, hook: Callable[[], Awaitable[None]]) -> None:
        """Await `hook` at stop(), before the service's tasks are cancelled (newest first)."""
        self._stop_hooks.append(hook)

    async def stop_serving(self) -> None:
        """Before the server closes connections: viewers get 1001 with a reason, event streams end."""
        self.stopping.set()
        await self.proxy.shutdown()
        self.events.close()

    async def stop(self) -> None:
        """Tasks stop; VMs keep running (re-found at the next start) unless stop_vms_on_exit."""
        await self.stop_serving()
        for hook in reversed(self._stop_hooks):
            await hook()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.settings.stop_vms_on_exit:
            for record in await self.manager.all():
                if record.state in (*_LIVE, VmState.FAILED):
                    await self.manager.destroy(record.vm_id, ended_reason="the controller stopped")
        await self.manager.close()
        self.own_store.close()

    async def _watch_store(self) -> None:
        """VMs created by other browservm processes (the CLI) appear in the store: watch them too."""
        async with DirectoryWatch(self.settings.state_dir) as watch:
            while True:
                await self.manager.watch_all()
                await watch.changed()

    async def _keep_firewall(self) -> None:
        """Put our nftables tables and routing rules back as soon as another program removes or changes
        them (Debian's nftables service flushes the ruleset on reload): woken by the kernel's notification
        of the change (hostnet/watch.py). Until then VMs reach nothing (the host network fails closed);
        each restoration is logged and recorded. Checked every _FIREWALL_RECHECK_S regardless, with the
        subscription made again: a namespace deleted and made again under the same name is a new one."""
        loop = asyncio.get_running_loop()
        while True:
            watch = await self._watch_firewall()
            try:
                await self._check_firewall()  # subscribed first: no change slips in before the check
                until = loop.time() + _FIREWALL_RECHECK_S
                while watch is not None and await watch.changed(until - loop.time()):
                    await self._check_firewall()
                if watch is None:
                    await asyncio.sleep(_FIREWALL_RECHECK_S)  # no subscription could be had (logged): a timer alone
            finally:
                if watch is not None:
                    watch.close()

    async def _watch_firewall(self) -> RulesetWatch | None:
        try:
            return await asyncio.to_thread(self.network.watch)
        except BrowserVMError as exc:
            log.warning("host network drift watch: %s", exc)
            return None

    async def _check_firewall(self) -> None:
        try:
            await asyncio.to_thread(self.network.check_and_restore)
        except BrowserVMError as exc:
            log.warning("host network drift check: %s", exc)

    async def _cap_consoles(self) -> None:
        """A guest that floods its console fills at most console.MAX_DISK of the host's disk, plus what
        it prints in one interval."""
        while True:
            await asyncio.sleep(_CONSOLE_CAP_S)
            try:
                freed = await asyncio.to_thread(self.manager.cap_consoles)
            except BrowserVMError as exc:
                log.warning("console cap: %s", exc)
                continue
            for vm_id, count in freed.items():
                log.info("%s: freed %d bytes from the middle of its console log", vm_id, count)

    # --- what the manager tells ---------------------------------------------------------

    def _claimed(self, hit: bool, seconds: float) -> None:
        self.metrics.pool_claims.labels(outcome="hit" if hit else "miss").inc()
        if hit:
            self.metrics.claim_seconds.observe(seconds)

    def _snapshot_age(self) -> float:
        """For the metrics scrape, in its thread: the newest snapshot's age, or 0 without one."""
        ages = [snapshot.age for snapshot in self.manager.snapshots.all()]
        return min(ages) if ages else 0.0

    async def _upstream(self, record: VmRecord) -> Upstream:
        """Where the proxy finds the VM's desktop, with its VNC password (VmmError if unreadable)."""
        secrets = await asyncio.to_thread(self.manager.secrets, record.vm_id)
        path = desktop_path(record.desktop_path)
        return Upstream(self.network.netns, IPv4Address(record.address.split("/")[0]), port=path.port,
                        websocket=path.websocket, vnc_password=secrets.get("vnc"), key=record.vm_id,
                        paste=(await self.clipboard_of(record))[0])

    async def clipboard_of(self, record: VmRecord) -> tuple[bool, bool]:
        """(paste, copy): which way the VM's viewers' clipboard goes: as its template and its tenant both allow
        (PUT /v1/tenants/{t}/clipboard); a template gone since the VM was made (a changed templates file):
        neither way."""
        templates = self.manager.templates
        if record.template not in templates:
            return False, False
        template = templates.get(record.template)
        paste, copy = CLIPBOARD[await asyncio.to_thread(self.quotas.clipboard, record.tenant)]
        return template.paste and paste, template.copy and copy

    def _noted(self, record: VmRecord, kind: str, detail: str) -> None:
        self.events.publish(VmEvent(vm_id=record.vm_id, event=kind, state=record.state.value, detail=detail))

    def _changed(self, record: VmRecord, event: str) -> None:
        if event == "ready" and record.started_from == "pooled":
            # Just claimed: its user is loading the viewer page, whose connection can be made meanwhile.
            # Not earlier, when it entered the pool: x11vnc answered the first update request on a
            # connection made 10 s before 5 or 10 s late (measured, with -nonap).
            self.proxy.prepare(record.vm_id, partial(self._upstream, record), within=PREPARED_FOR_CLAIM_S)
        failure = record.failure
        self.events.publish(VmEvent(
            vm_id=record.vm_id, event=event, state=record.state.value, seconds=record.stages.get(event),
            hop=failure.hop if failure and event == "failed" else None,
            reason=(failure.reason if failure and event == "failed" else record.ended_reason or None)))
        if event in record.stages:
            self.metrics.stage_seconds.labels(stage=event).observe(record.stages[event])
        if event == "ready":
            self._idle_since[record.vm_id] = time.time()
            if record.started_from != "pooled" and DESKTOP_COMPLETE in record.stages:
                self.metrics.ready_seconds.labels(started_from=record.started_from).observe(
                    record.stages[DESKTOP_COMPLETE])
        if event == "failed" and failure is not None:
            self.metrics.failures.labels(hop=failure.hop).inc()
        if event in ("failed", "ended", "destroyed"):
            reason = {"failed": f"the VM failed at {failure.hop if failure else '?'}: "
                                f"{failure.reason if failure else ''}",
                      "ended": f"the VM was stopped: {record.ended_reason}",
                      "destroyed": "the VM was deleted"}[event]
            for gone in self._gone.pop(record.vm_id, set()):
                gone.end(reason)
            self.proxy.drop(record.vm_id)
            self._idle_since.pop(record.vm_id, None)
        for listener in self.on_vm_change:
            listener(record, event)

    def _states(self) -> list[VmState]:
        """For the metrics scrape, in its thread."""
        return [record.state for record in self._records.all()]

    async def readiness(self) -> dict[str, tuple[bool, str]]:
        """/readyz: the store answers, the host network is as `host up` makes it, a VMM can run."""
        checks: dict[str, tuple[bool, str]] = {}
        # A check that cannot run is a failing check, whatever it raises (SQLite's own errors, netlink's):
        # /readyz answers 503 naming it, not a 500 that names nothing.
        try:
            await asyncio.to_thread(self._records.all)
            checks["store"] = (True, str(self.settings.database))
        except Exception as exc:
            checks["store"] = (False, _why(exc))
        try:
            wrong = [c for c in await asyncio.to_thread(self.network.status) if not c.ok]
            checks["host network"] = (not wrong, "; ".join(f"{c.piece}: {c.detail}" for c in wrong)
                                      or "as `host up` makes it")
        except Exception as exc:
            checks["host network"] = (False, _why(exc))
        driver = self.manager.driver
        checks["vmm"] = (True, f"{driver.name}; VMMs run in {driver.placement.name}: {driver.placement.reason}")
        checks["accelerator"] = (True, await asyncio.to_thread(driver.accel_status))
        return checks

    # --- VMs ----------------------------------------------------------------------------

    async def create(self, request: CreateVm, wait: bool, principal: Principal = OPERATOR) -> VmRecord:
        tenant = principal.tenant_for(request.tenant)
        quota = await asyncio.to_thread(self.quotas.get, tenant)
        # The template's size only for what was left out: 0 is a size the manager refuses, not "the default".
        owner = Owner(tenant, quota, request.labels, request.timeout_s, request.profile)
        record, task = await self.manager.start(request.user, request.vcpus, request.mem_mib, owner=owner,
                                                template=request.template)
        if not wait:
            return record
        try:
            return await asyncio.shield(task)  # a client that leaves does not take the VM with it
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if not task.cancelled() or (me is not None and me.cancelling()):
                raise  # this request was cancelled (its client left); the VM carries on
        # The create itself was cancelled, by a DELETE of this VM or the controller stopping: the waiting
        # client gets a 409 saying what became of its VM, not a cancellation escaping into the server.
        current = await self.manager.get(record.vm_id)
        raise StateConflict(record.vm_id, VmState.READY.value, None if current is None else current.state.value)

    async def get(self, vm_id: str, principal: Principal = OPERATOR) -> VmRecord:
        """The VM, if `principal` may see it: another tenant's is not found, as one that never was."""
        record = await self.manager.get(vm_id)
        if record is None or not principal.sees(record.tenant):
            raise VmNotFound(vm_id)
        return record

    async def all(self, principal: Principal = OPERATOR) -> list[VmRecord]:
        return [record for record in await self.manager.all() if principal.sees(record.tenant)]

    async def page(self, query: VmQuery, principal: Principal = OPERATOR) -> tuple[list[VmRecord], int | None]:
        """A page of the VMs `principal` may see (a tenant key's query is narrowed to its tenant)."""
        query = dataclasses.replace(query, tenant=principal.tenant_filter(query.tenant))
        return await asyncio.to_thread(self._records.page, query)

    async def extend(self, vm_id: str, timeout_s: int, principal: Principal = OPERATOR) -> VmRecord:
        """End the VM `timeout_s` from now instead (within its maximum lifetime); WrongState unless it is ready.

        Not while it boots: its create writes its record at each hop, and a change of ours in between would
        read to the create as a destroy (a compare-and-set it lost). Once ready, its writers read it afresh."""
        attempt = 1
        while True:
            record = await self.get(vm_id, principal)
            if record.state != VmState.READY:
                raise WrongState(vm_id, record.state.value, "only a ready VM can be extended (a booting one once "
                                                            "it is ready)")
            record.timeout_at = time.time() + timeout_s
            try:
                await asyncio.to_thread(self._records.save, record)
                return record
            except StateConflict:
                if attempt == _CAS_TRIES:
                    raise  # it changed meanwhile each time we read it
                attempt += 1

    async def destroy(self, vm_id: str, principal: Principal = OPERATOR) -> bool:
        record = await self.manager.get(vm_id)
        if record is not None and not principal.sees(record.tenant):
            return False  # as for a VM that is not there
        return await self.manager.destroy(vm_id)

    async def console(self, vm_id: str, lines: int, principal: Principal = OPERATOR) -> list[str]:
        await self.get(vm_id, principal)
        return await asyncio.to_thread(ConsoleLog(self.manager.console(vm_id).path).tail, lines)

    def describe(self, record: VmRecord) -> VmOut:
        viewers = self._viewers.get(record.vm_id, 0)
        since = self._idle_since.get(record.vm_id)
        idle = None if viewers or since is None else time.time() - since
        return VmOut.of(record, viewers, idle, self.building(record), self.expires_at(record))

    def expires_at(self, record: VmRecord) -> float | None:
        """When the reaper ends it: its own timeout, within the maximum lifetime (None: the pool's, never)."""
        if record.in_pool:
            return None
        latest = record.created_at + self.settings.max_lifetime
        return latest if record.timeout_at is None else min(record.timeout_at, latest)

    def building(self, record: VmRecord, for_viewer: bool = False) -> str | None:
        """The build step a VM waits for, in words: while it is created before any of its hops passed. A
        viewer is told the step, not the host's commands and paths."""
        step = self.manager.building_of(record.template)  # its own image's build, not another template's
        if step is None or record.state != VmState.CREATING or record.stages:
            return None
        return step.headline() if for_viewer else step.describe()

    async def stream(self, vm_id: str) -> AsyncIterator[VmEvent]:
        """The hops the VM passed so far, then each new one, until ready, failed, ended or destroyed.

        The record is the source of truth and events only wake the stream: a VM that another
        process (the CLI) is creating sends no events here, so the record is also read every 2 s.
        """
        subscription = self.events.subscribe(vm_id)  # before the record is read: nothing slips in between
        sent: set[str] = set()
        told_building = None
        try:
            while True:
                record = await self.manager.get(vm_id)
                if record is None:
                    yield VmEvent(vm_id, "destroyed", "deleted")
                    return
                # The build under way (each step wakes the stream), a retry under TCG.
                building, step = self.building(record), self.manager.building_of(record.template)
                if building is not None and step is not None and building != told_building:
                    told_building = building
                    yield VmEvent(vm_id, "build", record.state.value, detail=building, log=step.log or None)
                if record.retried_after and "retry" not in sent:
                    sent.add("retry")
                    yield VmEvent(vm_id, "retry", record.state.value,
                                  detail=f"{record.retried_after['hop']}: {record.retried_after['reason']}")
                for stage, seconds in record.stages.items():
                    if stage not in sent:
                        sent.add(stage)
                        yield VmEvent(vm_id, stage, record.state.value, seconds=seconds)
                if record.state in (VmState.READY, VmState.FAILED, VmState.ENDED):
                    failure = record.failure
                    yield VmEvent(vm_id, record.state.value, record.state.value,
                                  hop=failure.hop if failure else None,
                                  reason=failure.reason if failure else record.ended_reason or None)
                    return
                if not await subscription.wake(_STREAM_POLL_S):
                    return
        finally:
            subscription.close()

    # --- viewers -------------------------------------------------------------------------

    async def viewer(self, vm_id: str, principal: Principal = OPERATOR) -> ViewerOut:
        record = await self.get(vm_id, principal)
        if record.state not in _LIVE:
            raise WrongState(vm_id, record.state.value, "only a VM that is booting or ready can be viewed")
        return self._link(record)

    async def renew_viewer(self, vm_id: str, token: str) -> ViewerOut:
        """A new link for an open viewer whose token is still valid: its session lasts, its link does not."""
        record = await self.check_token(vm_id, token)
        if record.state not in _LIVE:
            raise WrongState(vm_id, record.state.value, "only a VM that is booting or ready can be viewed")
        return self._link(record)

    def _link(self, record: VmRecord) -> ViewerOut:
        token, expires = self.tokens.issue(record.vm_id, record.viewer_epoch, until=self.expires_at(record))
        return ViewerOut(url=f"{self.settings.base_url}/view/{record.vm_id}?token={token}", token=token,
                         expires_at=expires, expires_at_rfc3339=rfc3339(expires) or "")

    async def check_token(self, vm_id: str, token: str) -> VmRecord:
        """The VM, if `token` opens it; TokenRefused or VmNotFound otherwise."""
        validate_vm_id(vm_id)
        record = await self.manager.get(vm_id)
        if record is None:
            # Checked first: a token for a deleted VM could tell nothing else anyway.
            raise VmNotFound(vm_id)
        self.tokens.check(token, vm_id, record.viewer_epoch)
        return record

    async def connect_viewer(self, websocket: WebSocket, vm_id: str, token: str) -> int:
        """Relay one viewer to its VM's desktop; the close code it ended with."""
        counted = False
        tenant: str | None = None  # the VM's, once the viewer is let in: its connect and disconnect are audited
        # One per connection, registered only while it lasts: an entry kept per VM id would let anyone
        # grow the controller's memory with connections to ids that do not exist.
        gone = Ended()
        self._gone.setdefault(vm_id, set()).add(gone)

        async def resolve() -> Upstream:
            nonlocal counted, tenant
            try:
                record = await self.check_token(vm_id, token)
            except TokenRefused as exc:
                raise Refused(4401, exc.reason) from None
            except (VmNotFound, ValueError):
                raise Refused(4404, f"no VM {vm_id[:63]}") from None
            if record.state != VmState.READY:
                failure = record.failure
                detail = f" at {failure.hop}: {failure.reason}" if failure else ""
                raise Refused(4409, f"the VM is {record.state.value}{detail}")
            # Each viewer holds memory here and a connection in the guest's x11vnc: a link (or many
            # links) opened over and over must not take the controller with it (issue 18).
            if self._viewers.get(vm_id, 0) >= MAX_VIEWERS_PER_VM:
                raise Refused(TOO_MANY_VIEWERS, f"the VM has {MAX_VIEWERS_PER_VM} viewers already, the most it takes")
            if self._per_link.get(token, 0) >= MAX_VIEWERS_PER_LINK:
                raise Refused(TOO_MANY_VIEWERS, f"this viewer link is open in {MAX_VIEWERS_PER_LINK} viewers "
                                                "already, the most one link takes")
            self._viewers[vm_id] = self._viewers.get(vm_id, 0) + 1
            self._per_link[token] = self._per_link.get(token, 0) + 1
            self._idle_since.pop(vm_id, None)
            counted = True
            tenant = record.tenant
            await self.record_audit(AuditEntry("", tenant, "viewer.connect", vm_id, "accepted"))
            try:
                return await self._upstream(record)
            except VmmError as exc:
                raise Refused(VM_UNREACHABLE, f"{RFB_AUTH}: {exc.reason}") from None

        code = 1006  # what the audit trail says if the relay itself fails
        try:
            code = await self.proxy.serve(websocket, resolve, gone)
            return code
        finally:
            watching = self._gone.get(vm_id)
            if watching is not None:
                watching.discard(gone)
                if not watching:
                    del self._gone[vm_id]
            if counted:
                self._per_link[token] -= 1
                if not self._per_link[token]:
                    del self._per_link[token]
                self._viewers[vm_id] -= 1
                if not self._viewers[vm_id]:
                    del self._viewers[vm_id]
                    self._idle_since[vm_id] = time.time()
            if tenant is not None:
                await self.record_audit(AuditEntry("", tenant, "viewer.disconnect", vm_id, f"closed {code}"))

    async def record_audit(self, entry: AuditEntry) -> None:
        """Record `entry`; a trail that cannot be written is logged (audit.py), not the viewer's failure."""
        with contextlib.suppress(BrowserVMError):
            await self.audit.record(entry)

    # --- reaper --------------------------------------------------------------------------

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(min(_REAP_EVERY_S, self.settings.idle_timeout / 4))
            for vm_id, reason in self.due_for_reaping(await self.manager.all(), time.time()).items():
                log.info("reaping %s: %s", vm_id, reason)
                with contextlib.suppress(Exception):  # the next round tries again; destroy logs its own errors
                    await self.manager.destroy(vm_id, ended_reason=reason)

    def due_for_reaping(self, records: list[VmRecord], now: float) -> dict[str, str]:
        """VM id -> why, for every ready VM past its lifetime or without a viewer for too long, and every
        pooled one no pool of this controller keeps (its template's pool, or the template, gone at a restart)."""
        due = {}
        for record in records:
            if record.state == VmState.READY and record.in_pool and record.template not in self.pools:
                due[record.vm_id] = f"reaped: pooled for template {record.template!r}, which has no pool now"
                continue
            if record.state != VmState.READY or record.in_pool:  # the pool recycles its own
                continue
            expires = self.expires_at(record)
            if expires is not None and now > expires:
                own = record.timeout_at is not None and expires == record.timeout_at
                due[record.vm_id] = (f"reaped: its timeout ended at {rfc3339(expires)}" if own else
                                     f"reaped: older than the maximum lifetime of {self.settings.max_lifetime} s")
            elif not self._viewers.get(record.vm_id):
                since = self._idle_since.setdefault(record.vm_id, max(self._started, record.created_at))
                if now - since > self.settings.idle_timeout:
                    due[record.vm_id] = f"reaped: no viewer for {self.settings.idle_timeout} s"
        return due


def _why(exc: Exception) -> str:
    """An error as a readiness check's detail: ours say it in words, others need their kind too."""
    if isinstance(exc, BrowserVMError):
        return str(exc)
    log.warning("readiness check failed", exc_info=exc)
    return f"{type(exc).__name__}: {exc}"
