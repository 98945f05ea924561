"""Money arithmetic. Amounts are integers in wei; `Decimal` appears only at the HTTP edge, and
amounts cross the edge as strings.
"""

from __future__ import annotations

import functools
from decimal import ROUND_DOWN, Decimal, InvalidOperation, localcontext

WEI_PER_ETH = 10**18
# Enough precision for uint256 wei amounts expressed in ETH with 18 decimals.
_DECIMAL_PRECISION = 100


class AmountError(ValueError):
    pass


def to_decimal(value: Decimal | str | int) -> Decimal:
    try:
        amount = value if isinstance(value, Decimal) else Decimal(str(value))
    except InvalidOperation:
        raise AmountError(f"not a decimal amount: {value!r}") from None
    if not amount.is_finite():
        raise AmountError(f"amount must be finite: {value!r}")
    return amount


def eth_to_wei(value: Decimal | str | int) -> int:
    """ETH to wei, truncating toward zero below 1 wei (as the original's int(amount * 1e18))."""
    with localcontext() as context:
        context.prec = _DECIMAL_PRECISION
        scaled = to_decimal(value) * WEI_PER_ETH
        return int(scaled.to_integral_value(rounding=ROUND_DOWN))


def wei_to_eth(wei: int) -> str:
    """Wei to a plain decimal ETH string: no exponent, no trailing zeros ("0" for zero)."""
    with localcontext() as context:
        context.prec = _DECIMAL_PRECISION
        text = format((Decimal(wei) / WEI_PER_ETH).normalize(), "f")
    return text


def rate_credit_wei(duration_ms: int, eth_per_minute: Decimal | str) -> int:
    """duration_ms × rate / 60000, computed exactly and truncated to whole wei."""
    numerator, denominator = _wei_per_minute_ratio(str(eth_per_minute))
    total = duration_ms * numerator
    per = denominator * 60_000
    whole = abs(total) // per
    return whole if total >= 0 else -whole


@functools.lru_cache(maxsize=256)
def _wei_per_minute_ratio(eth_per_minute: str) -> tuple[int, int]:
    """The rate in wei per minute as an exact fraction. Every event of a run carries the same
    few rate strings, so the Decimal parsing is done once per rate, not once per credit."""
    numerator, denominator = to_decimal(eth_per_minute).as_integer_ratio()
    return numerator * WEI_PER_ETH, denominator
