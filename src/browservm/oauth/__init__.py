"""Logins (issue 9): a CLI tool's OAuth login run in a throwaway VM, its credentials kept for the user.

    catalog.py       providers as data: the shipped providers.toml, extended by the operator's file
    states.py        a login's states and the one guarded way between them
    records.py       login records in the store (who, which provider, when, outcome; never a secret)
    vault.py         the credentials at rest: AES-GCM, bound to user + provider
    agent.py         the client of the guest's OAuth agent (DESIGN.md, "The OAuth agent's contract")
    service.py       LoginService: boot or reuse a VM, run the login through the agent, keep the result
    errors.py        what this package raises, under browservm.errors.BrowserVMError
"""
