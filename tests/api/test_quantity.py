import pytest

from formation_vmm.api.quantity import QuantityError, format_mebibytes, parse_quantity

pytestmark = pytest.mark.pure


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512Mi", 512 * 2**20),
        ("1Gi", 2**30),
        ("2G", 2 * 10**9),
        ("1.5Gi", 3 * 2**29),
        ("100", 100),
        ("0.5k", 500),
        ("1e3", 1000),
        ("5E6", 5 * 10**6),
        ("1500m", 2),  # 1.5 bytes, rounded up
        (".5Ki", 512),
    ],
)
def test_parses_kubernetes_quantities(text: str, expected: int) -> None:
    assert parse_quantity(text) == expected


@pytest.mark.parametrize("text", ["lots", "", "12XB", "-1Gi", "1.2.3Mi", "1e", "Mi"])
def test_rejects_what_is_not_a_quantity(text: str) -> None:
    with pytest.raises(QuantityError, match="not a quantity"):
        parse_quantity(text)


def test_rounds_fractions_of_a_byte_up() -> None:
    assert parse_quantity("0.1") == 1


def test_formats_mebibytes_rounding_down() -> None:
    assert format_mebibytes(3 * 2**20 + 5) == "3Mi"


@pytest.mark.parametrize("text", ["1e999999999", "9e30", "1e19", "99999999999Ei", "1" * 50])
def test_refuses_quantities_too_large_for_64_bits_without_computing_them(text: str) -> None:
    with pytest.raises(QuantityError, match="too large"):
        parse_quantity(text)


def test_the_largest_quantities_that_fit() -> None:
    assert parse_quantity("7Ei") == 7 * 2**60
    assert parse_quantity("9e18") == 9 * 10**18
