"""The ``tokenreduce bench`` report: Rich table, memory lines, the printed summary, JSON.

A report is what `tokenreduce.bench.run` returns: ``{"mode", "env", "results"}`` with two
result rows per case (the op's, then the reference's), then one per plain-torch peer
(role "peer", full mode): its "ours vs this" cell is the peer's median / our median.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

from rich.console import Console
from rich.table import Table

__all__ = ["memory_lines", "missed_targets", "print_report", "results_table", "write_json"]


def _mib(n: Optional[int]) -> str:
    return "n/a" if n is None else f"{n / 2**20:.2f} MiB"


def _bytes(n: Optional[int]) -> str:
    return "n/a" if n is None else f"{n} B ({n / 2**20:.2f} MiB)"


def _target_cell(row: Dict[str, Any]) -> str:
    if row.get("role", row["impl"]) not in ("tokenreduce", "peer") or row["target"] is None:
        return ""
    if row["target_met"] is None:
        return f"[dim]>={row['target']:.3g}x (quick: n/a)[/]"
    mark = "[green]met[/]" if row["target_met"] else "[bold red]MISSED[/]"
    return f"{mark} (>={row['target']:.3g}x)"


def results_table(report: Dict[str, Any]) -> Table:
    """One row per implementation and case: median (IQR), speedup, GB/s, memory, target."""
    env = report["env"]
    table = Table(
        title=f"tokenreduce bench: {report['mode']} mode, {env['threads']} threads, "
              f"{env['cpu_model']}, torch {env['torch']}, "
              f"{env.get('allocator', {}).get('mode', '?')} allocator",
        title_justify="left",
    )
    for col, just in (("op", "left"), ("shape", "left"), ("dtype", "left"),
                      ("implementation", "left"), ("median ms (IQR)", "right"),
                      ("speedup", "right"), ("ours vs this", "right"), ("GB/s", "right"),
                      ("peak extra mem", "right"), ("target", "left")):
        table.add_column(col, justify=just, no_wrap=col != "shape")
    prev = None
    for row in report["results"]:
        first = (row["op"], row["shape"]) != prev
        prev = (row["op"], row["shape"])
        if first and table.rows:
            table.add_section()
        ours = row["impl"] == "tokenreduce"
        table.add_row(
            row["op"] if first else "",
            row["shape"] if first else "",
            row["dtype"] if first else "",
            row["impl"],
            f"{row['median_ms']:.3f} ({row['iqr_ms']:.3f})",
            f"[bold]{row['speedup']:.2f}x[/]" if ours else f"{row['speedup']:.2f}x",
            f"[bold]{row['vs_peer']:.2f}x[/]" if row.get("vs_peer") is not None else "",
            f"{row['gbps']:.3g}",
            _mib(row.get("peak_extra_bytes")),
            _target_cell(row),
        )
    table.caption = ("speedup = reference median / median (same run); ours vs this = this "
                     "peer's median / tokenreduce's median (same run); GB/s = bytes the op "
                     "must read and write / median")
    return table


def memory_lines(results: Sequence[Dict[str, Any]]) -> List[str]:
    """One line per attention case: the op's and the reference's peak extra tensor memory
    next to the size of one ``[B, H, N, N]`` float32 buffer."""
    by_case: Dict[Tuple[str, str], Dict[str, Dict[str, Any]]] = {}
    for row in results:
        if row.get("attn_buffer_bytes") is not None:
            by_case.setdefault((row["op"], row["shape"]), {})[row["impl"]] = row
    lines = []
    for (op, shape), rows in by_case.items():
        ours, ref = rows.get("tokenreduce"), rows.get("reference")
        if ours is None or ref is None:
            continue
        lines.append(f"{op} [{shape}] peak extra memory: "
                     f"tokenreduce {_bytes(ours.get('peak_extra_bytes'))}, "
                     f"reference {_bytes(ref.get('peak_extra_bytes'))}; "
                     f"one [B,H,N,N] float32 buffer = {_bytes(ours['attn_buffer_bytes'])}")
    return lines


def missed_targets(report: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The op rows whose full-mode speed target was missed."""
    return [r for r in report["results"] if r["target_met"] is False]


def print_report(report: Dict[str, Any], console: Console, *, memory: bool = True) -> None:
    """The table, the attention memory lines, what the numbers mean, the missed targets."""
    console.print(results_table(report))
    for line in memory_lines(report["results"]):
        console.print(line, highlight=False)
    if memory:
        console.print("[dim]peak extra memory: tensor bytes allocated through torch's CPU "
                      "allocator during one call above those allocated before it, outputs "
                      "included (torch.profiler, profile_memory=True); native scratch outside "
                      "torch's allocator is not counted.[/]", highlight=False)
    if report["mode"] == "quick":
        console.print("[dim]quick mode: small shapes; speed targets apply to the full shapes "
                      "and are not checked.[/]")
    else:
        for r in missed_targets(report):
            if r.get("vs_peer") is not None:
                console.print(f"[bold red]target missed:[/] {r['op']} [{r['shape']}]: "
                              f"{r['vs_peer']:.2f}x over {r['impl']} < {r['target']:.3g}x",
                              highlight=False)
            else:
                console.print(f"[bold red]target missed:[/] {r['op']} [{r['shape']}]: "
                              f"{r['speedup']:.2f}x < {r['target']:g}x", highlight=False)


def write_json(report: Dict[str, Any], path: str) -> str:
    """Write the report (with ``targets_checked``: full mode) as JSON; the absolute path."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(dict(report, targets_checked=report["mode"] != "quick"), f, indent=2)
        f.write("\n")
    return path
