"""The OpenAPI document as a contract (issue 21): schemathesis, with every check it has, against a served
controller (the API on uvicorn on 127.0.0.1, its real service and store on test_api.py's fake VMs), as an
outside client would run it: statuses, content types, headers and bodies as documented; requests the
document allows accepted, those it does not refused; authentication as declared (its own probes without
a key, or with a wrong one, go over the same socket). Deterministic: a fixed seed, no example database.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from schemathesis.specs.openapi.schemas import OpenApiSchema

from browservm.access.keys import digest

from .fakes import stop_all
from .test_api import KEY, serve_fakes
from .test_api_fuzz import OPENAPI
from .test_logins import Running

SEED = 20261207


def _contract(key: str) -> OpenApiSchema:
    return schemathesis.openapi.from_dict(DOCUMENT, config=schemathesis.Config.from_dict({
        "seed": SEED,
        # schemathesis puts the key in itself, and leaves it out or spoils it in its cases about authentication
        "auth": {"openapi": {"apiKey": {"bearer": key}}},
        "generation": {"max-examples": 25, "deterministic": True, "database": "none"},
    }))


DOCUMENT = OPENAPI  # the app's, read at collection (schemathesis needs the operations then)
# A tenant key the fixture puts in the store (a key ring makes random ones; the schema needs it now).
TENANT_KEY_ID = "0000000000ac"
TENANT_KEY = f"bvm_{TENANT_KEY_ID}_contract-tests-tenant-key"
contract = _contract(KEY)
as_tenant = _contract(TENANT_KEY)


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    served = serve_fakes(tmp_path_factory.mktemp("contract"), None, max_vms=12, max_vms_per_user=12)
    with served.parts.store.transaction() as db:
        db.execute("INSERT INTO api_keys (key_id, name, role, tenant, digest, created_at) VALUES "
                   "(?, 'contract tests', 'tenant', 'acme', ?, 0)", (TENANT_KEY_ID, digest(TENANT_KEY)))
    running = Running(served)
    try:
        yield running
    finally:
        running.stop()
        stop_all(served.parts)


def test_the_document_is_the_one_served(running: Running) -> None:
    served = httpx.get(f"{running.url}/openapi.json", headers={"Authorization": f"Bearer {KEY}"})
    assert served.json() == DOCUMENT


@contract.parametrize()
def test_every_answer_to_an_admin_key_is_one_the_document_promises(case: schemathesis.Case[Any],
                                                                   running: Running) -> None:
    case.call_and_validate(base_url=running.url)


@as_tenant.parametrize()
def test_every_answer_to_a_tenant_key_is_one_the_document_promises(case: schemathesis.Case[Any],
                                                                   running: Running) -> None:
    """The same with a tenant key: the admin routes refuse it (403, as documented), the rest answer it within
    its tenant."""
    case.call_and_validate(base_url=running.url)
