"""fusedrk: fast, exact gradients through large batches of small ODEs (Tsit5, stored tape).

Public names only; the implementation lives in private modules (see docs/design.md).
"""

from ._solve import RESULTS, Solution, solve

__all__ = ["AllSaveAdjoint", "RESULTS", "Solution", "solve"]


def __getattr__(name):
    # AllSaveAdjoint plugs into diffrax, which fusedrk does not otherwise need at run time.
    if name == "AllSaveAdjoint":
        from ._allsave import AllSaveAdjoint

        return AllSaveAdjoint
    raise AttributeError(f"module 'fusedrk' has no attribute {name!r}")
__version__ = "0.1.0"
