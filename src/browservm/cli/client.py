"""The CLI's side of talking to a controller: which key, and the errors told as the CLI tells them.

Every request goes through browservm.client (`vm ... --url`, `login`, `cluster hosts`, `host drain`).
What stays here is the CLI's alone: the API key is BROWSERVM_API_KEY, else <state-dir>/api.key (made
by the controller at its first start, never here), and a refused key says where it came from; an https
controller's certificate is verified against --ca-file (BROWSERVM_CA_FILE) when given.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from browservm.api.keys import API_KEY_FILE
from browservm.client import Client, ControllerError, ControllerUnreachable, InvalidRequest
from browservm.client import KeyRefused as ClientKeyRefused
from browservm.client.http import parse_url
from browservm.config import Settings
from browservm.errors import BrowserVMError, StateError
from browservm.secretfile import read_existing

__all__ = ["CA_FILE_HELP", "KEY_ENV", "ControllerError", "ControllerUnreachable", "InvalidRequest", "KeyRefused",
           "api_key", "connect", "parse_url"]

KEY_ENV = "BROWSERVM_API_KEY"
CA_FILE_HELP = ("for an https URL: trust this CA (or the controller's own certificate) in place of the system's CAs "
                "(also BROWSERVM_CA_FILE)")


class KeyRefused(BrowserVMError):
    def __init__(self, url: str, source: str) -> None:
        self.url = url
        self.source = source
        super().__init__(f"the API key was refused by {url} (from {source}); the controller's key is in its "
                         f"state directory's {API_KEY_FILE}: give that directory with --state-dir, "
                         f"or the key in {KEY_ENV}")


def api_key(settings: Settings) -> tuple[str, str]:
    """The API key and where it came from: BROWSERVM_API_KEY, else <state-dir>/api.key (never made here)."""
    if settings.api_key:
        return settings.api_key, KEY_ENV
    path = settings.state_dir / API_KEY_FILE
    try:
        key = read_existing(path, "the API key").strip()  # never through a link: it goes to the URL given
    except FileNotFoundError:
        raise StateError(str(path), "no API key here: the controller makes it at its first start; give its "
                                    f"state directory with --state-dir, or the key in {KEY_ENV}") from None
    except OSError as exc:
        raise StateError(str(path), f"cannot read the API key: {exc.strerror} (it is readable by root alone); "
                                    f"run as root, or give the key in {KEY_ENV}") from None
    if not key:
        raise StateError(str(path), f"is empty; give the key in {KEY_ENV}")
    return key, str(path)


@contextmanager
def connect(url: str, settings: Settings) -> Iterator[Client]:
    """A client of the controller at `url` with the CLI's key; a refused key names where it came from."""
    key, source = api_key(settings)
    client = Client(url, api_key=key, ca_file=settings.ca_file)
    try:
        with client:
            yield client
    except ClientKeyRefused:
        raise KeyRefused(client.base_url, source) from None
