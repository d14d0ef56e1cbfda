"""A user agent that does what the person does on the test server's consent page: follow the URL,
press "Approve", follow the redirect to the tool's loopback listener. Used as `$BROWSER` in unit tests
(where no Chromium runs); it speaks plain HTTP with urllib, like a browser would, and nothing else.

    python -m tests.support.approve URL        exit 0 once the tool's callback page answered 200
"""

from __future__ import annotations

import re
import sys
import urllib.error
import urllib.request
from html import unescape
from urllib.parse import urlencode, urljoin

_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_FORM = re.compile(r'<form method="post" action="([^"]+)">(.*?)</form>', re.S)
_HIDDEN = re.compile(r'<input type="hidden" name="([^"]*)" value="([^"]*)">')


def approve(url: str) -> int:
    with _DIRECT.open(url, timeout=15) as response:
        page = response.read().decode()
        landed = response.geturl()
    form = _FORM.search(page)
    if form is None:  # auto-approve: the redirect was followed to the tool's page already
        return 0 if "Signed in" in page else 1
    fields = dict((unescape(k), unescape(v)) for k, v in _HIDDEN.findall(form.group(2)))
    fields["approve"] = "1"
    request = urllib.request.Request(urljoin(landed, form.group(1)), data=urlencode(fields).encode())
    try:
        with _DIRECT.open(request, timeout=15) as response:
            return 0 if "Signed in" in response.read().decode() else 1
    except urllib.error.HTTPError as exc:
        sys.stderr.write(f"approve: {exc.code} from {exc.url}\n")
        return 1


if __name__ == "__main__":
    sys.exit(approve(sys.argv[1]))
