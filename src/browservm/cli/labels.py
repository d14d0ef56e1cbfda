"""`--label KEY=VALUE`, as `vm create` and `vm ls` take it, in local mode and through a controller."""

from __future__ import annotations

import re

from browservm.api.models import LABEL_KEY
from browservm.errors import InvalidInput
from browservm.names import CONTROLS


def labels_of(given: list[str]) -> dict[str, str]:
    """`--label KEY=VALUE` words as labels, each checked as the API checks them (InvalidInput naming --label)."""
    labels = {}
    for word in given:
        key, equals, value = word.partition("=")
        if not equals or not re.match(LABEL_KEY, key) or len(value) > 256 or re.search(f"[{CONTROLS}]", value):
            raise InvalidInput("label", word, "must be KEY=VALUE: a key of a-z, 0-9 and ._/- (at most 63, starting "
                                              "with a letter or digit), a value of at most 256 characters, no control "
                                              "character")
        labels[key] = value
    if len(labels) > 16:
        raise InvalidInput("label", len(labels), "at most 16 labels")
    return labels
