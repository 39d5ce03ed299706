"""Numbers as a person reads them in the report: values with their uncertainty, to the digits
that uncertainty justifies.

An uncertainty is shown with two significant digits and its value to the same decimal place
(``0.001099 ± 0.000018``); very small or very large values share one power of ten
(``(1.70 ± 0.12)e-5``). An interval is shown as ``value [lo, hi]`` with the digits its width
justifies. Missing or non-finite numbers print as an en dash.
"""

from __future__ import annotations

import math

DASH = "–"


def finite(x) -> bool:
    """Whether ``x`` is a finite number (None, text that is not a number and NaN are not)."""
    try:
        return x is not None and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def decimals(x, significant: int = 2) -> int:
    """Decimal places that show ``x`` with ``significant`` significant digits (an uncertainty
    with two); 0 for zero or a number that is not finite, at most 12."""
    if not finite(x) or float(x) == 0:
        return 0
    return min(12, max(0, significant - 1 - math.floor(math.log10(abs(float(x))))))


def _exponent(value: float) -> int:
    """Power of ten to factor out, 0 for values that read well as fixed-point."""
    a = abs(value)
    if a == 0 or 1e-3 <= a < 1e5:
        return 0
    return math.floor(math.log10(a))


def fmt_num(x, sig: int = 4, trim: bool = True) -> str:
    """A single number with ``sig`` significant digits; thousands separators for big ones, a
    power of ten for tiny ones (``3.95e-5``). ``trim=False`` keeps significant trailing zeros
    (``0.00100``), so a column of numbers shows the same precision in every row."""
    if not finite(x):
        return DASH
    x = float(x)
    if 1e4 <= abs(x) < 1e15:
        return f"{x:,.0f}"
    if x == 0:
        return "0"
    if _exponent(x):
        mantissa, exponent = f"{x:.{sig - 1}e}".split("e")
        if trim and "." in mantissa:
            mantissa = mantissa.rstrip("0").rstrip(".")
        return f"{mantissa}e{int(exponent)}"
    text = f"{x:.{decimals(x, sig)}f}"
    if trim and "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


def fmt_pm(value, uncertainty, unit: str = "") -> str:
    """``value ± uncertainty`` to the digits the uncertainty justifies."""
    if not finite(value):
        return DASH
    value = float(value)
    if not finite(uncertainty) or float(uncertainty) <= 0:
        return fmt_num(value) + unit
    e = _exponent(value)
    v, u = value / 10**e, float(uncertainty) / 10**e
    d = decimals(u)
    body = f"{v:.{d}f} ± {u:.{d}f}"
    return f"({body})e{e}{unit}" if e else f"{body}{unit}"


def fmt_interval(value, lo, hi) -> str:
    """``value [lo, hi]`` to the digits the interval's width justifies."""
    if not finite(value):
        return DASH
    value = float(value)
    if not (finite(lo) and finite(hi)) or float(hi) <= float(lo):
        return fmt_num(value)
    e = _exponent(value)
    s = 10**e
    d = decimals((float(hi) - float(lo)) / 3.92 / s)
    body = f"{value / s:.{d}f} [{float(lo) / s:.{d}f}, {float(hi) / s:.{d}f}]"
    return f"{body} e{e}" if e else body


def fmt_mib(size_bytes) -> str:
    return f"{float(size_bytes) / 2**20:,.2f}" if finite(size_bytes) else DASH


def fmt_int(x) -> str:
    return f"{int(float(x)):,}" if finite(x) else DASH
