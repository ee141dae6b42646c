"""fusedrk.kernels: the fused Pallas forward and reverse kernels (backend "pallas").

``forward`` runs the whole time loop of each lane tile in one program and writes the tape;
``backward`` walks it back once. Both call ``fusedrk._step`` on [TB] lane tiles: the kernels
add only looping and memory movement. ``_triton.py`` holds everything specific to the Triton
lowering.
"""

from ._problem import TileProblem, unsupported_reason
from .forward import forward
from .reverse import backward

__all__ = ["TileProblem", "backward", "forward", "unsupported_reason"]
