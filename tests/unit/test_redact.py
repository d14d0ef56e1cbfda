"""Login output redaction (oauth/redact.py): a piece of a known secret drops its line, a token's shape
is masked, and what a person needs to read a failure stays."""

from __future__ import annotations

import json

from browservm.oauth.redact import MASK, REDACTED, Redactor, captured_secrets

ACCESS = "sk-ant-oat01-Zm9vYmFyYmF6cXV4LXNlY3JldC10b2tlbg"
FILES = {"/home/browser/.claude/.credentials.json": json.dumps(
    {"claudeAiOauth": {"accessToken": ACCESS, "expiresAt": 1796589963710, "scopes": ["user:inference"],
                       "subscriptionType": "pro"}}).encode()}


def test_a_line_sharing_a_piece_of_a_captured_secret_is_dropped_whatever_its_length() -> None:
    redactor = Redactor(captured_secrets(FILES))
    for line in (f"token {ACCESS}", f"token {ACCESS[:12]}…", f"…{ACCESS[-12:]}", f"x{ACCESS[20:32]}y"):
        assert redactor.line(line) == REDACTED, line
    # Keys, numbers and short values are not secrets; eleven characters in a row are not a piece.
    for line in ("claudeAiOauth written", "expires 1796589963710", "plan: pro", f"{ACCESS[:11]} is the prefix"):
        assert redactor.line(line) == line


def test_known_secrets_of_the_vm_are_dropped_a_short_one_whole() -> None:
    redactor = Redactor(["0123456789abcdef" * 4, "Vnc8Pass"])
    assert redactor.line("agent key 0123456789abcdef…") == REDACTED
    assert redactor.line("password Vnc8Pass") == REDACTED and redactor.line("password Vnc8Pas") == "password Vnc8Pas"
    assert redactor.adding(captured_secrets(FILES)).line(ACCESS) == REDACTED


def test_a_token_shaped_run_is_masked_in_place_and_the_rest_of_a_failure_stays() -> None:
    redactor = Redactor([])
    jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbm4ifQ.c2lnbmF0dXJl"
    assert redactor.line(f"error: invalid_grant for {jwt} (400)") == f"error: invalid_grant for {MASK} (400)"
    assert redactor.line("ya29.a0AfH6SMBx3J9kLmNoPqRsTuVwXyZ012345") == MASK
    for kept in ("Opening the browser at https://claude.com/cai/oauth/authorize",
                 "  at Object.<anonymous> (/usr/local/lib/node_modules/@anthropic-ai/claude-code/cli.js:12:7)",
                 "Waiting for the authorization_code_callback_handler",  # letters only: a word, not a token
                 "error: the issuer answered 500"):
        assert redactor.line(kept) == kept
    assert redactor.text(f"first line\nsecond {jwt}") == f"first line\nsecond {MASK}"
