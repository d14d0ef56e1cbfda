"""`browservm login PROVIDER --user U`: a provider's login through a running controller.

Posts the login (POST /v1/logins), prints the viewer link where the person completes it, then follows
the login's events and prints each state as it changes. Exits 0 once the credentials are captured
(they stay in the controller's vault: GET /v1/users/U/credentials/PROVIDER), 1 when the login failed,
timed out or was cancelled (with the reason, and the tool's last lines), 2 on bad input. Ctrl-C
cancels the login (the controller stops the tool and destroys the VM).

The controller is --url, else BROWSERVM_URL, else the settings' own listen address; the key as for
`vm --url` (BROWSERVM_API_KEY, else <state-dir>/api.key).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Generator
from typing import Any
from urllib.parse import quote

from browservm.cli import stream
from browservm.cli.client import ControllerClient, api_key
from browservm.cli.stream import Event
from browservm.config import Settings

FINAL = ("captured", "failed", "timed-out", "cancelled")


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser],
               common: argparse.ArgumentParser) -> None:
    login = commands.add_parser("login", parents=[common], help="log a CLI tool in for a user, in a throwaway VM of "
                                "a running controller; the person completes it in the printed viewer link")
    login.add_argument("provider", metavar="PROVIDER", help="a provider of the controller's catalog (claude-code, "
                                                            "codex, gemini-cli, sample, or the operator's)")
    login.add_argument("--user", required=True, help="whose credentials they become")
    login.add_argument("--url", metavar="URL", help="the controller (default BROWSERVM_URL, else its listen address)")
    login.add_argument("--vm", dest="vm_id", metavar="VM_ID", help="log in inside this VM of the user's")
    login.add_argument("--keep-vm", action="store_true", help="keep the VM afterwards (default: destroyed)")


class LoginClient(ControllerClient):
    """The controller's login routes, on ControllerClient's plumbing (errors, transport, loopback rules)."""

    def start_login(self, user: str, provider: str, vm_id: str | None, keep_vm: bool) -> dict[str, Any]:
        body: dict[str, Any] = {"user": user, "provider": provider, "keep_vm": keep_vm}
        if vm_id is not None:
            body["vm_id"] = vm_id
        started: dict[str, Any] = self._json("POST", "/v1/logins", json=body)
        return started

    def get_login(self, login_id: str) -> dict[str, Any]:
        login: dict[str, Any] = self._json("GET", _login_path(login_id))
        return login

    def cancel_login(self, login_id: str) -> dict[str, Any]:
        answer: dict[str, Any] = self._json("DELETE", _login_path(login_id))
        return answer

    def login_events(self, login_id: str) -> Generator[Event, None, None]:
        """The login's events; ends with the stream, or raises stream.Quiet after `events_quiet` seconds of
        silence (the person takes their time: the follower asks for the record and subscribes again)."""
        yield from self.subscribe(_login_path(login_id, "events"))


def _login_path(login_id: str, *rest: str) -> str:
    return "/".join(("/v1/logins", quote(login_id, safe=""), *rest))


def follow(client: LoginClient, login_id: str, on_change: Any) -> dict[str, Any]:
    """Report each new state once; the login once it is final."""
    last = ""
    final: dict[str, Any] | None = None

    def event(state: str, login: dict[str, Any]) -> bool:
        nonlocal last, final
        if state != last:
            last = state
            on_change(login)
        if state in FINAL:
            final = login
        return final is not None

    def settle(quiet: bool) -> dict[str, Any] | None:
        if final is not None:
            return final
        login = client.get_login(login_id)
        if login["state"] not in FINAL:
            return None
        if login["state"] != last:
            on_change(login)
        return login

    return stream.follow(lambda: client.login_events(login_id), event, settle)


def _print_state(login: dict[str, Any]) -> None:
    state = login["state"]
    seconds = login.get("states", {}).get(state)
    detail = {"booting": f"VM {login['vm_id']} comes up",
              "starting": "the agent starts the tool",
              "waiting-for-user": f"sign in at {login.get('auth_url_host') or '?'} in the viewer",
              "captured": f"{login.get('files')} credentials file(s)"}.get(state, login.get("reason") or "")
    at = f"{seconds:7.1f} s" if isinstance(seconds, int | float) else " " * 9
    print(f"  {state:<17}{at}  {detail}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace, settings: Settings) -> int:
    url = args.url or os.environ.get("BROWSERVM_URL") or settings.base_url
    key, source = api_key(settings)
    client = LoginClient(url, key, key_source=source)
    with client:
        started = client.start_login(args.user, args.provider, args.vm_id, args.keep_vm)
        login_id = started["login_id"]
        if not args.json:
            print(f"login {login_id}: {args.provider} for {args.user} in VM {started['vm_id']}", flush=True)
            print(f"  viewer     {started['viewer_url']}\n             (open it in a browser and complete the sign-in "
                  "there)", flush=True)
        try:
            login = follow(client, login_id, (lambda _: None) if args.json else _print_state)
        except KeyboardInterrupt:
            print(f"browservm: cancelled: cancelling login {login_id}", file=sys.stderr, flush=True)
            client.cancel_login(login_id)
            raise
    if args.json:
        print(json.dumps({**login, "viewer_url": started["viewer_url"]}, indent=2))
    elif login["state"] == "captured":
        print(f"captured: {login['files']} file(s), sha256 {login['sha256']}; the credentials are in the controller's "
              f"vault (GET /v1/users/{args.user}/credentials/{args.provider})")
    else:
        where = f" at {login['hop']}" if login.get("hop") else ""
        print(f"browservm: login {login['state']}{where}: {login.get('reason') or ''}", file=sys.stderr)
        if login.get("exit_status") is not None:
            print(f"  the tool's exit status: {login['exit_status']}", file=sys.stderr)
        for line in login.get("output") or []:
            print(f"  | {line}", file=sys.stderr)
    return 0 if login["state"] == "captured" else 1
