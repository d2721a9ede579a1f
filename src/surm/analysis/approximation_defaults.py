"""The default grid of the approximation study, in a module that imports nothing.

:mod:`surm.analysis.approximation` runs with these defaults and ``surm approx --help`` shows
them, without importing torch.
"""

DEFAULT_SIZE = 64
DEFAULT_TARGETS = ("psd", "gaussian", "lowrank_noise", "near_toeplitz")
DEFAULT_FAMILIES = ("low_rank", "kronecker", "circulant", "skew_circulant", "symmetric_toeplitz", "toeplitz", "ldr")
DEFAULT_BUDGETS = (1.0, 2.0, 4.0, 8.0, 16.0)  # multiples of N = max(m, n)
DEFAULT_TRIALS = 10
DEFAULT_LDR_STEPS = 200
DEFAULT_NOISE = 0.1
