"""A login's life as states, with one guarded way to move between them.

    booting ──► starting ──► waiting-for-user ──► captured
       │           │   └──────────────┼────────────► captured   (the tool finished before a poll saw it wait)
       └───────────┴──────────────────┴──► failed | timed-out | cancelled

`booting`: the VM comes up (or a given one is checked); `starting`: the agent was asked to start the
tool; `waiting-for-user`: the tool opened the authorization URL in the VM's browser; `captured`: the
credentials were handed over and are in the vault. The last four are final.
"""

from __future__ import annotations

import enum

from browservm.oauth.errors import LoginTransition


class LoginState(enum.Enum):
    BOOTING = "booting"
    STARTING = "starting"
    WAITING = "waiting-for-user"
    CAPTURED = "captured"
    FAILED = "failed"
    TIMED_OUT = "timed-out"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in FINAL


FINAL = frozenset({LoginState.CAPTURED, LoginState.FAILED, LoginState.TIMED_OUT, LoginState.CANCELLED})
_ENDS = {LoginState.FAILED, LoginState.TIMED_OUT, LoginState.CANCELLED}
ALLOWED: dict[LoginState, frozenset[LoginState]] = {
    LoginState.BOOTING: frozenset({LoginState.STARTING, *_ENDS}),
    LoginState.STARTING: frozenset({LoginState.WAITING, LoginState.CAPTURED, *_ENDS}),
    LoginState.WAITING: frozenset({LoginState.CAPTURED, *_ENDS}),
    **{state: frozenset() for state in FINAL},
}


def transition(login_id: str, current: LoginState, new: LoginState) -> LoginState:
    """`new`, if a login may go there from `current`; LoginTransition otherwise."""
    if new not in ALLOWED[current]:
        raise LoginTransition(login_id, current.value, new.value)
    return new
