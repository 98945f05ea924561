"""Money arithmetic. Amounts are integers in wei; `Decimal` appears only at the HTTP edge, and
amounts cross the edge as strings.
"""

from __future__ import annotations

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
    with localcontext() as context:
        context.prec = _DECIMAL_PRECISION
        amount = Decimal(duration_ms) * to_decimal(eth_per_minute) / Decimal(60_000)
        return eth_to_wei(amount)
