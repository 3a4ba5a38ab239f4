"""What every process of a run does before its first task: the part of the pinned numerics
(`w2s_ray.numerics`) that is a torch setting, not an environment variable. Ray runs
`setup_process` in each worker as the job's worker setup hook; the driver calls it when a run
context opens."""

from __future__ import annotations

import torch


def setup_process() -> None:
    """oneDNN off: convolutions as im2col + MKL GEMM, which `MKL_CBWR` pins, instead of kernels
    oneDNN picks per CPU (measured in `w2s_ray.numerics`)."""
    torch.backends.mkldnn.enabled = False
