"""Kubernetes resource quantities (``512Mi``, ``2G``, ``1.5Gi``) as whole bytes."""

import re
from decimal import Decimal, InvalidOperation

_SUFFIXES: dict[str, Decimal] = {
    "m": Decimal("0.001"),
    "": Decimal(1),
    "k": Decimal(10**3),
    "M": Decimal(10**6),
    "G": Decimal(10**9),
    "T": Decimal(10**12),
    "P": Decimal(10**15),
    "E": Decimal(10**18),
    "Ki": Decimal(2**10),
    "Mi": Decimal(2**20),
    "Gi": Decimal(2**30),
    "Ti": Decimal(2**40),
    "Pi": Decimal(2**50),
    "Ei": Decimal(2**60),
}
# A number, then a binary or decimal suffix, or a decimal exponent (1e3, 5E-2), as Kubernetes'
# resource.Quantity accepts them: whatever the CRD's isQuantity() lets through must parse here.
_QUANTITY = re.compile(r"^\+?([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:([eE][+-]?[0-9]+)|([a-zA-Z]{0,2}))$")


class QuantityError(ValueError):
    """A string that is not a Kubernetes quantity."""


# Kubernetes keeps quantities in 64 bits; so do we, and a number past that (1e999999999, which
# a schema's isQuantity() may admit) is refused before any arithmetic grows with it.
LARGEST = 2**63 - 1
MAX_EXPONENT = 30


def parse_quantity(text: str) -> int:
    """Return the number of bytes (rounded up) that a quantity such as ``512Mi`` names."""
    match = _QUANTITY.match(text.strip())
    suffix = match.group(3) if match else None
    if not match or (suffix is not None and suffix not in _SUFFIXES):
        raise QuantityError(f"{text!r} is not a quantity such as 512Mi or 2Gi")
    exponent = match.group(2)
    if exponent is not None and (len(exponent) > 4 or abs(int(exponent[1:])) > MAX_EXPONENT):
        raise QuantityError(f"{text!r} is too large a quantity")
    if len(match.group(1)) > 40:
        raise QuantityError(f"{text!r} is too large a quantity")
    try:
        number = Decimal(match.group(1))
        scale = Decimal(10) ** int(exponent[1:]) if exponent else _SUFFIXES[suffix or ""]
    except InvalidOperation as exc:
        raise QuantityError(f"{text!r} is not a quantity such as 512Mi or 2Gi") from exc
    value = number * scale
    if value > LARGEST:
        raise QuantityError(f"{text!r} is too large a quantity")
    whole = int(value)
    return whole if whole == value else whole + 1


def format_mebibytes(size: int) -> str:
    """Format a byte count as the Mi quantity the agent publishes (rounded down)."""
    return f"{size // 2**20}Mi"
