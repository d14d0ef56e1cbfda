"""The cluster's token: one secret, in a file on each machine (cluster up's DIR/cluster.token, copied to
each host's state directory), from which every credential between the cluster's own parts comes:

- the password agents and other fronts log in to PostgreSQL with (the token itself);
- the API key of each host's controller, which fronts use to relay a VM's event stream to it.

So a host joins with one file, and a new token (the file replaced, PostgreSQL's password set again by
`cluster up`) changes them all.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

from browservm.secretfile import read_existing

TOKEN_FILE = "cluster.token"  # noqa: S105  # a file's name


def read_token(path: Path) -> str:
    return read_existing(path, "the cluster's token").strip()


def host_api_key(token: str) -> str:
    """The API key of every host's controller in the cluster."""
    return hmac.new(token.encode(), b"browservm host controller api key", hashlib.sha256).hexdigest()
