"""fusedrk.kernels: the fused Pallas forward and reverse kernels (backend "pallas").

Not implemented yet: ``fusedrk.solve(..., backend="pallas")`` raises and ``backend="auto"``
chooses the pure-JAX reference backend. The kernels will call the step algebra of
``fusedrk._step`` on [TB] lane tiles and add only looping and memory movement.
"""
