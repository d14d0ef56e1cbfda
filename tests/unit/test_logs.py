"""The controller's logs (browservm.api.logs): an access line per request with its id, never a secret,
and the JSON format a log pipeline reads."""

from __future__ import annotations

import json
import logging

import pytest
from fastapi import FastAPI, WebSocket
from starlette.testclient import TestClient

from browservm.api.logs import REQUEST_ID, AccessLog, JsonLines, configure, redacted

SECRET = "s3cr3t-Value"


def app() -> FastAPI:
    made = FastAPI()
    made.add_middleware(AccessLog)

    @made.get("/view/{vm_id}/state")
    async def state(vm_id: str, token: str = "") -> dict[str, str | None]:
        logging.getLogger("browservm.test").info("looking up %s", vm_id)
        return {"request_id": REQUEST_ID.get()}

    @made.websocket("/v1/vms/{vm_id}/vnc")
    async def vnc(websocket: WebSocket, vm_id: str, token: str = "") -> None:
        await websocket.accept()
        await websocket.close(4404, "no such VM")

    return made


def test_each_request_gets_an_id_on_its_lines_and_in_its_answer_and_no_secret_is_logged(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    with TestClient(app()) as client:
        answer = client.get(f"/view/vm-1/state?token={SECRET}&lines=5", headers={"Authorization": f"Bearer {SECRET}"})
        with client.websocket_connect(f"/v1/vms/vm-1/vnc?token={SECRET}") as socket:
            socket.receive()
    request_id = answer.headers["x-request-id"]
    assert answer.json()["request_id"] == request_id and len(request_id) == 16
    lines = [(record.name, record.getMessage()) for record in caplog.records if record.name.startswith("browservm")]
    assert all(SECRET not in message for _, message in lines), lines
    access = [message for name, message in lines if name == "browservm.access"]
    assert access[0].startswith("GET /view/vm-1/state?token=%5Bredacted%5D&lines=5 200 ")
    assert access[1].startswith("WS /v1/vms/vm-1/vnc?token=%5Bredacted%5D ws-close 4404 ")


def test_json_lines_carry_time_level_logger_message_and_the_request_id() -> None:
    record = logging.LogRecord("browservm.service", logging.WARNING, __file__, 1, "VM %s failed", ("vm-1",), None)
    record.request_id = "0123456789abcdef"
    line = json.loads(JsonLines().format(record))
    assert line["level"] == "warning" and line["logger"] == "browservm.service"
    assert line["message"] == "VM vm-1 failed" and line["request_id"] == "0123456789abcdef"
    assert line["time"].endswith("+00:00") and "T" in line["time"]


def test_only_secret_parameters_are_redacted() -> None:
    assert redacted("token=a&lines=3&KEY=b&api_key=c") == "token=%5Bredacted%5D&lines=3&KEY=%5Bredacted%5D&" \
                                                         "api_key=%5Bredacted%5D"
    assert redacted("") == ""


def test_the_configured_log_keeps_httpx_from_writing_urls_with_tokens() -> None:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        configure("json")
        assert not logging.getLogger("httpx").isEnabledFor(logging.INFO)
        assert logging.getLogger("browservm.access").isEnabledFor(logging.INFO)
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        logging.getLogger("httpx").setLevel(logging.NOTSET)
