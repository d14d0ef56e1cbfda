"""nftables JSON objects in words close to nft's own syntax, for evidence and for naming what
differs between two listings (expected.py)."""

from __future__ import annotations

from typing import Any

NftObject = dict[str, Any]


def describe(value: Any) -> str:
    """An nft JSON expression in words."""
    if isinstance(value, dict):
        if "payload" in value:
            payload = value["payload"]
            return f"{payload.get('protocol', '')} {payload.get('field', '')}".strip()
        if "meta" in value:
            return str(value["meta"].get("key"))
        if "prefix" in value:
            return f"{value['prefix']['addr']}/{value['prefix']['len']}"
        if "set" in value:
            return "{ " + ", ".join(describe(v) for v in value["set"]) + " }"
        if "range" in value:
            low, high = value["range"]
            return f"{describe(low)}-{describe(high)}"
        if "concat" in value:
            return " . ".join(describe(v) for v in value["concat"])
        if "match" in value:
            match = value["match"]
            op = "" if match.get("op") in ("==", "in") else f"{match.get('op')} "
            return f"{describe(match.get('left'))} {op}{describe(match.get('right'))}"
        key = next(iter(value), "")
        return key if value[key] is None else f"{key} {describe(value[key])}" if key in ("jump", "goto") else key
    if isinstance(value, list):
        return " ".join(describe(v) for v in value)
    return str(value)


def describe_expr(rule: NftObject) -> str:
    words = [describe(expr) for expr in rule.get("expr", []) if "counter" not in expr]
    return " ".join(word for word in words if word)


def describe_rule(rule: NftObject) -> str:
    return f"table {rule.get('family')} {rule.get('table')} chain {rule.get('chain')}: {describe_expr(rule)}"
