"""`fate-ray explain`'s tables: per placement, the candidate devices and their terms, the choice marked, and one
sentence saying why it won and what the runner-up would have cost (fate_ray/explain.py)."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from fate_ray.explain import TERMS, verdict


def print_decisions(records: Sequence[dict], console: Console) -> None:
    for record in records:
        chosen = record["chosen"]
        title = (f"{record['workflow']} / {record['stage']} ({record['model']}, {record['requests']} request(s)) at "
                 f"t = {record['t_s']:.1f} s, round {record['status'] or 'planned'}")
        if not record["candidates"]:
            console.print(f"{title}: {', '.join(f'{d} x{n}' for d, n in chosen.items())}")
            continue
        table = Table(title=title, title_justify="left")
        table.add_column("device")
        for term in TERMS:
            table.add_column(f"{term} (s)", justify="right")
        table.add_column("chosen", justify="right")
        for c in sorted(record["candidates"], key=lambda c: c["score"]):
            n = chosen.get(c["device"], 0)
            table.add_row(c["device"], *(f"{c[t]:.2f}" for t in TERMS), f"{n} req" if n else "",
                          style="bold" if n else None)
        console.print(table)
        console.print(f"  {verdict(record)}")
