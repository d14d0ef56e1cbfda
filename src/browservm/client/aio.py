"""AsyncClient: the controller's REST API on httpx.AsyncClient, method for method as Client (client.py).

The routes (routes.py), the reading of answers and errors (http.py) and the following of a boot or a
login (watch.py) are the sync client's own; only the I/O differs.
"""

from __future__ import annotations

import os
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from contextlib import aclosing, asynccontextmanager
from types import TracebackType
from typing import Any, TypeVar

import httpx

from browservm.client import http, routes
from browservm.client.errors import NotFound, StreamQuiet, WaitTimedOut
from browservm.client.models import (
    ApiKey,
    AuditPage,
    CancelledLogin,
    Credentials,
    Event,
    Host,
    Login,
    NewKey,
    Profile,
    Provider,
    Quota,
    StartedLogin,
    Tenant,
    Viewer,
    Vm,
)
from browservm.client.sse import EventParser
from browservm.client.watch import Deadline, LoginWatch, OnChange, OnNote, OnStage, VmWatch, Watch

T = TypeVar("T")
R = TypeVar("R")


class AsyncClient:
    """As Client, awaited:

        async with AsyncClient("http://127.0.0.1:8080", api_key=key) as bvm:
            vm = await bvm.wait_vm((await bvm.create_vm("ann")).vm_id, timeout=300)
            async for event in bvm.vm_events(vm.vm_id): ...
    """

    def __init__(self, url: str, *, api_key: str, timeout: httpx.Timeout = http.TIMEOUT,
                 events_quiet: float = http.EVENTS_QUIET, trust_env: bool | None = None,
                 ca_file: str | os.PathLike[str] | None = None,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        options = http.options(http.parse_url(url), api_key, timeout, trust_env, ca_file)
        self.base_url: str = options["base_url"]
        self.events_quiet = events_quiet
        self._timeout = timeout
        self._http = httpx.AsyncClient(transport=transport, **options)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, value: BaseException | None,
                        traceback: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # --- VMs -------------------------------------------------------------------------------------

    async def create_vm(self, user: str, vcpus: int | None = None, mem_mib: int | None = None, wait: bool = False,
                        idempotency_key: str | None = None, *, labels: Mapping[str, str] | None = None,
                        timeout_s: int | None = None, template: str | None = None,
                        profile: str | None = None) -> Vm:
        return await self._call(routes.create_vm(user, vcpus, mem_mib, wait, idempotency_key, labels=labels,
                                                 timeout_s=timeout_s, template=template, profile=profile))

    async def extend_vm(self, vm_id: str, timeout_s: int, idempotency_key: str | None = None) -> Vm:
        return await self._call(routes.extend_vm(vm_id, timeout_s, idempotency_key))

    async def get_vm(self, vm_id: str) -> Vm:
        return await self._call(routes.get_vm(vm_id))

    async def list_vms(self, *, user: str | None = None, state: str | None = None,
                       labels: Mapping[str, str] | None = None, tenant: str | None = None,
                       template: str | None = None) -> list[Vm]:
        return await self._every_page(routes.list_vms(user, state, labels, tenant, template))

    async def delete_vm(self, vm_id: str) -> bool:
        return await self._call(routes.delete_vm(vm_id))

    async def console(self, vm_id: str, lines: int = 50) -> list[str]:
        return await self._call(routes.console(vm_id, lines))

    async def viewer(self, vm_id: str) -> Viewer:
        return await self._call(routes.viewer(vm_id))

    def vm_events(self, vm_id: str) -> AsyncIterator[Event]:
        return self._stream(routes.vm_events(vm_id), self.events_quiet)

    async def wait_vm(self, vm_id: str, timeout: float | None = None, *, on_stage: OnStage | None = None,
                      on_note: OnNote | None = None) -> Vm:
        return await self._wait(VmWatch(vm_id, on_stage, on_note), routes.vm_events(vm_id),
                                lambda: self._vm_or_none(vm_id), timeout)

    async def diagnose(self, vm_id: str) -> dict[str, Any]:
        return await self._call(routes.diagnose(vm_id))

    async def doctor(self) -> dict[str, Any]:
        return await self._call(routes.doctor())

    # --- logins and credentials --------------------------------------------------------------------

    async def start_login(self, user: str, provider: str, vm_id: str | None = None, keep_vm: bool = False,
                          idempotency_key: str | None = None) -> StartedLogin:
        return await self._call(routes.start_login(user, provider, vm_id, keep_vm, idempotency_key))

    async def get_login(self, login_id: str) -> Login:
        return await self._call(routes.get_login(login_id))

    async def list_logins(self, user: str | None = None, *, state: str | None = None) -> list[Login]:
        return await self._every_page(routes.list_logins(user, state))

    def login_events(self, login_id: str) -> AsyncIterator[Event]:
        return self._stream(routes.login_events(login_id), self.events_quiet)

    async def wait_login(self, login_id: str, timeout: float | None = None, *,
                         on_change: OnChange | None = None) -> Login:
        return await self._wait(LoginWatch(login_id, on_change), routes.login_events(login_id),
                                lambda: self.get_login(login_id), timeout)

    async def cancel_login(self, login_id: str) -> CancelledLogin:
        return await self._call(routes.cancel_login(login_id))

    async def credentials(self, user: str, provider: str) -> Credentials:
        return await self._call(routes.credentials(user, provider))

    async def forget_credentials(self, user: str, provider: str) -> bool:
        return await self._call(routes.forget_credentials(user, provider))

    async def profile(self, user: str) -> Profile:
        """The user's persistent browser profile: its size, when it was saved, the VM that has it."""
        return await self._call(routes.profile(user))

    async def forget_profile(self, user: str) -> bool:
        """Forget the user's browser profile (ApiError 409 while a live VM has it); False if there was none."""
        return await self._call(routes.forget_profile(user))

    async def providers(self) -> list[Provider]:
        return await self._call(routes.providers())

    # --- a cluster's front -------------------------------------------------------------------------

    async def hosts(self) -> list[Host]:
        return await self._call(routes.hosts())

    async def drain_host(self, name: str) -> Host:
        return await self._call(routes.drain_host(name))

    async def resume_host(self, name: str) -> Host:
        return await self._call(routes.resume_host(name))

    # --- keys, tenants and the audit trail (an admin key; a tenant key reads its own tenant and trail) ---

    async def create_key(self, name: str, role: str, tenant: str | None = None) -> NewKey:
        """A new API key (role `admin`, or `tenant` with its tenant); `.key` is its secret, in this answer only."""
        return await self._call(routes.create_key(name, role, tenant))

    async def list_keys(self, tenant: str | None = None) -> list[ApiKey]:
        return await self._call(routes.list_keys(tenant))

    async def revoke_key(self, key_id: str) -> ApiKey:
        """Refused from its next request on (idempotent)."""
        return await self._call(routes.revoke_key(key_id))

    async def tenant(self, tenant: str) -> Tenant:
        """Its quota and what it uses now."""
        return await self._call(routes.get_tenant(tenant))

    async def set_clipboard(self, tenant: str, clipboard: str) -> str:
        """Which way the tenant's viewers' clipboard may go (both, paste, copy, none), over its templates'."""
        return await self._call(routes.set_clipboard(tenant, clipboard))

    async def set_quota(self, tenant: str, quota: Quota) -> Quota:
        """The tenant's whole quota: a limit left None is no limit of its own."""
        return await self._call(routes.set_quota(tenant, quota))

    async def audit(self, *, since: float | None = None, tenant: str | None = None, vm_id: str | None = None,
                    after: int | None = None, limit: int | None = None) -> AuditPage:
        """The audit trail oldest first, from `since` (unix seconds); `.next` is the next page's `after`."""
        return await self._call(routes.audit(since, tenant, vm_id, after, limit))

    # --- plumbing ----------------------------------------------------------------------------------

    async def _call(self, call: routes.Call[T]) -> T:
        async with self._transport():
            response = await self._http.request(call.method, call.path, **http.request_options(call, self._timeout))
        return http.read(call, response, self.base_url)

    async def _every_page(self, call: routes.Call[list[T]]) -> list[T]:
        """A listing whole: its pages one after the other, as long as the controller names a next one."""
        items: list[T] = []
        page: routes.Call[list[T]] | None = call
        while page is not None:
            async with self._transport():
                response = await self._http.request(page.method, page.path, **http.request_options(page, self._timeout))
            found: list[T] = http.read(page, response, self.base_url)
            items += found
            page = http.next_page(page, response)
        return items

    async def _vm_or_none(self, vm_id: str) -> Vm | None:
        try:
            return await self.get_vm(vm_id)
        except NotFound:
            return None

    async def _stream(self, path: str, quiet: float) -> AsyncGenerator[Event, None]:
        async with self._transport():
            try:
                async with self._http.stream("GET", path,
                                             timeout=http.stream_timeout(self._timeout, quiet)) as response:
                    if response.status_code >= 400:
                        await response.aread()
                        http.check(response, self.base_url)
                    parser = EventParser()
                    async for line in response.aiter_lines():
                        if (event := parser.feed(line)) is not None:
                            yield event
            except httpx.ReadTimeout:
                raise StreamQuiet(self.base_url, path, quiet) from None

    async def _wait(self, watch: Watch[R], path: str, fetch: Callable[[], Awaitable[R | None]],
                    timeout: float | None) -> R:
        deadline = Deadline(timeout)
        while True:
            quiet = False
            try:
                async with aclosing(self._stream(path, deadline.quiet(self.events_quiet))) as stream:
                    async for event in stream:
                        if watch.event(event) or deadline.passed():
                            break
            except StreamQuiet:
                quiet = True
            settled = watch.known()
            if settled is None:
                settled = watch.settle(await fetch(), quiet or deadline.passed(), self.base_url)
            if settled is not None:
                return watch.result(settled)
            if deadline.passed():
                raise WaitTimedOut(watch.what, watch.id, timeout or 0.0, watch.state)

    @asynccontextmanager
    async def _transport(self) -> AsyncIterator[None]:
        try:
            yield
        except httpx.TransportError as exc:
            raise http.unreachable(exc, self.base_url) from None
