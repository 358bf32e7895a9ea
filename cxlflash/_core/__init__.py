"""The Cython core: GIL-free kernels of the translation engine.

``allocator``  ChunkAllocator, the kernel's chunk allocator
``tables``     ResourceTable, one context's RHT and LXTs, translation, clone
``lxtmem``     memory for LXTs (large ones kept for reuse, huge pages)
``datapath``   block I/O through a table to a backing file descriptor
``rawio``      raw_io, the bare backing store's pread/pwrite loop (benchmark baseline)
``pattern``    verifiable data patterns (``cxlflash bench`` verification, tests)
"""
