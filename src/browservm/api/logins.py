"""Logins (issue 9): POST /v1/logins and its companions, the OAuth agent's client, the credential vault's routes."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastapi import FastAPI

    from browservm.api.service import ControllerService


def mount(app: FastAPI, service: ControllerService) -> None:
    """Add this part's routes to `app`, and its tasks to `service` (`run_in_background`, `on_stop`)."""
