"""The AFU as the driver sees it: adapter state machine, internal commands
(sync, LUN provision, debug), fault injection, and the adapter-wide locks.

States (spec §1.1, §16): NORMAL; RESET while the AFU is being reset (ioctls
wait); FAILTERM when it failed for good (most ioctls get ENODEV).
"""
import errno
import threading

from ..errors import CxlFlashError

NORMAL = "NORMAL"
RESET = "RESET"
FAILTERM = "FAILTERM"

# Sync modes (spec §2.8).
AFU_LW_SYNC = 0
AFU_HW_SYNC = 1
AFU_GSYNC = 2

#: Fault injection points and the errno each fails with by default.
FAULT_POINTS = {
    "sync": errno.EAGAIN,            # AFU sync (any of ENOMEM ENOBUFS EIO EAGAIN ETIMEDOUT)
    "afu_cmd": errno.EIO,            # LUN provision / debug AFU commands
    "read_capacity": errno.EIO,      # READ CAPACITY(16)
    "alloc": errno.ENOMEM,           # driver memory allocations
    "sdev_get": errno.ENXIO,         # scsi_device_get
    "backend_context": errno.ENODEV, # new CXL user context
    "start_work": errno.EINVAL,      # backend start-work (errno passed through)
    "pe_range": errno.EPERM,         # backend returns a PE >= 512
    "adapter_file": errno.ENODEV,    # adapter fd creation
    "capability": errno.EAGAIN,      # capability register readback mismatch
    "mailbox": errno.EIO,            # master mailbox reads all-ones
}


class FaultInjector:
    """Makes the next ``count`` operations at a point fail."""

    def __init__(self):
        self._lock = threading.Lock()
        self._pending = {}

    def inject(self, point, count=1, err=None):
        if point not in FAULT_POINTS:
            raise ValueError(f"unknown fault point {point!r}; known points: "
                             f"{', '.join(sorted(FAULT_POINTS))}")
        if count < 0:
            raise ValueError("count must be >= 0")
        with self._lock:
            if count == 0:
                self._pending.pop(point, None)
            else:
                self._pending[point] = [count, err or FAULT_POINTS[point]]

    def take(self, point):
        """The errno to fail with at this point now, or 0."""
        if not self._pending:
            return 0
        with self._lock:
            entry = self._pending.get(point)
            if entry is None:
                return 0
            entry[0] -= 1
            if entry[0] <= 0:
                del self._pending[point]
            return entry[1]

    def check(self, point, what):
        """Raise CxlFlashError if a fault is pending at this point."""
        err = self.take(point)
        if err:
            raise CxlFlashError(err, f"{what} failed (injected fault {point!r})")

    def pending(self):
        with self._lock:
            return {k: v[0] for k, v in self._pending.items()}


class RWSemaphore:
    """The adapter's ``ioctl_rwsem``: ioctls hold it shared, a reset takes it
    exclusively to drain them."""

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    def acquire_shared(self):
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1

    def release_shared(self):
        with self._cond:
            self._readers -= 1
            if self._readers == 0:
                self._cond.notify_all()

    def acquire_exclusive(self):
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True

    def release_exclusive(self):
        with self._cond:
            self._writer = False
            self._cond.notify_all()


class Afu:
    """State, internal commands and statistics of one AFU."""

    def __init__(self, *, num_ports=2, sq_mode=False, lun_provision=True,
                 debug=True):
        self.num_ports = num_ports
        self.sq_mode = sq_mode
        self.has_lun_provision = lun_provision
        self.has_debug = debug
        self.state = NORMAL
        self.state_cond = threading.Condition()
        self.rwsem = RWSemaphore()
        self.sync_mutex = threading.Lock()
        self.faults = FaultInjector()
        self._signals = 0          # generation of simulated signals
        self.counters = {"lw_syncs": 0, "hw_syncs": 0, "global_syncs": 0,
                         "failed_syncs": 0, "resets": 0, "afu_cmds": 0}

    # -- state ------------------------------------------------------------

    def set_state(self, state):
        with self.state_cond:
            self.state = state
            self.state_cond.notify_all()

    def signal_waiters(self):
        """Deliver a simulated signal to every thread waiting on the adapter
        (a RESET to end, or the recovery mutex): their wait is interrupted."""
        with self.state_cond:
            self._signals += 1
            self.state_cond.notify_all()

    def wait_while_reset(self):
        """Wait until the state is not RESET (the caller has dropped the
        rwsem).  Returns False when the wait was interrupted by a signal."""
        with self.state_cond:
            gen = self._signals
            while self.state == RESET:
                self.state_cond.wait()
                if self._signals != gen:
                    return False
        return True

    def check_state(self):
        """The dispatch fence (spec §3 step 4): waits out RESET with the
        rwsem dropped.  Returns 0, errno.EINTR (interrupted; user space sees
        ERESTARTSYS as EINTR) or errno.ENODEV (FAILTERM)."""
        while True:
            state = self.state
            if state == RESET:
                self.rwsem.release_shared()
                ok = self.wait_while_reset()
                self.rwsem.acquire_shared()
                if not ok:
                    return errno.EINTR
                continue
            if state == FAILTERM:
                return errno.ENODEV
            return 0

    def interruptible_acquire(self, lock):
        """Acquire ``lock``; False if a simulated signal came first."""
        gen = self._signals
        while not lock.acquire(timeout=0.01):
            if self._signals != gen:
                return False
        return True

    # -- internal commands (spec §20) -----------------------------------------

    def send_cmd(self, point, what):
        """One internal AFU command: 0, or the errno it failed with.

        When the adapter is not NORMAL the command is not sent and reports
        success, as the kernel's does.
        """
        if self.state != NORMAL:
            return 0
        with self.sync_mutex:
            self.counters["afu_cmds"] += 1
            return self.faults.take(point)

    def sync(self, pe, handle, mode):
        """AFU sync for (PE, handle): 0 or the errno."""
        if self.state != NORMAL:
            return 0
        with self.sync_mutex:
            key = ("lw_syncs", "hw_syncs", "global_syncs")[mode]
            self.counters[key] += 1
            err = self.faults.take("sync")
            if err:
                self.counters["failed_syncs"] += 1
            return err
