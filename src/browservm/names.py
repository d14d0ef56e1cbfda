"""What a name a person gives (a user, a key's name) may be: 1-64 characters, not only spaces, and no control
character (C0, DEL, C1), which could rewrite a terminal or a log line. One rule, for the server's check and
for the pattern the API's document states."""

from __future__ import annotations

import re
from typing import TypeGuard

CONTROLS = "\\x00-\\x1f\\x7f-\\x9f"  # for a regular expression's character class
NAME_PATTERN = rf"^\s*[^\s{CONTROLS}][^{CONTROLS}]*$"
_NAME = re.compile(NAME_PATTERN)


def is_name(value: object) -> TypeGuard[str]:
    return isinstance(value, str) and len(value) <= 64 and _NAME.match(value) is not None
