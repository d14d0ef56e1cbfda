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
from pathlib import Path

from browservm.cli.client import CA_FILE_HELP, connect
from browservm.client import LoginFailed
from browservm.client.models import Login
from browservm.config import Settings


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser],
               common: argparse.ArgumentParser) -> None:
    login = commands.add_parser("login", parents=[common], help="log a CLI tool in for a user, in a throwaway VM of "
                                "a running controller; the person completes it in the printed viewer link")
    login.add_argument("provider", metavar="PROVIDER", help="a provider of the controller's catalog (claude-code, "
                                                            "codex, gemini-cli, sample, or the operator's)")
    login.add_argument("--user", required=True, help="whose credentials they become")
    login.add_argument("--url", metavar="URL", help="the controller (default BROWSERVM_URL, else its listen address)")
    login.add_argument("--ca-file", type=Path, metavar="PEM", help=CA_FILE_HELP)
    login.add_argument("--vm", dest="vm_id", metavar="VM_ID", help="log in inside this VM of the user's")
    login.add_argument("--keep-vm", action="store_true", help="keep the VM afterwards (default: destroyed)")


def _print_state(login: Login) -> None:
    seconds = login.states.get(login.state)
    detail = {"booting": f"VM {login.vm_id} comes up",
              "starting": "the agent starts the tool",
              "waiting-for-user": f"sign in at {login.auth_url_host or '?'} in the viewer",
              "captured": f"{login.files} credentials file(s)"}.get(login.state, login.reason or "")
    at = f"{seconds:7.1f} s" if seconds is not None else " " * 9
    print(f"  {login.state:<17}{at}  {detail}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace, settings: Settings) -> int:
    url = args.url or os.environ.get("BROWSERVM_URL") or settings.base_url
    with connect(url, settings) as client:
        started = client.start_login(args.user, args.provider, args.vm_id, args.keep_vm)
        login_id = started.login_id
        if not args.json:
            print(f"login {login_id}: {args.provider} for {args.user} in VM {started.vm_id}", flush=True)
            print(f"  viewer     {started.viewer_url}\n             (open it in a browser and complete the sign-in "
                  "there)", flush=True)
        try:
            login = client.wait_login(login_id, on_change=None if args.json else _print_state)
        except LoginFailed as exc:
            login = exc.login
        except KeyboardInterrupt:
            print(f"browservm: cancelled: cancelling login {login_id}", file=sys.stderr, flush=True)
            client.cancel_login(login_id)
            raise
    if args.json:
        print(json.dumps({**login.as_json(), "viewer_url": started.viewer_url}, indent=2))
    elif login.state == "captured":
        print(f"captured: {login.files} file(s), sha256 {login.sha256}; the credentials are in the controller's "
              f"vault (GET /v1/users/{args.user}/credentials/{args.provider})")
    else:
        where = f" at {login.hop}" if login.hop else ""
        print(f"browservm: login {login.state}{where}: {login.reason or ''}", file=sys.stderr)
        if login.exit_status is not None:
            print(f"  the tool's exit status: {login.exit_status}", file=sys.stderr)
        for line in login.output:
            print(f"  | {line}", file=sys.stderr)
    return 0 if login.state == "captured" else 1
