"""Shared parameter grid for the structured-matrix tests: every family with its knob settings,
on odd, even, prime, square and rectangular shapes (43 x 4 and 4 x 43: a circulant whose prime
size makes its products take the smooth circulant embedding of its window instead)."""

from surm import structured

SHAPES = [(1, 1), (2, 2), (7, 7), (8, 8), (9, 9), (6, 10), (10, 6), (13, 5), (5, 13), (12, 18), (43, 4), (4, 43)]


def knob_settings(name, m, n):
    """The knob dicts worth testing for family ``name`` at shape (m, n)."""
    if name in ("circulant", "skew_circulant", "circulant_product", "skew_circulant_product"):
        settings = [{"block_size": None}]
        for b in (2, 3):
            if m % b == 0 and n % b == 0:
                settings.append({"block_size": b})
        return settings
    # only knobs the shape can use: larger ones are refused (tests/peft/test_hostile_knobs.py)
    if name == "kronecker":
        (a1, a2), (b1, b2) = structured.make(name, m, n, device="meta").factors
        return [{}, {"terms": 2}] if min(a1 * a2, b1 * b2) >= 2 else [{}]
    if name == "ldr":
        return [{"rank": 1}, {"rank": 3}] if max(m, n) >= 3 else [{"rank": 1}]
    if name == "low_rank":
        return [{"rank": 1}, {"rank": 3}] if min(m, n) >= 3 else [{"rank": 1}]
    return [{}]


def all_cases():
    for name in structured.names():
        for m, n in SHAPES:
            for knobs in knob_settings(name, m, n):
                yield name, m, n, knobs


def case_id(case):
    name, m, n, knobs = case
    extra = ",".join(f"{k}={v}" for k, v in knobs.items())
    return f"{name}-{m}x{n}" + (f"-{extra}" if extra else "")


CASES = list(all_cases())
IDS = [case_id(c) for c in CASES]
