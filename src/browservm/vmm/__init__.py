"""VMM drivers: one small interface, a Firecracker and a QEMU microvm implementation."""
