"""End-of-run summaries, printed to stderr so that stdout stays free for data."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipelines.describe import DescribeReport
    from pipelines.runner import StreamReport


def _kinds(counts) -> str:
    return ", ".join(f"{k}: {v}" for k, v in counts.most_common())


def rows_to_do(rows_todo: int, rows_retried: int) -> str:
    return f"{rows_todo} ({rows_retried} of them retried: their last attempt failed)" if rows_retried else str(rows_todo)


def error_rows(report: "StreamReport") -> str:
    """The error rows of a run, split by kind of failure (pipelines.failures), and what a rerun does."""
    if not report.error_rows:
        return "0"
    transient, permanent = report.errors_of_kind(True), report.errors_of_kind(False)
    parts = []
    if transient:
        parts.append(f"transient {sum(transient.values())} ({_kinds(transient)}): a plain rerun retries them")
    if permanent:
        parts.append(f"permanent {sum(permanent.values())} ({_kinds(permanent)}): kept; --retry-errors redoes them")
    return f"{report.error_rows}: " + "; ".join(parts)


def engine_queue(report: "StreamReport") -> str:
    """What the engines held while more input waited ('' when no streaming engine counted)."""
    if not report.engine_queue:
        return ""
    return (f"{report.engine_queue_at(0.1)} (10th percentile) / {report.engine_queue_at(0.5)} (median) requests held "
            f"while more input waited (far below what the engine runs at once: loading or writing starved it)")


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
    table.add_row("rows to do", rows_to_do(report.rows_todo, report.rows_retried))
    if not report.dry_run:
        table.add_row("rows written", str(report.rows_written))
        table.add_row("error rows", error_rows(report))
        table.add_row("wall time", f"{report.wall_s:.1f} s (start-up incl. first batch {report.startup_s:.1f} s)")
        table.add_row("throughput", f"{d['rows_per_s']:.2f} rows/s, {d['prompt_tokens_per_s']:.0f} prompt tok/s, "
                                    f"{d['output_tokens_per_s']:.0f} output tok/s (after the first batch)")
        if held := engine_queue(report):
            table.add_row("engine queue", held)
    from pipelines.cost import summary_lines
    for label, value in summary_lines(report.cost):
        table.add_row(label, value)
    Console(stderr=True).print(table)
