"""``vfiosim dpdk-demo``: Debian's unmodified DPDK drives vfiosim's virtio-net NIC (docs/dpdk.md)."""

from .demo import DpdkDemoUnavailable, run_demo

__all__ = ["DpdkDemoUnavailable", "run_demo"]
