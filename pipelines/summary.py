"""End-of-run summaries, printed to stderr so that stdout stays free for data."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipelines.describe import DescribeReport


def print_describe_summary(report: "DescribeReport") -> None:
    from rich.console import Console
    from rich.table import Table

    d = report.as_dict()
    table = Table(title="describe: dry run (nothing generated)" if report.dry_run else "describe: summary",
                  show_header=False)
    if report.ingest is not None:
        ing = report.ingest
        table.add_row("ingest", f"{ing.items} items ({ing.reader} reader, dataset {ing.dataset!r}), "
                                f"{ing.captions} captions, {sum(ing.item_errors.values())} bad items, "
                                f"{ing.skipped_entries} skipped JSON entries")
    table.add_row("items in manifest", str(report.items_total))
    table.add_row("items with work", str(report.items_planned))
    table.add_row("rows already done", str(report.rows_done_before))
    table.add_row("rows to do", str(report.rows_todo))
    if not report.dry_run:
        table.add_row("rows written", str(report.rows_written))
        errors = ", ".join(f"{k}: {v}" for k, v in report.errors.most_common()) or "none"
        table.add_row("error rows", f"{report.error_rows} ({errors})")
        table.add_row("wall time", f"{report.wall_s:.1f} s (start-up incl. first batch {report.startup_s:.1f} s)")
        table.add_row("throughput", f"{d['rows_per_s']:.2f} rows/s, {d['prompt_tokens_per_s']:.0f} prompt tok/s, "
                                    f"{d['output_tokens_per_s']:.0f} output tok/s (after the first batch)")
    from pipelines.cost import summary_lines
    for label, value in summary_lines(report.cost):
        table.add_row(label, value)
    Console(stderr=True).print(table)
