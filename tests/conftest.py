"""Test-wide settings."""

import torch

# One intra-op thread, as in the subprocess runs (OMP_NUM_THREADS=1): in-process and subprocess
# runs then do the same float arithmetic, so their weights can be compared bit for bit.
torch.set_num_threads(1)
