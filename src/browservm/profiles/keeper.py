"""A user's browser profile into a VM at its start and out of it before its end.

    load  after the desktop is ready (a cold boot, a restore) or once a pooled VM is claimed: the guest's
          keeper is given the sealed profile and the user's key, opens it, and starts Chromium again with
          it. A failure fails the create at hop profile.load, with the keeper's words.
    save  before a VM that loaded one ends (deleted, reaped, its login over, the controller stopping with
          stop_vms_on_exit): the keeper stops Chromium, packs and seals the profile; the host keeps the
          ciphertext. A failure keeps the profile saved before and says why; the VM ends all the same.

A pooled or restored VM is reached the same way as a cold one, over its network (nothing is attached
to the VM: a microvm machine cannot take a disk once it runs), with the VM's own agent key.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from ipaddress import IPv4Address

from browservm.errors import BrowserVMError, ProbeFailed
from browservm.guest.profile_keeper import PORT as KEEPER_PORT
from browservm.hostnet.netns import NetworkNamespace
from browservm.profiles.guest import LOAD, KeeperClient
from browservm.profiles.store import ProfileStore, binding
from browservm.vm.guest_http import GuestEndpoint
from browservm.vm.records import VmRecord

log = logging.getLogger(__name__)


class Profiles:
    def __init__(self, store: ProfileStore, netns: NetworkNamespace, secrets: Callable[[str], dict[str, str]]) -> None:
        """`secrets` reads a VM's config disk secrets (blocking): the keeper takes the VM's agent key."""
        self.store = store
        self._netns = netns
        self._secrets = secrets

    async def _client(self, record: VmRecord) -> KeeperClient:
        token = (await asyncio.to_thread(self._secrets, record.vm_id))["agent"]
        return KeeperClient(GuestEndpoint(self._netns, IPv4Address(record.address.split("/")[0]), KEEPER_PORT), token)

    async def load(self, record: VmRecord) -> None:
        try:
            key = await asyncio.to_thread(self.store.key, record.tenant, record.user)
            sealed = await asyncio.to_thread(self.store.read, record.tenant, record.user)
        except (BrowserVMError, OSError) as exc:
            raise ProbeFailed(LOAD, f"the host could not read the profile: {exc}") from None
        files = await (await self._client(record)).load(sealed, key, binding(record.tenant, record.user))
        log.info("%s: profile of %r loaded (%d bytes sealed, %d files)", record.vm_id, record.user, len(sealed), files)

    async def save(self, record: VmRecord) -> None:
        """ProbeFailed (profile.*) or BrowserVMError/OSError (the host's side) when it could not be saved."""
        key = await asyncio.to_thread(self.store.key, record.tenant, record.user)
        sealed = await (await self._client(record)).save(key, binding(record.tenant, record.user),
                                                          self.store.max_bytes)
        await asyncio.to_thread(self.store.write, record.tenant, record.user, sealed)
        log.info("%s: profile of %r saved (%d bytes sealed)", record.vm_id, record.user, len(sealed))
