"""Test-session settings: one torch thread per pytest-xdist worker (the suite runs ``-n 2`` on 2 cores)."""

import torch

torch.set_num_threads(1)
