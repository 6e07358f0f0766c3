"""Command-line interface: a thin shell over the library functions."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from . import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="immuneprofile")
def main() -> None:
    """immuneprofile: gate FCS files with declarative templates and relate subsets to PASI."""


@main.command()
@click.option("-t", "--template", "template_path", required=True, type=click.Path(dir_okay=False),
              help="Gating template (YAML), e.g. gating/treg.yaml.")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Output directory (created if missing).")
@click.option("--compensation", default="auto", show_default=True,
              help="'auto' (file's $SPILLOVER if any), 'fcs', 'none', or a CSV matrix path.")
@click.option("-j", "--jobs", default=1, show_default=True, type=int,
              help="Worker processes (0 = all cores). With more than 1, no AnnData is written.")
@click.option("--anndata/--no-anndata", default=True, show_default=True,
              help="Write the gated events as events.h5ad.")
def gate(template_path: str, files: tuple[str, ...], out_dir: str, compensation: str, jobs: int,
         anndata: bool) -> None:
    """Gate FILES with a template; write populations.csv/.parquet, thresholds.csv and events.h5ad.

    A file that cannot be read or gated is reported and skipped; the exit code is
    1 if any file failed.
    """
    from rich.console import Console
    from rich.progress import Progress

    from .gating import gate_files
    from .stats import to_anndata
    from .template import TemplateError, load_template

    err = Console(stderr=True)
    try:
        template = load_template(template_path)
    except TemplateError as exc:
        err.print(f"[red]error:[/red] {exc}", markup=True, highlight=False)
        sys.exit(2)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with Progress(console=err, transient=False) as bar:
        task = bar.add_task(f"gating with {template.name}", total=len(files))

        def tick(path: str, error: str | None) -> None:
            bar.advance(task)
            if error:
                bar.console.print(f"[red]failed:[/red] {error}", markup=True, highlight=False)

        batch = gate_files(files, template, compensation=compensation, jobs=jobs, progress=tick)
    if batch.results:
        batch.table.to_csv(out / "populations.csv", index=False)
        batch.table.to_parquet(out / "populations.parquet", index=False)
        batch.thresholds.to_csv(out / "thresholds.csv", index=False)
        if anndata and jobs == 1:
            try:
                to_anndata(batch.results).write_h5ad(out / "events.h5ad")
            except ValueError as exc:
                err.print(f"[yellow]AnnData not written:[/yellow] {exc}", markup=True, highlight=False)
    if batch.errors:
        import pandas as pd

        pd.DataFrame({"file": list(batch.errors), "error": list(batch.errors.values())}).to_csv(
            out / "errors.csv", index=False)
    n_ok, n_bad = len(batch.results), len(batch.errors)
    err.print(f"{n_ok} file(s) gated, {n_bad} failed -> {out}", highlight=False)
    sys.exit(1 if n_bad else 0)


@main.command()
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--events", "n_events", default=50_000, show_default=True, type=int, help="Events per file.")
@click.option("--seed", default=0, show_default=True, type=int)
def simulate(out_dir: str, n_events: int, seed: int) -> None:
    """Write a simulated case-series study (FCS files, truth, clinical and sample sheets) to OUT_DIR."""
    from .simulate import simulate_study

    simulate_study(out_dir, n_events=n_events, seed=seed)
    click.echo(f"wrote simulated study to {out_dir}")


if __name__ == "__main__":  # pragma: no cover
    main()
