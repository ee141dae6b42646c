"""fusedrk: fast, exact gradients through large batches of small ODEs (Tsit5, stored tape).

Public names only; the implementation lives in private modules (see ../shared/DESIGN.md).
"""

from ._solve import RESULTS, Solution, solve

__all__ = ["RESULTS", "Solution", "solve"]
__version__ = "0.1.0"
