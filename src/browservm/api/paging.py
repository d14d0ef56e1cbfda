"""Listings a page at a time (GET /v1/vms, /v1/logins): a `limit`, and a `cursor` the answer gives in
`X-Next-Cursor` (and `Link: <...>; rel="next"`, the same query with the cursor) while there is a next page.

A cursor is `c1.<n>`, n a number of the listing's own order that is never reused, so pages skip and repeat
nothing while others create; the body stays the list it always was.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import Response

MAX_PAGE = 500
CURSOR_PATTERN = r"^c1\.[0-9]{1,18}$"
NEXT_PAGE_HEADERS: dict[str, Any] = {
    "X-Next-Cursor": {"description": "the next page's `cursor`; absent on the last page", "schema": {"type": "string"}},
    "Link": {"description": "the next page's URL, rel=\"next\"", "schema": {"type": "string"}}}


def cursor_number(cursor: str) -> int:
    return int(cursor.removeprefix("c1."))


def next_page(request: Request, response: Response, base_url: str, last: int) -> None:
    """Point the answer at the page after the one that ended at `last`."""
    cursor = f"c1.{last}"
    query = [(name, value) for name, value in request.query_params.multi_items() if name != "cursor"]
    response.headers["X-Next-Cursor"] = cursor
    response.headers["Link"] = f'<{base_url}{request.url.path}?{urlencode([*query, ("cursor", cursor)])}>; rel="next"'
