"""Test-session settings: one torch thread per pytest-xdist worker.

`make test` runs two workers on a 2-core machine; letting each also spawn a thread
per core oversubscribes the CPU and makes small-tensor work many times slower.
"""

import torch

torch.set_num_threads(1)
