"""The Cython core: GIL-free kernels of the translation engine.

``allocator``  ChunkAllocator, the kernel's chunk allocator
``tables``     ResourceTable, one context's RHT and LXTs, translation, clone
``datapath``   block I/O through a table to a backing file descriptor
``pattern``    verifiable data patterns (benchmarks, tests)
"""
