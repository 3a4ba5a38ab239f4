"""w2s-ray: weak-to-strong generalization experiments on Ray.

Importing the package imports no Ray and touches no CUDA device; see `w2s_ray.pipeline`.
"""

__version__ = "0.1.0"
