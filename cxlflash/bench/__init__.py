"""Benchmark runs: the workloads behind ``cxlflash bench``.

Every figure is measured honestly: a warm-up that is not recorded, the
workload and its raw baseline interleaved batch by batch on the same data
and the same physical offsets, per-request latencies taken inside the
GIL-free core (so both sides pay the same clock reads), errors counted and
reported, and the data of every write workload verified at the end: each
written block holds a pattern derived from its LBA and the sequence number
of its last write, re-read and checked block by block.

One concern per module:

  options    Options, BenchError, MAX_THREADS
  results    Histogram, Side, Row, RunLog: what a run measures
  progress   the live status line
  harness    timing loops (the rotation shared with benchmarks/), worker threads
  cases      the core workloads and their baselines, defined once for both
             front ends: ``cxlflash bench`` and ``benchmarks/``
  rows       the matrix's core rows (translate, alloc, VLUN_CLONE)
  iorun      the I/O run engine (IoRun)
  target     the adapter, LUN and context a run measures
  workloads  matrix, io, arkdb, resize-storm; run()
  clients    --clients N: N client processes of one daemon, their rows and total
  fio        fio's figure next to an io row
  report     the table, the JSON document
  plot       --plot
  machine    what the run ran on
  units      how figures are written

The pure-Python references the core is measured against (the kernel's
allocator, the translation formula) are ``cxlflash.reference``.
"""
from .cases import CLONE_CHUNKS
from .fio import fio_command, format_fio, run_fio
from .iorun import IoRun, region_blocks
from .machine import machine_info
from .options import MAX_CLIENTS, MAX_THREADS, BenchError, Options
from .plot import plot
from .progress import Progress
from .report import COLUMNS, UNITS, format_phases, format_table, to_json
from .results import Histogram, Row, RunLog, Side
from .rows import row_alloc, row_clone, row_translate
from .target import Target, overwritten, probe, writes_target
from .workloads import (WORKLOADS, io_row, run, run_arkdb, run_io, run_matrix,
                        run_resize_storm)

__all__ = ["CLONE_CHUNKS", "fio_command", "format_fio", "run_fio", "IoRun", "region_blocks",
           "machine_info", "MAX_CLIENTS", "MAX_THREADS", "BenchError", "Options", "plot",
           "Progress",
           "COLUMNS", "UNITS", "format_phases", "format_table", "to_json", "Histogram",
           "Row", "RunLog", "Side", "row_alloc", "row_clone", "row_translate", "Target",
           "overwritten", "probe", "writes_target", "WORKLOADS", "io_row", "run",
           "run_arkdb", "run_io", "run_matrix", "run_resize_storm"]
