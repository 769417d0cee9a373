"""Triton kernels of fuseformer, one op family per module (shipped as ``fuseformer.kernels``).

Each module holds private ``@triton.jit`` kernels and the launchers that allocate outputs,
pick tile sizes and call them. Launchers take and return plain tensors; registration as
custom ops, autograd and validation live in ``fuseformer.ops``.
"""
