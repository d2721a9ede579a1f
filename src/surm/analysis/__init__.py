"""Analysis tools built on :mod:`surm.structured` (never imported by it).

- :mod:`surm.analysis.approximation`: the approximation study, ``surm approx``.

Submodules are imported on use (``from surm.analysis import approximation``), so that
importing this package stays cheap.
"""
