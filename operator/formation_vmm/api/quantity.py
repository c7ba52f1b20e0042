"""Kubernetes resource quantities (``512Mi``, ``2G``, ``1.5Gi``) as whole bytes."""

import re
from decimal import Decimal, InvalidOperation

_SUFFIXES: dict[str, int] = {
    "": 1,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
}
_QUANTITY = re.compile(r"^([+]?[0-9.]+)([a-zA-Z]{0,2})$")


class QuantityError(ValueError):
    """A string that is not a Kubernetes quantity."""


def parse_quantity(text: str) -> int:
    """Return the number of bytes (rounded up) that a quantity such as ``512Mi`` names."""
    match = _QUANTITY.match(text.strip())
    if not match or match.group(2) not in _SUFFIXES:
        raise QuantityError(f"{text!r} is not a quantity such as 512Mi or 2Gi")
    try:
        number = Decimal(match.group(1))
    except InvalidOperation as exc:
        raise QuantityError(f"{text!r} is not a quantity such as 512Mi or 2Gi") from exc
    value = number * _SUFFIXES[match.group(2)]
    whole = int(value)
    return whole if whole == value else whole + 1


def format_mebibytes(size: int) -> str:
    """Format a byte count as the Mi quantity the agent publishes (rounded down)."""
    return f"{size // 2**20}Mi"
