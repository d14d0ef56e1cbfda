"""browservm.client: a Python client of a browservm controller's REST API (or a cluster's front).

    from browservm.client import Client
    with Client("http://127.0.0.1:8080", api_key=key) as bvm:
        vm = bvm.wait_vm(bvm.create_vm("ann").vm_id, timeout=300)
        print(bvm.viewer(vm.vm_id).url)

    client.py   Client, synchronous          aio.py     AsyncClient, the same methods awaited
    routes.py   every route, described once  http.py    what both share of HTTP: options, answers, errors
    models.py   typed answers (Vm, Login...) errors.py  the error body as typed exceptions
    sse.py      Server-Sent Events           watch.py   following a boot or a login across subscriptions

It needs httpx and pydantic, and nothing of the controller's (tests/unit/test_client.py checks that
importing it loads no fastapi, starlette, store or controller). The API key is given, never looked
up: finding it (BROWSERVM_API_KEY, a state directory) is the CLI's business.
"""

from browservm.client.aio import AsyncClient
from browservm.client.client import Client
from browservm.client.errors import (
    ClientError,
    Conflict,
    ControllerError,
    ControllerUnreachable,
    InvalidRequest,
    KeyRefused,
    LimitReached,
    LoginFailed,
    NotAController,
    NotFound,
    StreamEnded,
    StreamQuiet,
    Unavailable,
    UntrustedCertificate,
    VmFailed,
    WaitTimedOut,
)
from browservm.client.models import (
    ApiKey,
    AuditEntry,
    AuditPage,
    CancelledLogin,
    Credentials,
    Event,
    Failure,
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

__all__ = [
    "ApiKey", "AsyncClient", "AuditEntry", "AuditPage", "CancelledLogin", "Client", "ClientError", "Conflict",
    "ControllerError", "ControllerUnreachable", "Credentials", "Event", "Failure", "Host", "InvalidRequest",
    "KeyRefused", "LimitReached", "Login", "LoginFailed", "NewKey", "NotAController", "NotFound", "Profile",
    "Provider", "Quota", "StartedLogin", "StreamEnded", "StreamQuiet", "Tenant", "Unavailable", "UntrustedCertificate",
    "Viewer", "Vm", "VmFailed", "WaitTimedOut",
]
