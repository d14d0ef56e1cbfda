"""Templates (issue 21): VMs of several templates in one controller, each with its image, size, desktop path,
snapshot and warm pool; logins made from their provider's template. The served controller is test_api.py's
(real service, manager and store; fake host network, guest hops and a `sleep` as the VMM)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import httpx
import pytest

from browservm.config import load_settings
from browservm.controller import check_pools, pool_settings
from browservm.egress import EgressPolicy
from browservm.errors import InvalidInput
from browservm.progress import BuildStep
from browservm.templates import DEFAULT, Template, Templates, templates_for
from browservm.vm.records import VmRecord, VmRecords
from browservm.vm.state import VmState

from .fakes import NOTHING, Parts
from .test_api import Served

TEMPLATES = """
[templates.desktop]
vcpus = 2
mem_mib = 1536
desktop_path = "websockify"

[templates.oauth]
image_profile = "oauth"
mem_mib = 2048
"""


def write(tmp_path: Path, text: str, name: str = "templates.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def refusal(tmp_path: Path, text: str) -> InvalidInput:
    path = write(tmp_path, text)
    with pytest.raises(InvalidInput) as excinfo:
        templates_for(load_settings(state_dir=tmp_path, templates=path))
    assert str(path) in excinfo.value.reason
    return excinfo.value


# --- templates as data ---------------------------------------------------------------------------

def test_without_a_file_the_default_template_is_todays_settings(tmp_path: Path) -> None:
    templates = templates_for(load_settings(state_dir=tmp_path, image_profile="minimal", desktop_path="websockify"))
    assert templates.names() == [DEFAULT]
    assert templates.default == Template(DEFAULT, vcpus=1, mem_mib=1024, image_profile="minimal", rootfs=None,
                                         desktop_path="websockify")


def test_a_file_adds_templates_each_field_left_out_taken_from_the_default(tmp_path: Path) -> None:
    image = write(tmp_path, "an image", "golden.ext4")
    path = write(tmp_path, TEMPLATES + '\n[templates.custom]\nrootfs = "golden.ext4"\n')
    templates = templates_for(load_settings(state_dir=tmp_path, templates=path))
    assert templates.names() == [DEFAULT, "custom", "desktop", "oauth"]
    assert templates.get("desktop") == Template("desktop", vcpus=2, mem_mib=1536, image_profile="full",
                                                desktop_path="websockify")
    assert templates.get("oauth") == Template("oauth", vcpus=1, mem_mib=2048, image_profile="oauth")
    custom = templates.get("custom")
    assert custom.rootfs == image.resolve() and custom.image_profile is None
    assert len({t.image for t in templates}) == 3  # default and desktop share the `full` image


@pytest.mark.parametrize(("text", "field", "words"), [
    ("[templates.big]\nvcpus = 99\n", "templates.big.vcpus", "between 1 and"),
    ("[templates.big]\nmem_mib = \"2048\"\n", "templates.big.mem_mib", "whole number"),
    ("[templates.x]\nimage_profile = \"huge\"\n", "templates.x.image_profile", "must be one of"),
    ("[templates.x]\ndesktop_path = \"vnc\"\n", "templates.x.desktop_path", "rfb, websockify"),
    ("[templates.x]\ncolour = \"red\"\n", "templates.x.colour", "not a template field"),
    ("[templates.x]\nrootfs = \"missing.ext4\"\n", "templates.x.rootfs", "does not exist"),
    ("[templates.x]\nrootfs = \"a\"\nimage_profile = \"full\"\n", "templates.x.rootfs", "not both"),
    ("[templates.Bad]\nvcpus = 1\n", "templates.Bad", "lowercase"),
    ("[other]\n", "templates", "one table"),
    ("[templates\n", "templates", "not valid TOML"),
    ("[templates.x]\negress = \"some\"\n", "templates.x.egress", "internet, none"),
    ("[templates.x]\nclipboard = \"in\"\n", "templates.x.clipboard", "both, paste, copy, none"),
    ("[templates.x]\nclipboard = \"copy\"\ndesktop_path = \"websockify\"\n", "templates.x.clipboard",
     "needs desktop_path"),
    ("[templates.x]\negress_allow = [\"10.0.0.0/33\"]\n", "templates.x.egress_allow", "not an IPv4 network"),
    ("[templates.x]\negress_deny = \"10.0.0.0/8\"\n", "templates.x.egress_deny", "a list of IPv4 networks"),
    ("[templates.x]\negress_deny = [" + ", ".join(f'"10.0.{i}.0/24"' for i in range(65)) + "]\n",
     "templates.x.egress_deny", "at most 64"),
])
def test_a_bad_file_is_refused_at_start_naming_the_file_template_and_field(tmp_path: Path, text: str, field: str,
                                                                            words: str) -> None:
    refused = refusal(tmp_path, text)
    assert refused.field == field and words in refused.reason, refused


def test_pool_sizes_per_template_and_a_plain_number_for_the_default(tmp_path: Path) -> None:
    assert load_settings(state_dir=tmp_path, pool="3").pool == {DEFAULT: 3}
    assert load_settings(state_dir=tmp_path, pool=2).pool == {DEFAULT: 2}
    assert load_settings(state_dir=tmp_path, pool="desktop=4, oauth=2").pool == {"desktop": 4, "oauth": 2}
    for bad in ("desktop=x", "desktop=65", "a=1,a=2"):
        with pytest.raises(InvalidInput) as excinfo:
            load_settings(state_dir=tmp_path, pool=bad)
        assert excinfo.value.field == "pool", bad
    settings = load_settings(state_dir=tmp_path, pool="nosuch=1")
    with pytest.raises(InvalidInput) as refused:
        check_pools(settings, templates_for(settings))
    assert refused.value.field == "pool" and "no such template" in refused.value.reason


def test_the_pools_share_one_memory_budget_each_of_its_templates_size(tmp_path: Path) -> None:
    path = write(tmp_path, TEMPLATES)
    settings = load_settings(state_dir=tmp_path, templates=path, pool="default=2,oauth=4", pool_memory_mib=6000,
                             pool_vm_mib=768)
    made = {pool.template: pool for pool in pool_settings(settings, templates_for(settings))}
    assert (made[DEFAULT].mem_mib, made[DEFAULT].target) == (768, 2)  # pool_vm_mib, as before templates
    assert (made["oauth"].mem_mib, made["oauth"].target) == (2048, 1)  # what the default pool left: 6000-2048


def test_a_record_from_before_templates_reads_as_the_default() -> None:
    data = VmRecord(vm_id="vm-00000000000a", user="ann", vcpus=1, mem_mib=1024, directory="/x").to_json()
    del data["template"]
    assert VmRecord.from_json(data).template == DEFAULT


# --- one controller, several templates ------------------------------------------------------------

@pytest.fixture
def two(serve: Callable[..., Served], tmp_path: Path) -> Callable[..., Served]:
    path = write(tmp_path, TEMPLATES)

    def make(**settings: object) -> Served:
        return serve(templates=path, **settings)
    return make


async def create(client: httpx.AsyncClient, **body: object) -> dict[str, Any]:
    response = await client.post("/v1/vms", params={"wait": "true"}, json={"user": "ann", **body})
    assert response.status_code == 200, response.text
    made: dict[str, Any] = response.json()
    assert made["state"] == "ready", made
    return made


def test_vms_of_two_templates_boot_their_own_images_sizes_and_desktop_paths(two: Callable[..., Served]) -> None:
    served = two(max_vms_per_user=4)

    async def scenario(client: httpx.AsyncClient) -> None:
        plain = await create(client)
        desktop = await create(client, template="desktop")
        oauth = await create(client, template="oauth", mem_mib=1024)  # the request's size wins
        assert [(vm["template"], vm["vcpus"], vm["mem_mib"], vm["desktop_path"]) for vm in (plain, desktop, oauth)] \
            == [(DEFAULT, 1, 1024, "rfb"), ("desktop", 2, 1536, "websockify"), ("oauth", 1, 1024, "rfb")]
        booted = served.parts.driver.booted
        assert booted[plain["vm_id"]] == booted[desktop["vm_id"]] == served.parts.images.rootfs
        assert booted[oauth["vm_id"]] != served.parts.images.rootfs and "oauth" in booted[oauth["vm_id"]].name
        assert sorted(served.parts.resolved) == [DEFAULT, "oauth"]  # one source per image, resolved once each
        listed = (await client.get("/v1/vms", params={"template": "desktop"})).json()
        assert [vm["vm_id"] for vm in listed] == [desktop["vm_id"]]
        everything = (await client.get("/v1/vms")).json()
        assert {vm["vm_id"]: vm["template"] for vm in everything} == {
            plain["vm_id"]: DEFAULT, desktop["vm_id"]: "desktop", oauth["vm_id"]: "oauth"}
        stored = VmRecords(served.parts.store).get(oauth["vm_id"])
        assert stored is not None and stored.template == "oauth"

    served.run(scenario)


def test_an_unknown_template_is_a_422_naming_it_and_nothing_is_made(two: Callable[..., Served]) -> None:
    served = two()

    async def scenario(client: httpx.AsyncClient) -> None:
        for name, words in (("nosuch", "no such template"), ("Bad Name", "pattern")):
            response = await client.post("/v1/vms", json={"user": "ann", "template": name})
            assert response.status_code == 422, response.text
            error = response.json()["error"]
            assert error["field"].endswith("template") and words in error["message"], error
        assert (await client.get("/v1/vms")).json() == []
        listed = await client.get("/v1/vms", params={"template": "nosuch"})
        assert listed.status_code == 422 and listed.json()["error"]["field"] == "template", listed.text

    served.run(scenario)


def test_the_document_and_the_listing_name_the_templates(two: Callable[..., Served]) -> None:
    served = two(pool="desktop=1")

    async def scenario(client: httpx.AsyncClient) -> None:
        document = (await client.get("/openapi.json")).json()
        names = [DEFAULT, "desktop", "oauth"]
        assert document["components"]["schemas"]["CreateVm"]["properties"]["template"]["enum"] == names
        parameters = {p["name"]: p for p in document["paths"]["/v1/vms"]["get"]["parameters"]}
        assert parameters["template"]["schema"]["anyOf"][0]["enum"] == names
        templates = (await client.get("/v1/templates")).json()
        assert [(t["name"], t["vcpus"], t["mem_mib"], t["image_profile"], t["pool"]) for t in templates] == [
            (DEFAULT, 1, 1024, "full", 0), ("desktop", 2, 1536, "full", 1), ("oauth", 1, 2048, "oauth", 0)]
        async with served.client(headers={}) as anonymous:
            assert (await anonymous.get("/v1/templates")).status_code == 401

    served.run(scenario)


def test_each_template_has_its_own_pool_and_snapshot_and_a_claim_takes_only_from_its_own(
        two: Callable[..., Served]) -> None:
    served = two(pool="desktop=1,oauth=1", max_vms=6, max_vms_per_user=4)
    manager = served.service.manager

    async def scenario(client: httpx.AsyncClient) -> None:
        await served.service.start()
        assert set(manager.pools) == {"desktop", "oauth"}
        for pool in manager.pools.values():
            assert await pool.wait_filled(30)
        pooled = {r.template: r.vm_id for r in await manager.all() if r.in_pool}
        assert set(pooled) == {"desktop", "oauth"}
        snapshots = {s.key for s in manager.snapshots.all()}
        assert len(snapshots) == 2  # one per template: its image and size
        # The default template has no pool: booted, even at the size the desktop pool keeps.
        plain = await create(client, vcpus=2, mem_mib=1536)
        assert plain["started_from"] in ("cold", "restored") and plain["vm_id"] not in pooled.values()
        desktop = await create(client, template="desktop")
        assert (desktop["vm_id"], desktop["started_from"]) == (pooled["desktop"], "pooled")
        still = [r for r in await manager.all() if r.in_pool and r.state == VmState.READY]
        assert pooled["oauth"] in [r.vm_id for r in still]  # the other template's pool kept its VM
        oauth = await create(client, template="oauth", mem_mib=1024)  # not the pool's size: not from it
        assert oauth["vm_id"] != pooled["oauth"] and oauth["started_from"] != "pooled"

    served.run(scenario)


def test_a_build_of_one_templates_image_is_told_to_its_vms_only(parts: Parts) -> None:
    parts.build_steps = [BuildStep("the oauth image", 1, 1, "debootstrap")]
    parts.build_done = threading.Event()
    templates = Templates({DEFAULT: Template(DEFAULT), "oauth": Template("oauth", image_profile="oauth")})

    async def scenario() -> None:
        manager = parts.manager(templates=templates)
        told: list[tuple[str, str]] = []
        manager.on_note = lambda record, kind, detail: told.append((record.template, kind))
        _, task = await manager.start("ann", template="oauth")
        while not told:
            await asyncio.sleep(0.01)
        assert told == [("oauth", "build")]
        assert manager.building_of("oauth") is not None and manager.building_of(DEFAULT) is None
        assert parts.build_done is not None
        parts.build_done.set()
        done = await asyncio.wait_for(task, 30)
        assert done.state == VmState.READY and manager.building_of("oauth") is None
        await manager.destroy(done.vm_id)
        await manager.close()

    asyncio.run(scenario())
    assert parts.leftovers() == NOTHING


KIOSK = """
[templates.kiosk]
egress = "none"
egress_allow = ["10.20.0.0/16", "10.20.1.0/24"]

