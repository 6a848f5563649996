"""Transports: the edges where real programs and the simulated kernel meet."""
