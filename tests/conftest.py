"""Test-suite wide settings: tiny models run fastest on one thread, and one thread per test keeps the suite
predictable on small CI machines (2 cores) where oversubscription makes timings erratic."""

import torch

torch.set_num_threads(1)
