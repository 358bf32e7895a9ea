"""The core rows of ``cxlflash bench``'s matrix: the workloads of
:mod:`.cases` timed by this front end (the other is ``benchmarks/``)."""
from .cases import CLONE_CHUNKS, Alloc, Clone, Translate
from .harness import interleaved_loop, timed_loop
from .results import Row

TRANSLATE_LBAS = 1 << 20        # vLBAs per translate call
ALLOC_TOTAL = 1 << 22           # a LUN of 4 M chunks
ALLOC_PER = 1 << 16             # chunks allocated per call


def row_translate(duration, progress):
    """translate_many of 1 M vLBAs, then (the other half of the time) the
    numpy formula on the same vLBAs."""
    case = Translate(TRANSLATE_LBAS)
    case.check()
    half = duration / 2
    main = timed_loop(case.core, half, progress, "translate 1M LBAs", TRANSLATE_LBAS, "LBA")
    base = timed_loop(case.numpy, half, progress, "translate (numpy)", TRANSLATE_LBAS, "LBA")
    main.nbytes, base.nbytes = main.ops * 16, base.ops * 16
    return Row("translate", "LBA", main, base, "numpy formula", lat_per="call (1M LBAs)")


def row_alloc(duration, progress):
    """alloc_many of 64 k chunks and their free, then the kernel's loop in
    pure Python allocating as many.  The core's free is timed with its
    allocation (its undo, run inside the timing here): a conservative
    ratio."""
    case = Alloc(ALLOC_TOTAL, ALLOC_PER)
    case.check()

    def cycle():
        case.core()()

    main = timed_loop(cycle, duration * 0.6, progress, "alloc_many 64k chunks", ALLOC_PER,
                      "chunk")
    base = timed_loop(case.python, duration * 0.4, progress, "alloc (pure Python)", ALLOC_PER,
                      "chunk")
    return Row("chunk alloc+free", "chunk", main, base, "Python kernel loop",
               lat_per="call (64k chunks)")


def row_clone(duration, progress):
    """The VLUN_CLONE ioctl of a vLUN of 1 M mapped chunks (undone between
    calls, untimed, by RELEASE of the clone), interleaved with np.copyto
    of the LXT."""
    case = Clone(CLONE_CHUNKS)
    try:
        case.check()
        main, base = interleaved_loop([case.clone, case.copyto], duration, progress,
                                      "VLUN_CLONE 1M chunks", CLONE_CHUNKS, "chunk")
        case.check_released()
    finally:
        case.close()
    main.nbytes, base.nbytes = main.ops * 8, base.ops * 8
    return Row("VLUN_CLONE 1M chunks", "chunk", main, base, "np.copyto of the LXT",
               lat_per="ioctl (1M chunks)")
