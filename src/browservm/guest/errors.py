"""The roots of browservm's error tree, which the guest's code raises too (bootargs.BootArgsError).

The whole tree is drawn in browservm/errors.py, which host code imports them from; they live here
because the guest image carries the guest package and nothing else of browservm.
"""

from __future__ import annotations


class BrowserVMError(Exception):
    """Base of every error browservm raises on purpose."""


class InvalidInput(BrowserVMError, ValueError):
    """A value given by a person or a program is not acceptable."""

    def __init__(self, field: str, value: object, reason: str) -> None:
        self.field = field
        self.value = value
        self.reason = reason
        super().__init__(f"{field}: {reason} (got {value!r})")
