"""Browser profiles that outlive a VM (`profile: persistent`): a user's Chromium profile, kept by the
controller only as ciphertext made in the guest.

    store.py   each user's key (sealed with the vault's key) and the sealed profile's file, bounded
    guest.py   the controller's client of the guest's profile keeper (guest/profile_keeper.py, port 7002)
    keeper.py  load at a VM's start (cold, restored, or claimed from the pool), save before its end

One live VM per tenant, user and persistent profile is held by SQLite (store.py's vms_one_per_profile).
"""
