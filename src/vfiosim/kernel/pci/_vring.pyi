"""virtio-net's native burst path (_vring.c)."""

PAGE_SHIFT: int
MAX_BURST: int

def loopback_burst(tx: tuple[int, int, int, int, int, int, bool], rx: tuple[int, int, int, int, int, int, bool],
                   keys: object, rd: object, wr: object, limit: int,
                   rx_header: bytes) -> tuple[int, bytearray | None, list[int] | None] | list[tuple[int, bool]] | int: ...
