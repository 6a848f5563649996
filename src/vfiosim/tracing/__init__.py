"""Traces of VFIO sessions: the format of record, and the tools on it.

* :mod:`.format`: the format (a header, then one JSON line per call), its reader
  and writer; docs/trace-format.md is the schema.
* :mod:`.ioctls`: each VFIO ioctl's argument, decoded from and encoded to bytes.
* :mod:`.convert`: the real-kernel reference traces in the format of record.
* :mod:`.replay`: re-issue a trace's calls on a simulated machine, step by step.
* :mod:`.compare`: one step against another, and what a difference means.
* :mod:`.diff`: two traces, step by step.
* :mod:`.record`: ``vfiosim record``, the pass-through recording shim on a real /dev/vfio.
"""

from .format import FORMAT, VERSION, Trace, TraceError, TraceWriter, open_trace

__all__ = ["FORMAT", "VERSION", "Trace", "TraceError", "TraceWriter", "open_trace"]
