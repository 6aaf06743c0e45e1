"""Approximate prices of hosted models, so that a run can report what it spent.

Prices are list prices in USD per one million tokens (input, output), as published by OpenAI
in 2025. They change; a model missing here simply gets ``cost_usd=None`` rather than a wrong
number. Dated snapshots (``gpt-4o-mini-2024-07-18``) are priced as their family by prefix.
"""

from __future__ import annotations

from typing import NamedTuple


class Price(NamedTuple):
    input_per_mtok: float
    output_per_mtok: float


PRICES_USD_PER_MTOK: dict[str, Price] = {
    "gpt-4o": Price(2.50, 10.00),
    "gpt-4o-mini": Price(0.15, 0.60),
    "gpt-4.1": Price(2.00, 8.00),
    "gpt-4.1-mini": Price(0.40, 1.60),
    "gpt-4.1-nano": Price(0.10, 0.40),
    "gpt-5": Price(1.25, 10.00),
    "gpt-5-mini": Price(0.25, 2.00),
    "gpt-5-nano": Price(0.05, 0.40),
    "o3": Price(2.00, 8.00),
    "o3-mini": Price(1.10, 4.40),
    "o4-mini": Price(1.10, 4.40),
}


def price_for(model: str) -> Price | None:
    """The price of ``model``, matched by the longest known prefix (so ``gpt-4o-mini-...`` is
    not priced as ``gpt-4o``); ``None`` when unknown."""
    name = model.lower().removeprefix("openai/")
    matches = [known for known in PRICES_USD_PER_MTOK if name.startswith(known)]
    if not matches:
        return None
    return PRICES_USD_PER_MTOK[max(matches, key=len)]


def cost_usd(model: str, prompt_tokens: int, completion_tokens: int) -> float | None:
    """What one call cost at list price, or ``None`` when the model's price is unknown."""
    price = price_for(model)
    if price is None:
        return None
    return (prompt_tokens * price.input_per_mtok + completion_tokens * price.output_per_mtok) / 1e6
