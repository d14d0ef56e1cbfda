"""Programs that run inside the guest. Stdlib-only: the image carries them with bootargs, errors and markers."""