[templates.partner]
egress_deny = ["203.0.113.0/24"]
"""


def test_a_template_s_egress_policy_goes_with_its_vms_leases_and_is_listed(serve: Callable[..., Served],
                                                                         tmp_path: Path) -> None:
    served = serve(templates=write(tmp_path, KIOSK), max_vms_per_user=4)
    kiosk = EgressPolicy(internet=False, allow=(IPv4Network("10.20.0.0/16"),))  # the /24 is within the /16
    partner = EgressPolicy(internet=True, deny=(IPv4Network("203.0.113.0/24"),))

    async def scenario(client: httpx.AsyncClient) -> None:
        made = {name: await create(client, template=name) for name in (DEFAULT, "kiosk", "partner")}
        added = served.parts.network.leases
        assert [added[made[name]["vm_id"]].egress for name in (DEFAULT, "kiosk", "partner")] == [None, kiosk, partner]
        # The store keeps it: a restart sets the VM's port up again with its policy (tests/integration).
        assert served.parts.ipam.get(made["kiosk"]["vm_id"]).egress == kiosk  # type: ignore[union-attr]
        templates = {t["name"]: t["egress"] for t in (await client.get("/v1/templates")).json()}
        assert templates == {DEFAULT: None,
                             "kiosk": {"egress": "none", "egress_allow": ["10.20.0.0/16"], "egress_deny": []},
                             "partner": {"egress": "internet", "egress_allow": [], "egress_deny": ["203.0.113.0/24"]}}

    served.run(scenario)


def test_a_tenant_key_is_not_shown_where_image_files_lie(serve: Callable[..., Served], tmp_path: Path) -> None:
    image = write(tmp_path, "an image", "golden.ext4")
    served = serve(templates=write(tmp_path, '[templates.custom]\nrootfs = "golden.ext4"\n'))

    async def scenario(client: httpx.AsyncClient) -> None:
        made = (await client.post("/v1/keys", json={"name": "app", "role": "tenant", "tenant": "acme"})).json()
        operator = {t["name"]: t["rootfs"] for t in (await client.get("/v1/templates")).json()}
        assert operator["custom"] == str(image.resolve())
        async with served.client(headers={"Authorization": f"Bearer {made['key']}"}) as tenant:
            listed = {t["name"]: t["rootfs"] for t in (await tenant.get("/v1/templates")).json()}
        assert listed == {DEFAULT: None, "custom": "golden.ext4"}

    served.run(scenario)
