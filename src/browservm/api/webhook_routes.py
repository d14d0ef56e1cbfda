"""Webhooks over HTTP (issue 21), and what tells them: a VM's or a login's end.

    admin key, or a tenant key for its own tenant's webhooks (another tenant's are 404 to it)
      POST   /v1/webhooks {url, events[], tenant?}          201: the webhook and its secret, shown this once
      GET    /v1/webhooks[?tenant=T]                        the webhooks this key may see
      PATCH  /v1/webhooks/{webhook_id} {disabled}           pause (deliveries wait) or resume a webhook
      DELETE /v1/webhooks/{webhook_id}                      remove it and its deliveries, waiting ones included
      GET    /v1/webhooks/{webhook_id}/deliveries?limit=&after=   newest first; `next` is the next page's `after`

A webhook gets its own tenant's events only; an admin key's webhooks without a tenant get the
operator's own (tenant ""). The deliverer (webhooks/deliverer.py) is one of the service's tasks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import Path, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr

from browservm.access.principal import TENANT_PATTERN, Principal
from browservm.api.audited import audited
from browservm.api.auth import Caller
from browservm.api.idempotency import no_replay
from browservm.api.logins import LoginOut
from browservm.oauth.records import LoginRecord
from browservm.store import Store
from browservm.vm.records import VmRecord
from browservm.webhooks.deliverer import Deliverer
from browservm.webhooks.events import (
    EVENT_TYPES,
    LOGIN_EVENTS,
    MAX_URL,
    VM_EVENTS,
    Event,
    validate_events,
    validate_url,
)
from browservm.webhooks.records import MAX_PAGE, Delivery, Webhook, WebhookNotFound, WebhookStore

if TYPE_CHECKING:
    from fastapi import FastAPI

    from browservm.api.service import ControllerService

WebhookId = Annotated[str, Path(pattern=r"^wh-[0-9a-f]{12}$")]
# events.py's EVENT_TYPES, spelled out so the OpenAPI document lists them (test_webhooks.py holds them equal).
EventType = Literal["vm.ready", "vm.failed", "vm.ended", "vm.destroyed", "login.captured", "login.failed",
                    "login.ended"]


# What validate_url takes, as the document states it (a little stricter: no IPv6 literal, no user in it).
_PORT = r"(?:6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3})"
URL_PATTERN = rf"^https?://[^\x00-\x20\x7f/?#@:\[\]]+(?::{_PORT})?(?:[/?#][^\x00-\x20\x7f]*)?$"


class CreateWebhook(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: StrictStr = Field(min_length=1, max_length=MAX_URL, pattern=URL_PATTERN,
                           description="where events are POSTed: http(s), any host (loopback and private networks "
                                       "included: the operator's to allow)")
    events: list[EventType] = Field(min_length=1, max_length=len(EVENT_TYPES), description="which events")
    tenant: StrictStr | None = Field(None, pattern=TENANT_PATTERN,
                                     description="an admin key may name a tenant (default: the operator's own "
                                                 "events); a tenant key's webhooks are its tenant's")


class UpdateWebhook(BaseModel):
    model_config = ConfigDict(extra="forbid")

    disabled: StrictBool = Field(description="true: deliveries wait (still bounded) until it is enabled again")


class WebhookOut(BaseModel):
    webhook_id: str
    tenant: str = Field(description="whose events it gets; empty: the operator's own")
    url: str
    events: list[str]
    created_at: float
    disabled: bool

    @classmethod
    def of(cls, webhook: Webhook) -> WebhookOut:
        return cls(**dataclasses.asdict(webhook) | {"events": list(webhook.events)})


class NewWebhookOut(WebhookOut):
    secret: str = Field(description="signs every delivery (X-Browservm-Signature): shown in this answer only")


class DeliveryOut(BaseModel):
    id: int = Field(description="also the X-Browservm-Delivery header")
    webhook_id: str
    event: str = Field(description="the event's type")
    event_id: str
    state: str = Field(description="pending, delivered or failed")
    attempts: int
    next_attempt_at: float | None = Field(description="while pending: when it is attempted next")
    last_status: int | None = Field(description="the receiver's last HTTP status, if it answered")
    last_error: str = Field(description="why the last attempt failed, or why it was dropped")
    created_at: float
    delivered_at: float | None
    body: dict[str, Any] = Field(description="what is POSTed: {id, type, at, tenant, data}")

    @classmethod
    def of(cls, delivery: Delivery) -> DeliveryOut:
        fields = dataclasses.asdict(delivery)
        del fields["tenant"]
        return cls(**fields | {"body": json.loads(delivery.body)})


class DeliveryPage(BaseModel):
    deliveries: list[DeliveryOut]
    next: int | None = Field(description="pass as `after` for the next (older) page; null: no more")


def mount(app: FastAPI, service: ControllerService) -> None:
    """Add the routes, the deliverer (a task of the service's) and the listeners that feed it."""
    # A connection of its own to the state database, as logins have.
    store = Store(service.settings.database)
    records = WebhookStore(store)
    deliverer = Deliverer(records)
    app.state.webhooks = deliverer  # tests reach its timeouts and backoff here

    async def deliver() -> None:
        try:
            await deliverer.run()
        finally:
            store.close()

    async def close_if_never_run() -> None:
        if not deliverer.started:
            store.close()

    service.run_in_background(deliver)
    service.on_stop(close_if_never_run)

    def vm_changed(record: VmRecord, event: str) -> None:
        kind = VM_EVENTS.get(event)
        if kind is not None and not record.in_pool:  # a pooled VM is nobody's until it is claimed
            deliverer.emit(Event(kind, record.tenant, service.describe(record).model_dump(mode="json")))

    def login_ended(login: LoginRecord) -> None:
        kind = LOGIN_EVENTS.get(login.state.value)
        if kind is not None:
            deliverer.emit(Event(kind, login.tenant, LoginOut.of(login).model_dump(mode="json")))

    service.on_vm_change.append(vm_changed)
    logins = getattr(app.state, "logins", None)  # logins.mount's, when the controller runs logins
    if logins is not None:
        logins.on_ended = login_ended

    async def visible(webhook_id: str, who: Principal) -> Webhook:
        webhook = await asyncio.to_thread(records.get, webhook_id)
        if not who.sees(webhook.tenant):
            raise WebhookNotFound(webhook_id)
        return webhook

    errors: dict[int | str, dict[str, Any]] = {code: {"description": "an error: {\"error\": {type, message}}"}
                                              for code in (401, 403, 404, 422, 429)}

    @app.exception_handler(WebhookNotFound)
    async def not_found(request: Request, exc: WebhookNotFound) -> JSONResponse:
        return JSONResponse({"error": {"type": "WebhookNotFound", "message": str(exc)}}, status_code=404)

    @app.post("/v1/webhooks", tags=["webhooks"], status_code=201, responses=errors)
    async def create_webhook(body: CreateWebhook, who: Caller, request: Request) -> NewWebhookOut:
        """A webhook: its tenant's events of the types asked for are POSTed to `url`, signed with the secret
        in this answer (shown this once). At most 10 per tenant (429 naming the limit)."""
        tenant = who.tenant_for(body.tenant)
        url, events = validate_url(body.url), validate_events(body.events)
        webhook, secret = await asyncio.to_thread(records.create, tenant, url, events)
        audited(request, webhook.webhook_id, tenant)
        no_replay(request, f"this Idempotency-Key made webhook {webhook.webhook_id}; its secret was shown once and "
                           "is not kept for a replay")
        return NewWebhookOut(**WebhookOut.of(webhook).model_dump(), secret=secret)

    @app.get("/v1/webhooks", tags=["webhooks"], responses=errors)
    async def list_webhooks(who: Caller, tenant: Annotated[str | None, Query(pattern=f"{TENANT_PATTERN}|^$")] = None
                            ) -> list[WebhookOut]:
        """The webhooks this key may see (an admin key may name a `tenant`; empty: the operator's own)."""
        return [WebhookOut.of(webhook) for webhook in await asyncio.to_thread(records.all, who.tenant_filter(tenant))]

    @app.patch("/v1/webhooks/{webhook_id}", tags=["webhooks"], responses=errors)
    async def update_webhook(webhook_id: WebhookId, body: UpdateWebhook, who: Caller, request: Request) -> WebhookOut:
        """Pause a webhook (its deliveries wait, new ones too, within the tenant's bound) or resume it."""
        webhook = await visible(webhook_id, who)
        audited(request, webhook_id, webhook.tenant)
        updated = await asyncio.to_thread(records.set_disabled, webhook_id, body.disabled)
        deliverer.poke()
        return WebhookOut.of(updated)

    @app.delete("/v1/webhooks/{webhook_id}", tags=["webhooks"], responses=errors)
    async def delete_webhook(webhook_id: WebhookId, who: Caller, request: Request) -> WebhookOut:
        """Remove the webhook and its deliveries; an attempt under way may still arrive."""
        webhook = await visible(webhook_id, who)
        audited(request, webhook_id, webhook.tenant)
        return WebhookOut.of(await asyncio.to_thread(records.delete, webhook_id))

    @app.get("/v1/webhooks/{webhook_id}/deliveries", tags=["webhooks"], responses=errors)
    async def deliveries(webhook_id: WebhookId, who: Caller, after: Annotated[int | None, Query(ge=1)] = None,
                         limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 20) -> DeliveryPage:
        """Each event sent or to send to this webhook, newest first: its state, attempts, the receiver's last
        status or error, and the body."""
        await visible(webhook_id, who)
        found = await asyncio.to_thread(records.deliveries, webhook_id, after, limit)
        return DeliveryPage(deliveries=[DeliveryOut.of(delivery) for delivery in found],
                            next=found[-1].id if len(found) == limit else None)
