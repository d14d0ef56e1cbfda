"""Shared fixtures. Tiers: unit (anywhere), host (root, fresh namespaces), vm (boots guests)."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root: creates network namespaces and kernel objects")
    for item in items:
        if "host" in item.keywords or "vm" in item.keywords:
            item.add_marker(skip)
