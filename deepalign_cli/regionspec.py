"""Region selections for sharding (`--regions 0-9,17`) and predict's kept regions per particle ("3,17")."""

from __future__ import annotations

from .errors import DeepAlignError


def parse_regions(spec: str | None, n_regions: int, option: str = "--regions") -> list[int]:
    """'0-9,17' → [0, …, 9, 17]; None → all. Errors name the option and the bad part."""
    if spec is None or str(spec).strip().lower() in ("", "all"):
        return list(range(n_regions))
    out: set[int] = set()
    for part in str(spec).split(","):
        part = part.strip()
        try:
            if "-" in part:
                a, b = (int(x) for x in part.split("-", 1))
                if b < a:
                    raise ValueError
                out.update(range(a, b + 1))
            else:
                out.add(int(part))
        except ValueError:
            raise DeepAlignError(f"{option} {spec}: '{part}' is not a region number or range like 0-9")
    bad = sorted(r for r in out if r < 0 or r >= n_regions)
    if bad:
        raise DeepAlignError(f"{option} {spec}: region(s) {bad[:5]} outside 0-{n_regions - 1}")
    return sorted(out)


def format_regions(regions: list[int]) -> str:
    """[0,1,2,3,7] → '0-3,7' (the inverse of parse_regions)."""
    regions = sorted(set(regions))
    parts, i = [], 0
    while i < len(regions):
        j = i
        while j + 1 < len(regions) and regions[j + 1] == regions[j] + 1:
            j += 1
        parts.append(str(regions[i]) if i == j else f"{regions[i]}-{regions[j]}")
        i = j + 1
    return ",".join(parts)


def region_lists(values) -> list[list[int]]:
    """predictions.star's rlnDeepAlignRegions values ("3,17", best first) → [[3, 17], …].
    Raises ValueError on a part that is not an integer."""
    return [[int(x) for x in str(v).split(",") if x.strip()] for v in values]
