"""The scheduler: the loop that interleaves generation and training (``hpt train``)."""
