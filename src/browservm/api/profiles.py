"""The browser profiles' part of the API (profiles/):

      GET    /v1/users/{user}/profile   how large the sealed profile is, when it was saved, which VM has it
      DELETE /v1/users/{user}/profile   forget it and its key (409 while a live VM has it)

A VM gets one by `profile: "persistent"` at its create (POST /v1/vms) or a login's `keep_profile`.
Mounting this part gives the manager its profile keeper, with the vault's key.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from fastapi import Request
from pydantic import BaseModel, Field

from browservm.api.audited import audited
from browservm.api.auth import Caller
from browservm.api.logins import Tenant, User
from browservm.api.models import rfc3339
from browservm.errors import ProfileNotFound
from browservm.oauth.vault import load_key
from browservm.profiles.keeper import Profiles
from browservm.profiles.store import ProfileInfo, ProfileStore
from browservm.vm.create import normalise_user

if TYPE_CHECKING:
    from fastapi import FastAPI

    from browservm.api.service import ControllerService


class ProfileOut(BaseModel):
    user: str
    tenant: str
    size_bytes: int = Field(description="the sealed profile last saved (0: never saved yet)")
    saved_at: float | None
    saved: str | None = Field(description="saved_at as RFC 3339")
    in_use_by: str | None = Field(description="the live VM that has it (a second is refused with 409)")

    @classmethod
    def of(cls, info: ProfileInfo) -> ProfileOut:
        return cls(user=info.user, tenant=info.tenant, size_bytes=info.size, saved_at=info.saved_at,
                   saved=rfc3339(info.saved_at), in_use_by=info.in_use_by)


def make_profiles(service: ControllerService) -> Profiles:
    """The profile keeper over the controller's store and vault key. Blocking (reads the key)."""
    settings = service.settings
    key = load_key(settings.state_dir, settings.vault_key.get_secret_value() if settings.vault_key else None)
    # The service's own connection: open until every VM has ended, so a stop with stop_vms_on_exit still saves
    # their profiles (hooks given to on_stop run before that).
    store = ProfileStore(service.own_store, key, settings.state_dir / "profiles", settings.profile_max_mib << 20)
    return Profiles(store, service.network.netns, service.manager.secrets)


def mount(app: FastAPI, service: ControllerService) -> None:
    profiles = make_profiles(service)
    service.manager.profiles = profiles
    responses: dict[int | str, dict[str, Any]] = {code: {"description": "an error: {\"error\": {type, message}}"}
                                                  for code in (401, 403, 404, 409, 422)}

    @app.get("/v1/users/{user}/profile", tags=["profiles"], responses=responses)
    async def get_profile(user: User, who: Caller, tenant: Tenant = None) -> ProfileOut:
        """The user's persistent browser profile: its size, when it was saved, which VM has it now."""
        owner = who.tenant_for(tenant)
        return ProfileOut.of(await asyncio.to_thread(profiles.store.info, owner, normalise_user(user)))

    @app.delete("/v1/users/{user}/profile", tags=["profiles"], responses=responses)
    async def delete_profile(user: User, who: Caller, request: Request, tenant: Tenant = None) -> dict[str, str | bool]:
        """Forget the user's browser profile and its key. Idempotent: `removed` is false when there was none;
        409 while a live VM has it (end that VM first)."""
        owner = who.tenant_for(tenant)
        audited(request, f"{user}/profile", owner)
        try:
            await asyncio.to_thread(profiles.store.delete, owner, normalise_user(user))
        except ProfileNotFound:
            return {"user": user, "removed": False}
        return {"user": user, "removed": True}
