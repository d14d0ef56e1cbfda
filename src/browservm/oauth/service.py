"""LoginService: a provider's login in a throwaway VM, from request to credentials in the vault.

    start()   check, write the login's record (one running per user and provider), boot a VM (or take
              the one given), return at once with the record; the login runs in a task of its own:
    _run()    booting           wait for the VM to be ready (its failure is the login's, with its hop)
              starting          wait for the agent, POST /v1/login with the catalog's entry
              waiting-for-user  poll GET /v1/status (every `poll_s`) until a final state or the deadline
              captured          hand the credentials over once, check their hash, seal them in the vault
              failed / timed-out / cancelled, with the hop and reason (the tool's exit status and output)
              afterwards the VM is destroyed, unless keep_vm
    cancel()  DELETE: the task is cancelled; it tells the agent to stop the tool, then ends `cancelled`

The record (store) is the source of truth; changes also wake event streams in this process. Every
record write is a compare-and-set; every task is the service's own and is cancelled by `stop()`.
Nothing here logs, raises or stores a credential: the files go from the agent's answer to the vault.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from browservm.access.quotas import NO_QUOTA, Quota
from browservm.errors import BrowserVMError, InvalidInput, VmNotFound, WrongState
from browservm.hostnet.netns import NetworkNamespace
from browservm.inotify import DirectoryWatch
from browservm.oauth.agent import CONNECT, PROTOCOL, AgentClient, AgentEndpoint, AgentStatus
from browservm.oauth.catalog import Catalog, Provider
from browservm.oauth.errors import AgentError, CatalogError, LoginConflict, LoginNotFound
from browservm.oauth.records import LoginRecord, LoginRecords, bounded_output, new_login_id, validate_login_id
from browservm.oauth.redact import Redactor, captured_secrets
from browservm.oauth.states import LoginState, transition
from browservm.oauth.vault import StoredCredentials, Vault
from browservm.templates import DEFAULT
from browservm.vm import hops
from browservm.vm.console import ConsoleLog
from browservm.vm.manager import VMManager
from browservm.vm.records import PERSISTENT, Owner, VmRecord
from browservm.vm.state import VmState

log = logging.getLogger("browservm.logins")

TOOL = "tool"  # the failing "hop" when the tool itself failed
VAULT = "vault"
VM = "vm"
_STREAM_POLL_S = 2.0
_AGENT_RETRY_S = 0.2
_VM_CHECK_S = 0.5
_POLL_FAILURES = 3  # consecutive failed polls before the agent counts as gone
_DEADLINE_GRACE_S = 2.0  # the agent's own deadline (the same timeout) normally ends it first
_CANCEL_WAIT_S = 15.0


class _Failed(Exception):
    def __init__(self, hop: str, reason: str, exit_status: int | None = None, output: list[str] | None = None) -> None:
        super().__init__(f"{hop}: {reason}")
        self.hop = hop
        self.reason = reason
        self.exit_status = exit_status
        self.output = output or []


@dataclass(frozen=True)
class Started:
    login: LoginRecord
    viewer_url: str


class LoginService:
    def __init__(self, *, manager: VMManager, records: LoginRecords, vault: Vault, catalog: Catalog,
                 netns: NetworkNamespace, state_dir: Path, viewer: Callable[[str], Awaitable[str]], vcpus: int = 1,
                 mem_mib: int = 2048, agent_wait_s: float = 90.0, poll_s: float = 0.1) -> None:
        self._manager = manager
        self._records = records
        self._vault = vault
        self.catalog = catalog
        self._netns = netns
        self._state_dir = state_dir  # where the store's database is written
        self._viewer = viewer
        self.vcpus = vcpus  # of a login's VM whose provider names no template
        self.mem_mib = mem_mib
        for provider in catalog.providers.values():  # refused at the start, not at a login
            if provider.template is not None and provider.template not in manager.templates:
                raise CatalogError(", ".join(catalog.sources), provider.name, "template",
                                   f"no such template {provider.template!r} (known: "
                                   f"{', '.join(manager.templates.names())})")
        self.agent_wait_s = agent_wait_s  # after the VM is ready, for the agent to answer
        self.poll_s = poll_s
        # How to reach a VM's agent: its address, port 7000, in the VM network's namespace. Tests and the
        # benchmark point it at an agent of their own.
        self.agent_endpoint: Callable[[VmRecord], AgentEndpoint] = self._endpoint
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._changed = asyncio.Event()
        self._stopping = False
        self.on_close: Callable[[], None] | None = None  # after stop(): what the service was given to close
        self.on_captured: Callable[[LoginRecord], Awaitable[None]] | None = None  # the audit trail's
        self.on_ended: Callable[[LoginRecord], None] | None = None  # each final state as written (webhooks)

    def _endpoint(self, record: VmRecord) -> AgentEndpoint:
        return AgentEndpoint(self._netns, IPv4Address(record.address.split("/")[0]))

    # --- life -----------------------------------------------------------------------------

    async def reconcile(self) -> list[str]:
        """At start: a login left running by a controller that stopped ends failed, its VM destroyed."""
        actions = []
        for login in await asyncio.to_thread(self._records.running):
            if login.login_id in self._tasks:
                continue
            try:
                await self._finish(login, LoginState.FAILED, hop=hops.CONTROLLER,
                                   reason="the controller stopped during the login")
            except LoginConflict:
                continue
            await self._release_vm(login)
            actions.append(f"login {login.login_id}: the controller stopped during it: failed")
        return actions

    async def stop(self) -> None:
        """Every running login ends (failed: the controller stopped), its VM destroyed unless kept."""
        self._stopping = True
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=60.0)
        self._notify()  # event streams see `stopping` and end
        if self.on_close is not None:
            self.on_close()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # --- requests -------------------------------------------------------------------------

    async def start(self, user: str, provider_name: str, vm_id: str | None = None, keep_vm: bool = False, *,
                    tenant: str = "", quota: Quota = NO_QUOTA, keep_profile: bool = False) -> Started:
        """`tenant`: whose login, VM and credentials these are, within its `quota` (access/); `keep_profile`: the
        login's VM has the user's persistent browser profile (a sign-in at the provider is remembered)."""
        provider = self.catalog.get(provider_name)
        template = self._manager.template(provider.template or DEFAULT)
        vcpus, mem_mib = (template.vcpus, template.mem_mib) if provider.template else (self.vcpus, self.mem_mib)
        self._manager.check_request(user, vcpus, mem_mib)
        if vm_id is not None:
            vm = await self._manager.get(vm_id)
            if vm is None or vm.tenant != tenant:
                raise VmNotFound(vm_id)
            if vm.user != user:
                raise InvalidInput("vm_id", vm_id, f"belongs to another user than {user!r}")
            if vm.state not in (VmState.CREATING, VmState.BOOTING, VmState.READY):
                raise WrongState(vm_id, vm.state.value, "a login needs a VM that is booting or ready")
            if keep_profile:
                raise InvalidInput("keep_profile", True, "a login in a given VM has that VM's profile (give it at "
                                                         "the VM's create instead)")
        login = LoginRecord(login_id=new_login_id(), user=user, provider=provider.name, vm_id=vm_id or "",
                            keep_vm=keep_vm, vm_given=vm_id is not None, tenant=tenant)
        login.states[LoginState.BOOTING.value] = 0.0
        await asyncio.to_thread(self._records.insert, login, quota.logins_per_hour)
        try:
            if vm_id is None:
                owner = Owner(tenant, quota, profile=PERSISTENT if keep_profile else "ephemeral")
                vm, _ = await self._manager.start(user, vcpus, mem_mib, owner=owner, template=template.name)
                login.vm_id = vm.vm_id
                await asyncio.to_thread(self._records.save, login)
            viewer = await self._viewer(login.vm_id)
        except BaseException as exc:
            # The request fails (a limit, a VM gone meanwhile): so does the login, and what was booted goes.
            hop, reason = (exc.hop, exc.reason) if isinstance(exc, AgentError) else (VM, _words(exc))
            with contextlib.suppress(LoginConflict):
                await self._finish(login, LoginState.FAILED, hop=hop, reason=reason)
            await asyncio.shield(self._release_vm(login))
            raise
        self._tasks[login.login_id] = task = asyncio.create_task(self._run(login, provider))
        task.add_done_callback(lambda _: self._tasks.pop(login.login_id, None))
        log.info("login %s: %s for user %s in VM %s", login.login_id, provider.name, user, login.vm_id)
        return Started(login, viewer)

    async def get(self, login_id: str) -> LoginRecord:
        login = await asyncio.to_thread(self._records.get, validate_login_id(login_id))
        if login is None:
            raise LoginNotFound(login_id)
        return login

    async def all(self, user: str | None = None, tenant: str | None = None, *, limit: int = 200,
                  state: str | None = None, before: int | None = None) -> tuple[list[LoginRecord], int | None]:
        """A page of logins, newest first, and the next page's cursor (LoginRecords.all)."""
        return await asyncio.to_thread(self._records.all, user, limit, tenant, state=state, before=before)

    async def cancel(self, login_id: str) -> tuple[LoginRecord, bool]:
        """Cancel a running login; (its record, whether this call cancelled it)."""
        login = await self.get(login_id)
        if login.state.final:
            return login, False
        task = self._tasks.get(login_id)
        if task is None:  # running in the store, but no task here: its controller went away
            try:
                await self._finish(login, LoginState.CANCELLED, hop=None, reason="cancelled (DELETE)")
            except LoginConflict:
                return await self.get(login_id), False
            await self._release_vm(login)
            return await self.get(login_id), True
        task.cancel()
        await asyncio.wait([task], timeout=_CANCEL_WAIT_S)
        login = await self.get(login_id)
        return login, login.state == LoginState.CANCELLED

    async def stream(self, login_id: str) -> AsyncIterator[LoginRecord]:
        """The login now, then at each change, until a final state (or the controller stops)."""
        seen = -1
        while True:
            waiter = self._changed  # before the read: a change after it wakes this waiter
            login = await self.get(login_id)
            if login.version != seen:
                seen = login.version
                yield login
            if login.state.final or self._stopping:
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_STREAM_POLL_S):  # not wait_for: see inotify.DirectoryWatch.changed
                    await waiter.wait()

    async def credentials(self, user: str, provider: str, tenant: str = "") -> StoredCredentials:
        return await asyncio.to_thread(self._vault.get, user, provider, tenant)

    async def forget(self, user: str, provider: str, tenant: str = "") -> bool:
        return await asyncio.to_thread(self._vault.delete, user, provider, tenant)

    # --- one login --------------------------------------------------------------------------

    async def _run(self, login: LoginRecord, provider: Provider) -> None:
        agent: AgentClient | None = None
        try:
            vm = await self._ready_vm(login)
            secrets = await asyncio.to_thread(self._manager.secrets, vm.vm_id)
            agent = AgentClient(self.agent_endpoint(vm), secrets["agent"])
            # Every output and reason the tool gives is redacted, whatever the login's end (redact.py).
            redactor = Redactor(secrets.values())
            await self._agent_up(agent, vm)
            await self._move(login, LoginState.STARTING)
            await agent.login(provider.agent_request())
            await self._follow(login, provider, agent, vm, redactor)
        except asyncio.CancelledError:
            await asyncio.shield(self._cancelled(login, agent))
            raise
        except _Failed as exc:
            await self._end(login, LoginState.FAILED, hop=exc.hop, reason=exc.reason, exit_status=exc.exit_status,
                            output=exc.output)
        except AgentError as exc:
            hop, reason = await self._blame(login.vm_id, exc.hop, exc.reason)
            await self._end(login, LoginState.FAILED, hop=hop, reason=reason)
        except BrowserVMError as exc:
            await self._end(login, LoginState.FAILED, hop=VM, reason=_words(exc))
        except Exception as exc:  # a bug: the login still ends, and says so
            log.exception("login %s failed unexpectedly", login.login_id)
            await self._end(login, LoginState.FAILED, hop=hops.CONTROLLER, reason=f"{type(exc).__name__}: {exc}")
        finally:
            await asyncio.shield(self._release_vm(login))

    async def _ready_vm(self, login: LoginRecord) -> VmRecord:
        """The login's VM once ready; _Failed with the VM's own hop and reason if it fails first."""
        # A VM created by another process (a given vm_id) tells only by its record: read again at each
        # write to the state directory, the watch set up before the first read so none is missed.
        async with DirectoryWatch(self._state_dir) as store_written:
            while True:
                vm = await self._manager.settled(login.vm_id)
                if vm is None:
                    raise _Failed(VM, f"the VM {login.vm_id} was deleted before it was ready")
                if vm.state == VmState.READY:
                    return vm
                if vm.state not in (VmState.CREATING, VmState.BOOTING):
                    raise _Failed(*_vm_failure(vm))
                await store_written.changed()

    async def _agent_up(self, agent: AgentClient, vm: VmRecord) -> None:
        """Wait for the agent to answer GET /v1/status (it starts with the desktop, maybe after it)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.agent_wait_s
        while True:
            try:
                await agent.status()
                return
            except AgentError as exc:
                if exc.hop != CONNECT or loop.time() >= deadline:
                    hop, reason = await self._blame(vm.vm_id, exc.hop, exc.reason)
                    if hop == CONNECT:
                        reason += await self._no_agent_hint(vm.vm_id)
                    raise _Failed(hop, reason) from None
            await asyncio.sleep(_AGENT_RETRY_S)

    async def _follow(self, login: LoginRecord, provider: Provider, agent: AgentClient, vm: VmRecord,
                      redactor: Redactor) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + provider.timeout_s + _DEADLINE_GRACE_S
        failures = 0
        next_vm_check = loop.time() + _VM_CHECK_S
        while True:
            try:
                status = await agent.status()
                failures = 0
            except AgentError as exc:
                hop, reason = await self._blame(vm.vm_id, exc.hop, exc.reason)
                failures += 1
                if hop != exc.hop or failures >= _POLL_FAILURES or exc.hop not in (CONNECT, PROTOCOL):
                    raise _Failed(hop, reason) from None
                await asyncio.sleep(self.poll_s)
                continue
            if await self._settle(login, provider, agent, status, redactor):
                return
            if loop.time() >= next_vm_check:  # a VM that died while its agent's answers still came (or were cached)
                next_vm_check = loop.time() + _VM_CHECK_S
                hop, reason = await self._blame(vm.vm_id, "", "")
                if hop:
                    raise _Failed(hop, reason)
            if loop.time() >= deadline:
                with contextlib.suppress(AgentError):
                    await agent.cancel()
                await self._end(login, LoginState.TIMED_OUT, hop=None,
                                reason=f"not finished within the provider's {provider.timeout_s} s")
                return
            await asyncio.sleep(self.poll_s)

    async def _settle(self, login: LoginRecord, provider: Provider, agent: AgentClient, status: AgentStatus,
                      redactor: Redactor) -> bool:
        """Act on one status; True once the login is over. Nothing the tool said is kept unredacted."""
        if status.state == "idle":
            raise _Failed("agent.login", "the agent has no login running (did it restart?)")
        if status.provider is not None and status.provider != provider.name:
            raise _Failed(PROTOCOL, f"the agent runs a {status.provider[:64]} login, not {provider.name}")
        output = redactor.lines(bounded_output(status.output))
        said_why = None if status.reason is None else redactor.text(status.reason)
        if status.state == "waiting-for-user" and login.state == LoginState.STARTING:
            await self._move(login, LoginState.WAITING, auth_url_host=status.auth_url_host)
        elif status.state == "captured":
            handover = await agent.handover(list(provider.credentials))
            try:
                stored = await asyncio.to_thread(self._vault.put, login.user, login.provider, login.login_id,
                                                 handover.files, tenant=login.tenant)
            except BrowserVMError as exc:
                raise _Failed(VAULT, _words(exc)) from None
            login.output = redactor.adding(captured_secrets(handover.files)).lines(output)
            await self._end(login, LoginState.CAPTURED, hop=None, files=len(handover.files), sha256=handover.sha256,
                            auth_url_host=status.auth_url_host or login.auth_url_host,
                            reason=None if stored else "a newer capture for this user and provider was kept")
            if self.on_captured is not None:
                await self.on_captured(login)
            return True
        elif status.state == "failed":
            said = f"the tool exited with status {status.exit_status}" if status.exit_status is not None else ""
            reason = "; ".join(part for part in (said, said_why or "") if part) or "the tool failed"
            raise _Failed(TOOL, reason[:2000], status.exit_status, output)
        elif status.state == "timed-out":
            await self._end(login, LoginState.TIMED_OUT, hop=None, reason=(said_why or
                            f"not finished within the provider's {provider.timeout_s} s")[:2000], output=output)
            return True
        elif status.state == "cancelled":
            await self._end(login, LoginState.CANCELLED, hop=None, reason="cancelled inside the VM", output=output)
            return True
        return False

    async def _cancelled(self, login: LoginRecord, agent: AgentClient | None) -> None:
        if agent is not None:
            with contextlib.suppress(AgentError):
                await agent.cancel()
        if self._stopping:
            await self._end(login, LoginState.FAILED, hop=hops.CONTROLLER, reason="the controller stopped")
        else:
            await self._end(login, LoginState.CANCELLED, hop=None, reason="cancelled (DELETE)")

    async def _blame(self, vm_id: str, hop: str, reason: str) -> tuple[str, str]:
        """A hop to the agent failed: if the VM itself is gone or failed, that is the cause to report."""
        vm = await self._manager.get(vm_id)
        if vm is None:
            return VM, f"the VM {vm_id} was deleted during the login"
        if vm.state != VmState.READY:
            return _vm_failure(vm)
        return hop, reason

    async def _no_agent_hint(self, vm_id: str) -> str:
        lines = await asyncio.to_thread(ConsoleLog(self._manager.console(vm_id).path).tail, 5000)
        if any("service=agent" in line for line in lines):
            return ""
        return ("; the VM's console has no `browservm-ready: service=agent` line: its image carries no OAuth agent "
                "(logins need the oauth image profile)")

    # --- record writes ----------------------------------------------------------------------

    async def _move(self, login: LoginRecord, new: LoginState, **fields: Any) -> None:
        login.state = transition(login.login_id, login.state, new)
        for name, value in fields.items():
            setattr(login, name, value)
        login.states[new.value] = round(time.time() - login.created_at, 3)
        await asyncio.to_thread(self._records.save, login)
        self._notify()
        log.info("login %s: %s", login.login_id, new.value)

    async def _finish(self, login: LoginRecord, new: LoginState, *, hop: str | None, reason: str | None,
                      **fields: Any) -> None:
        login.ended_at = time.time()
        await self._move(login, new, hop=hop, reason=reason, **fields)
        if self.on_ended is not None:
            self.on_ended(login)

    async def _end(self, login: LoginRecord, new: LoginState, *, hop: str | None, reason: str | None,
                   **fields: Any) -> None:
        """A final state, unless the login got one meanwhile (a cancel racing a capture: the first wins)."""
        if login.state.final:
            return
        try:
            await self._finish(login, new, hop=hop, reason=reason, **fields)
        except LoginConflict:
            fresh = await asyncio.to_thread(self._records.get, login.login_id)
            if fresh is not None:
                login.__dict__.update(fresh.__dict__)

    async def _release_vm(self, login: LoginRecord) -> None:
        """Destroy the login's VM unless it is kept; the record says whether it went."""
        if login.keep_vm or not login.vm_id or login.vm_destroyed:
            return
        try:
            await self._manager.destroy(login.vm_id)
        except BrowserVMError as exc:
            log.warning("login %s: VM %s not destroyed: %s", login.login_id, login.vm_id, exc)
            return
        login.vm_destroyed = True
        for _ in range(3):
            try:
                await asyncio.to_thread(self._records.save, login)
                break
            except LoginConflict:
                fresh = await asyncio.to_thread(self._records.get, login.login_id)
                if fresh is None:
                    return
                fresh.vm_destroyed = True
                login.__dict__.update(fresh.__dict__)
        self._notify()


def _vm_failure(vm: VmRecord) -> tuple[str, str]:
    if vm.failure is not None:
        return vm.failure.hop, f"the VM failed at {vm.failure.hop}: {vm.failure.reason}"
    if vm.state == VmState.ENDED:
        return VM, f"the VM was stopped: {vm.ended_reason or 'ended'}"
    return VM, f"the VM is {vm.state.value}"


def _words(exc: BaseException) -> str:
    if isinstance(exc, BrowserVMError):
        return str(exc)
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    return f"{type(exc).__name__}: {exc}"
