"""Client: the controller's REST API, synchronous (httpx.Client). AsyncClient (aio.py) is its twin."""

from __future__ import annotations

import os
from collections.abc import Callable, Generator, Iterator, Mapping
from contextlib import closing, contextmanager
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


class Client:
    """The controller at `url` (or a cluster's front), with its API key.

        with Client("http://127.0.0.1:8080", api_key=key) as bvm:
            vm = bvm.wait_vm(bvm.create_vm("ann").vm_id, timeout=300)

    Every error is a browservm.client.errors.ClientError: the controller's refusals typed by status
    (InvalidRequest naming the field, LimitReached naming the limit, ...), ControllerUnreachable naming
    the URL. `events_quiet`: seconds without a byte on an event stream before wait_* asks for the record
    and subscribes again. `ca_file`: a PEM file of the CA (or the controller's own certificate) to verify an
    https controller against, in place of the system's CAs. `transport`: httpx's, for tests (httpx.MockTransport).
    """

    def __init__(self, url: str, *, api_key: str, timeout: httpx.Timeout = http.TIMEOUT,
                 events_quiet: float = http.EVENTS_QUIET, trust_env: bool | None = None,
                 ca_file: str | os.PathLike[str] | None = None,
                 transport: httpx.BaseTransport | None = None) -> None:
        options = http.options(http.parse_url(url), api_key, timeout, trust_env, ca_file)
        self.base_url: str = options["base_url"]
        self.events_quiet = events_quiet
        self._timeout = timeout
        self._http = httpx.Client(transport=transport, **options)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # --- VMs -------------------------------------------------------------------------------------

    def create_vm(self, user: str, vcpus: int | None = None, mem_mib: int | None = None, wait: bool = False,
                  idempotency_key: str | None = None, *, labels: Mapping[str, str] | None = None,
                  timeout_s: int | None = None, template: str | None = None,
                  profile: str | None = None) -> Vm:
        """A new VM (state `creating`, it boots on the controller); with `wait`, once it is ready or failed.
        `labels` to find it by; `timeout_s`: ended that long after its creation (extend_vm moves it);
        `template`: what it is made from (default: the controller's `default`)."""
        return self._call(routes.create_vm(user, vcpus, mem_mib, wait, idempotency_key, labels=labels,
                                           timeout_s=timeout_s, template=template, profile=profile))

    def extend_vm(self, vm_id: str, timeout_s: int, idempotency_key: str | None = None) -> Vm:
        """End the VM `timeout_s` from now instead (within its maximum lifetime)."""
        return self._call(routes.extend_vm(vm_id, timeout_s, idempotency_key))

    def get_vm(self, vm_id: str) -> Vm:
        return self._call(routes.get_vm(vm_id))

    def list_vms(self, *, user: str | None = None, state: str | None = None,
                 labels: Mapping[str, str] | None = None, tenant: str | None = None,
                 template: str | None = None) -> list[Vm]:
        """Every VM the key may see (of `user`, in `state`, with all of `labels`, of `template`), page after page."""
        return self._every_page(routes.list_vms(user, state, labels, tenant, template))

    def delete_vm(self, vm_id: str) -> bool:
        """Stop the VM and release what it had; True if it was there (idempotent)."""
        return self._call(routes.delete_vm(vm_id))

    def console(self, vm_id: str, lines: int = 50) -> list[str]:
        return self._call(routes.console(vm_id, lines))

    def viewer(self, vm_id: str) -> Viewer:
        """A link to the VM's desktop for a browser, with a token bound to the VM, valid until `expires_at`."""
        return self._call(routes.viewer(vm_id))

    def vm_events(self, vm_id: str) -> Iterator[Event]:
        """The VM's events as they come, until the controller ends the stream (StreamQuiet after
        `events_quiet` seconds without a byte)."""
        return self._stream(routes.vm_events(vm_id), self.events_quiet)

    def wait_vm(self, vm_id: str, timeout: float | None = None, *, on_stage: OnStage | None = None,
                on_note: OnNote | None = None) -> Vm:
        """The VM once ready; VmFailed (hop, reason, its record) if it failed, ended or was deleted;
        WaitTimedOut after `timeout` seconds. `on_stage(hop, seconds)` at each hop passed, once."""
        return self._wait(VmWatch(vm_id, on_stage, on_note), routes.vm_events(vm_id), lambda: self._vm_or_none(vm_id),
                          timeout)

    def diagnose(self, vm_id: str) -> dict[str, Any]:
        """One VM's hops in order, as `browservm doctor VM --json` tells them."""
        return self._call(routes.diagnose(vm_id))

    def doctor(self) -> dict[str, Any]:
        """The controller's host, as `browservm doctor --json` tells it."""
        return self._call(routes.doctor())

    # --- logins and credentials --------------------------------------------------------------------

    def start_login(self, user: str, provider: str, vm_id: str | None = None, keep_vm: bool = False,
                    idempotency_key: str | None = None) -> StartedLogin:
        """A provider's login for `user`, at once (state `booting`), with the viewer link where the person
        completes it."""
        return self._call(routes.start_login(user, provider, vm_id, keep_vm, idempotency_key))

    def get_login(self, login_id: str) -> Login:
        return self._call(routes.get_login(login_id))

    def list_logins(self, user: str | None = None, *, state: str | None = None) -> list[Login]:
        return self._every_page(routes.list_logins(user, state))

    def login_events(self, login_id: str) -> Iterator[Event]:
        """The login now, then at each change (`kind` is its state, `data` the login), until it is final."""
        return self._stream(routes.login_events(login_id), self.events_quiet)

    def wait_login(self, login_id: str, timeout: float | None = None, *, on_change: OnChange | None = None) -> Login:
        """The login once captured; LoginFailed (state, hop, reason, the login) if it failed, timed out or was
        cancelled; WaitTimedOut after `timeout` seconds. `on_change(login)` at each new state."""
        return self._wait(LoginWatch(login_id, on_change), routes.login_events(login_id),
                          lambda: self.get_login(login_id), timeout)

    def cancel_login(self, login_id: str) -> CancelledLogin:
        return self._call(routes.cancel_login(login_id))

    def credentials(self, user: str, provider: str) -> Credentials:
        """The files captured last for `user` and `provider` (path inside the VM -> bytes)."""
        return self._call(routes.credentials(user, provider))

    def forget_credentials(self, user: str, provider: str) -> bool:
        return self._call(routes.forget_credentials(user, provider))

    def profile(self, user: str) -> Profile:
        """The user's persistent browser profile: its size, when it was saved, the VM that has it."""
        return self._call(routes.profile(user))

    def forget_profile(self, user: str) -> bool:
        """Forget the user's browser profile (ApiError 409 while a live VM has it); False if there was none."""
        return self._call(routes.forget_profile(user))

    def providers(self) -> list[Provider]:
        return self._call(routes.providers())

    # --- a cluster's front -------------------------------------------------------------------------

    def hosts(self) -> list[Host]:
        return self._call(routes.hosts())

    def drain_host(self, name: str) -> Host:
        return self._call(routes.drain_host(name))

    def resume_host(self, name: str) -> Host:
        return self._call(routes.resume_host(name))

    # --- keys, tenants and the audit trail (an admin key; a tenant key reads its own tenant and trail) ---

    def create_key(self, name: str, role: str, tenant: str | None = None) -> NewKey:
        """A new API key (role `admin`, or `tenant` with its tenant); `.key` is its secret, in this answer only."""
        return self._call(routes.create_key(name, role, tenant))

    def list_keys(self, tenant: str | None = None) -> list[ApiKey]:
        return self._call(routes.list_keys(tenant))

    def revoke_key(self, key_id: str) -> ApiKey:
        """Refused from its next request on (idempotent)."""
        return self._call(routes.revoke_key(key_id))

    def tenant(self, tenant: str) -> Tenant:
        """Its quota and what it uses now."""
        return self._call(routes.get_tenant(tenant))

    def set_clipboard(self, tenant: str, clipboard: str) -> str:
        """Which way the tenant's viewers' clipboard may go (both, paste, copy, none), over its templates'."""
        return self._call(routes.set_clipboard(tenant, clipboard))

    def set_quota(self, tenant: str, quota: Quota) -> Quota:
        """The tenant's whole quota: a limit left None is no limit of its own."""
        return self._call(routes.set_quota(tenant, quota))

    def audit(self, *, since: float | None = None, tenant: str | None = None, vm_id: str | None = None,
              after: int | None = None, limit: int | None = None) -> AuditPage:
        """The audit trail oldest first, from `since` (unix seconds); `.next` is the next page's `after`."""
        return self._call(routes.audit(since, tenant, vm_id, after, limit))

    # --- plumbing ----------------------------------------------------------------------------------

    def _call(self, call: routes.Call[T]) -> T:
        with self._transport():
            response = self._http.request(call.method, call.path, **http.request_options(call, self._timeout))
        return http.read(call, response, self.base_url)

    def _every_page(self, call: routes.Call[list[T]]) -> list[T]:
        """A listing whole: its pages one after the other, as long as the controller names a next one."""
        items: list[T] = []
        page: routes.Call[list[T]] | None = call
        while page is not None:
            with self._transport():
                response = self._http.request(page.method, page.path, **http.request_options(page, self._timeout))
            found: list[T] = http.read(page, response, self.base_url)
            items += found
            page = http.next_page(page, response)
        return items

    def _vm_or_none(self, vm_id: str) -> Vm | None:
        try:
            return self.get_vm(vm_id)
        except NotFound:
            return None

    def _stream(self, path: str, quiet: float) -> Generator[Event, None, None]:
        with self._transport():
            try:
                with self._http.stream("GET", path, timeout=http.stream_timeout(self._timeout, quiet)) as response:
                    if response.status_code >= 400:
                        response.read()
                        http.check(response, self.base_url)
                    parser = EventParser()
                    for line in response.iter_lines():
                        if (event := parser.feed(line)) is not None:
                            yield event
            except httpx.ReadTimeout:
                raise StreamQuiet(self.base_url, path, quiet) from None

    def _wait(self, watch: Watch[R], path: str, fetch: Callable[[], R | None], timeout: float | None) -> R:
        deadline = Deadline(timeout)
        while True:
            quiet = False
            try:
                # closing(): leaving the loop early closes the stream at once, not when it is collected
                with closing(self._stream(path, deadline.quiet(self.events_quiet))) as stream:
                    for event in stream:
                        if watch.event(event) or deadline.passed():
                            break
            except StreamQuiet:
                quiet = True
            settled = watch.known()
            if settled is None:
                settled = watch.settle(fetch(), quiet or deadline.passed(), self.base_url)
            if settled is not None:
                return watch.result(settled)
            if deadline.passed():
                raise WaitTimedOut(watch.what, watch.id, timeout or 0.0, watch.state)

    @contextmanager
    def _transport(self) -> Iterator[None]:
        try:
            yield
        except httpx.TransportError as exc:
            raise http.unreachable(exc, self.base_url) from None
