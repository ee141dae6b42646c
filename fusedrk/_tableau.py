"""Tsit5 coefficients and dense-output weights: the only place they exist.

Owns: the Butcher tableau of Tsitouras' 5(4) pair (Ch. Tsitouras, "Runge-Kutta pairs of order
5(4) satisfying only the first column simplifying assumption", Comput. Math. Appl. 62 (2011)
770-775) with diffrax's values and sign conventions (``diffrax/_solver/tsit5.py``), and the
coefficients of its continuous extension. Everything is validated at import.

Must not: compute anything with arrays. Step algebra lives in ``_step.py``.
"""

from __future__ import annotations

import math

# Row i of A (stage i + 2 of 7): the weights of k_1 .. k_{i+1} in that stage's input.
# Stage 7 is FSAL: its row equals B_SOL, so its input is the step's result y1.
A_LOWER: tuple[tuple[float, ...], ...] = (
    (0.161,),
    (
        -0.008480655492356988544426874250230774675121177393430391537369234245294192976164141156943,
        0.3354806554923569885444268742502307746751211773934303915373692342452941929761641411569,
    ),
    (
        2.897153057105493432130432594192938764924887287701866490314866693455023795137503079289,
        -6.359448489975074843148159912383825625952700647415626703305928850207288721235210244366,
        4.362295432869581411017727318190886861027813359713760212991062156752264926097707165077,
    ),
    (
        5.325864828439256604428877920840511317836476253097040101202360397727981648835607691791,
        -11.74888356406282787774717033978577296188744178259862899288666928009020615663593781589,
        7.495539342889836208304604784564358155658679161518186721010132816213648793440552049753,
        -0.09249506636175524925650207933207191611349983406029535244034750452930469056411389539635,
    ),
    (
        5.861455442946420028659251486982647890394337666164814434818157239052507339770711679748,
        -12.92096931784710929170611868178335939541780751955743459166312250439928519268343184452,
        8.159367898576158643180400794539253485181918321135053305748355423955009222648673734986,
        -0.07158497328140099722453054252582973869127213147363544882721139659546372402303777878835,
        -0.02826905039406838290900305721271224146717633626879770007617876201276764571291579142206,
    ),
    (
        0.09646076681806522951816731316512876333711995238157997181903319145764851595234062815396,
        0.01,
        0.4798896504144995747752495322905965199130404621990332488332634944254542060153074523509,
        1.379008574103741893192274821856872770756462643091360525934940067397245698027561293331,
        -3.290069515436080679901047585711363850115683290894936158531296799594813811049925401677,
        2.324710524099773982415355918398765796109060233222962411944060046314465391054716027841,
    ),
)

# Nodes of stages 1..7. Stages 6 and 7 sit exactly at the step's end; diffrax evaluates them at
# t1 itself rather than t0 + 1.0 * (t1 - t0), and so do we (see ``_step.stage_times``).
C: tuple[float, ...] = (
    0.0,
    0.161,
    0.327,
    0.9,
    0.9800255409045096857298102862870245954942137979563024768854764293221195950761080302604,
    1.0,
    1.0,
)

# Fifth-order weights (the propagated solution); the seventh stage has weight 0.
B_SOL: tuple[float, ...] = A_LOWER[-1] + (0.0,)

# The embedded fourth-order weights b_hat. Tsitouras (2011) prints them with a sign error in
# the seventh weight (torchode's tsit5.py documents the erratum); b_hat_7 = 1/66 makes
# sum(b_hat) = 1. Values as in diffrax's tsit5.py.
_B_HAT: tuple[float, ...] = (
    0.09468075576583945807478876255758922856117527357724631226139574065785592789071067303271,
    0.009183565540343253096776363936645313759813746240984095238905939532922955247253608687270,
    0.4877705284247615707855642599631228241516691959761363774365216240304071651579571959813,
    1.234297566930478985655109673884237654035539930748192848315425833500484878378061439761,
    -2.707712349983525454881109975059321670689605166938197378763992255714444407154902012702,
    1.866628418170587035753719399566211498666255505244122593996591602841258328965767580089,
    1.0 / 66.0,
)

# Error weights: the local error estimate is h * sum_i B_ERROR_i f_i = y1 - y1_hat. diffrax
# (and so we) use b - b_hat; the sign is irrelevant to the RMS norm but fixed for clarity.
B_ERROR: tuple[float, ...] = tuple(b - bh for b, bh in zip(B_SOL, _B_HAT))

# Order of the error estimate used by the step-size controller (exponent 1 / ERROR_ORDER).
# diffrax's AbstractSolver.error_order for an ODE: the pair has orders p = 5 and q = 4 and the
# estimate's local order is q + 1; Tsit5().error_order(ODETerm(f)) == 5.
ERROR_ORDER = 5

# Continuous extension (dense output) of Tsit5: y(t0 + theta h) = y0 + sum_i w_i(theta) k_i.
# Each weight is  scale * theta**power * prod(theta - r for r in roots)
#                                        * prod(theta**2 + p theta + q for (p, q) in quadratics).
# Coefficients and factorisation as in diffrax's _Tsit5Interpolation (from Tsitouras 2011 via
# OrdinaryDiffEq.jl); validated below against B_SOL at theta = 1.
DENSE_WEIGHTS: tuple[tuple[float, int, tuple[float, ...], tuple[tuple[float, float], ...]], ...] = (
    (-1.0530884977290216, 1, (1.3299890189751412,), ((-1.4364028541716351, 0.7139816917074209),)),
    (0.1017, 2, (), ((-2.1966568338249754, 1.2949852507374631),)),
    (2.490627285651252793, 2, (), ((-2.38535645472061657, 1.57803468208092486),)),
    (-16.54810288924490272, 2, (1.21712927295533244, 0.61620406037800089), ()),
    (47.37952196281928122, 2, (1.203071208372362603, 0.658047292653547382), ()),
    (-34.87065786149660974, 2, (1.2, 0.666666666666666667), ()),
    (2.5, 2, (1.0, 0.6), ()),
)

NUM_STAGES = 7


def _dense_weight(i: int, theta: float) -> float:
    scale, power, roots, quadratics = DENSE_WEIGHTS[i]
    out = scale * theta**power
    for r in roots:
        out *= theta - r
    for p, q in quadratics:
        out *= theta * theta + p * theta + q
    return out


def _validate() -> None:
    assert len(A_LOWER) == NUM_STAGES - 1 and len(C) == NUM_STAGES
    for i, row in enumerate(A_LOWER):
        assert len(row) == i + 1
        assert math.isclose(math.fsum(row), C[i + 1], rel_tol=0, abs_tol=1e-14), (i, row)
    assert math.isclose(math.fsum(B_SOL), 1.0, abs_tol=1e-14)
    assert math.isclose(math.fsum(_B_HAT), 1.0, abs_tol=1e-14)
    assert abs(math.fsum(B_ERROR)) < 1e-14
    # FSAL: the last stage's input is the propagated solution.
    assert A_LOWER[-1] == B_SOL[:-1] and C[-1] == 1.0
    for i in range(NUM_STAGES):
        assert _dense_weight(i, 0.0) == 0.0
        assert math.isclose(_dense_weight(i, 1.0), B_SOL[i], rel_tol=0, abs_tol=1e-12), i


_validate()
