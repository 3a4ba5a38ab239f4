"""w2s-ray: weak-to-strong generalization experiments on Ray.

Importing the package imports no Ray and touches no CUDA device. `w2s_ray.run` describes the
layout (the run context, the typed stage results, and the import rules); `w2s_ray.pipeline`
composes the stages.
"""

__version__ = "0.1.0"
