"""The data plane: listeners serving traffic from the current IR, swapped atomically on reload."""
