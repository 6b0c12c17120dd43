import os

import torch

# Two cores are shared by the suite and the gloo ranks some tests start.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
