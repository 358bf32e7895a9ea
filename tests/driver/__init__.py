"""The driver model through its ioctls: a file per ioctl family.

``test_common.py`` (the checks of every DK ioctl, spec §22.1),
``test_attach.py`` (ATTACH, DETACH, the adapter fd), ``test_direct.py``,
``test_virtual.py`` (USER_VIRTUAL, RELEASE, the data path),
``test_resize.py``, ``test_clone.py``, ``test_verify.py``,
``test_recovery.py`` (reset, RECOVER_AFU), ``test_manage_lun.py``,
``test_host.py`` (the host ioctls, §22.3), ``test_concurrency.py``, and
``test_kernel_differences.py``: each deliberate difference from the kernel
that issue 12 settled (README, "Where we differ from the kernel").

Conventions:

- Spec references are to /work/shared/spec/kernel-semantics.md; "decision
  N" is the decision table of DESIGN.md (which wins where the two
  disagree).
- A failure test is named after its row of the failure table (§22):
  ``test_common_*`` for §22.1, ``test_<ioctl>_*`` for §22.2, ``test_ht_*`` /
  ``test_lun_provision_*`` / ``test_afu_debug_*`` for §22.3.  Where the spec
  orders two checks, a ``*_before_*`` test makes both conditions true and
  asserts which errno wins.
- A failed ioctl leaves its argument byte-for-byte untouched: ``fails()``
  checks it every time.
- Fixtures (``conftest.py``): ``adapter`` for a test that uses only the
  public interface, ``embedded`` for one that reaches into the driver
  (``adapter.driver``, ``disk.sdev``, posing as another process with a
  ``Caller``).  Builders and driver probes: ``helpers.py``.
"""
