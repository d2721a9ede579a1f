"""Analysis tools built on :mod:`surm.structured` (never imported by it).

- :mod:`surm.analysis.approximation`: the approximation study, ``surm approx``.
- :mod:`surm.analysis.plan`: the planner, ``surm.plan`` and ``surm plan``: a structure and knob
  per layer for a parameter budget, from the loss gradient.

Submodules are imported on use (``from surm.analysis import approximation``), so that
importing this package stays cheap.
"""
