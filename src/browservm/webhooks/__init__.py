"""Webhooks (issue 21): a tenant's URLs told of its VMs' and logins' ends, signed, retried, bounded.

    events.py     the event types, an event's JSON body, what a webhook's URL may be
    records.py    webhooks and deliveries in the state database, with their bounds
    deliverer.py  the controller's task that sends them
    signing.py    the signature, and `verify` for receivers

A receiver needs only `verify` (standard library only; importing this package loads nothing else):

    from browservm.webhooks import BadSignature, verify
    verify(secret, request.headers["X-Browservm-Signature"], body)   # BadSignature if not ours or too old
"""

from browservm.webhooks.signing import BadSignature as BadSignature
from browservm.webhooks.signing import sign as sign
from browservm.webhooks.signing import verify as verify
