"""What runs inside the guest, and the pieces the host shares with it (bootargs, markers, the errors' roots).

Stdlib-only, importing nothing of browservm outside this package: the image carries this package
whole (images/rootfs.py guest_modules), and tests/unit/test_guest_boundary.py checks both.
"""
