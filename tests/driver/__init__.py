"""The driver model through its ioctls: a file per ioctl family.

``conftest.py`` holds the fixtures, ``helpers.py`` the argument builders
and the driver probes.  ``test_kernel_differences.py`` is where each
deliberate difference from the kernel (README, "Where we differ from the
kernel") is shown."""
