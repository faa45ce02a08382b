"""One generated section of docs/benchmarks.md per bench script, between its own markers
(`<!-- bench/NAME.py: begin -->` ... `end -->`); every other section stays as it is."""

from __future__ import annotations

from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def markers(script: str) -> tuple[str, str]:
    return f"<!-- bench/{script}: begin -->", f"<!-- bench/{script}: end -->"


def replace_section(script: str, body: str, header: str = "# Benchmarks\n", after: str | None = None,
                    before: str | None = None) -> None:
    """Put `body` between the script's markers: in place when they exist, else after the
    `after` marker or before the `before` marker (when present), or at the end of the file."""
    text = DOCS.read_text(encoding="utf-8") if DOCS.exists() else header
    begin, end = markers(script)
    block = f"{begin}\n{body}{end}"
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    elif after and after in text:
        at = text.index(after) + len(after)
        text = text[:at] + "\n\n" + block + text[at:]
    elif before and before in text:
        at = text.index(before)
        text = text[:at] + block + "\n\n" + text[at:]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    DOCS.write_text(text, encoding="utf-8")
