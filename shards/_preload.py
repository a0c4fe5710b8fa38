"""Imported once by the multiprocessing forkserver (a clean, single-threaded process): loads the
worker module, sets OpenCV to one thread per process and compiles (or loads from numba's
cache) the numba loops, so that every worker forked from it starts warm in milliseconds."""

from cxrfast.shards.worker import warmup

warmup()
