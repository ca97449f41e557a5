"""``tidegate demo``: run the storm demo and print its report (``make demo``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def demo(
    duration: Annotated[float, typer.Option(min=20, max=1800,
                                            help="Seconds of storm (the drain comes after)")
                        ] = 120.0,
    out: Annotated[Path, typer.Option(help="Where report.md, the charts and the logs go")
                   ] = Path("demo-out"),
    exporter: Annotated[bool, typer.Option(help="Also run the exporter and its status page")
                        ] = True,
) -> None:
    """Run the real pipeline through a scripted storm; write and print the report."""
    from tidegate.demo.run import run_demo

    result = run_demo(duration, out, exporter=exporter,
                      progress=lambda line: typer.echo(f"demo: {line}"))
    typer.echo("")
    typer.echo(result.report_path.read_text())
    typer.echo(f"demo: report {result.report_path}, charts "
               + ", ".join(str(p) for p in result.charts)
               + f" ({result.elapsed_s:.0f}s in all)")
    if not result.accounting.ok:
        raise typer.Exit(1)
