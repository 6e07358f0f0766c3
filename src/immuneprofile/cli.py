"""Command-line interface: a thin shell over the library functions."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from immuneprofile import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="immuneprofile")
def main() -> None:
    """immuneprofile: gate FCS files with declarative templates and relate subsets to PASI."""


@main.command()
@click.option("-t", "--template", "template_paths", required=True, multiple=True,
              help="Gating template: a YAML file or a shipped template's name (treg, monocytes, "
                   "tcell_skin_homing). Repeatable: each file is read once and "
                   "gated with every template.")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Output directory (created if missing).")
@click.option("--compensation", default="auto", show_default=True,
              help="'auto' (file's $SPILLOVER if any), 'fcs', 'none', or a CSV matrix path.")
@click.option("-j", "--jobs", default=1, show_default=True, type=int,
              help="Worker processes of a local Dask cluster (0 = all cores). With more than 1, no AnnData "
                   "is written.")
@click.option("--scheduler", default=None, metavar="ADDRESS",
              help="Run on an existing Dask cluster (e.g. tcp://host:8786) instead; see docs/scale-out.md.")
@click.option("--resume", is_flag=True,
              help="Take over the files an interrupted run into the same -o folder already gated (OUT/parts).")
@click.option("--anndata/--no-anndata", default=True, show_default=True,
              help="Write the gated events as events.h5ad.")
def gate(template_paths: tuple[str, ...], files: tuple[str, ...], out_dir: str, compensation: str, jobs: int,
         scheduler: str | None, resume: bool, anndata: bool) -> None:
    """Gate FILES with a template; write populations.csv/.parquet, thresholds.csv and events.h5ad.

    With several templates (-t repeated) the tables have a row per template and
    population, and the events go to events_<template>.h5ad. A file that cannot
    be read or gated is reported and skipped; the exit code is 1 if any file failed.
    """
    from rich.console import Console
    from rich.progress import Progress

    from immuneprofile.batch import gate_files
    from immuneprofile.exceptions import ResumeError
    from immuneprofile.stats import write_tables
    from immuneprofile.template.parse import TemplateError, load_template

    err = Console(stderr=True, soft_wrap=True)
    try:
        templates = [load_template(p) for p in template_paths]
    except TemplateError as exc:
        err.print(f"[red]error:[/red] {exc}", markup=True, highlight=False)
        sys.exit(2)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with Progress(console=err, transient=False) as bar:
        task = bar.add_task(f"gating with {', '.join(t.name for t in templates)}", total=len(files))

        def tick(path: str, error: str | None) -> None:
            bar.advance(task)
            if error:
                bar.console.print(f"[red]failed:[/red] {error}", markup=True, highlight=False)

        try:
            batch = gate_files(files, templates, compensation=compensation, jobs=jobs, scheduler=scheduler,
                               parts=out / "parts", resume=resume, keep_data=anndata, progress=tick)
        except ResumeError as exc:
            err.print(f"[red]error:[/red] {exc}", markup=True, highlight=False)
            sys.exit(2)
    write_tables(out, batch.table, batch.thresholds, batch.errors)
    if anndata and len(batch.results) < len(batch.gated) * len(templates):
        err.print("[yellow]AnnData not written:[/yellow] events are kept only when every file is gated in this "
                  "process in this run (-j 1, no --scheduler, nothing resumed)", markup=True, highlight=False)
    elif batch.results and anndata and jobs == 1 and scheduler is None:
        _write_events(out, batch, templates, err)
    n_ok, n_bad = len(batch.gated), len(batch.errors)
    err.print(f"{n_ok} file(s) gated, {n_bad} failed -> {out}", highlight=False)
    sys.exit(1 if n_bad else 0)


def _write_events(out: Path, batch, templates: list, err) -> None:
    """``events.h5ad`` (``events_<template>.h5ad`` with several templates) of a batch gated in-process."""
    from immuneprofile.stats import to_anndata

    for t in templates:
        name = "events.h5ad" if len(templates) == 1 else f"events_{t.name}.h5ad"
        try:
            to_anndata([r for r in batch.results if r.template is t]).write_h5ad(out / name)
        except ValueError as exc:
            err.print(f"[yellow]AnnData not written ({name}):[/yellow] {exc}", markup=True, highlight=False)


@main.command()
@click.argument("sample_sheet", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False))
@click.option("--clinical", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Clinical CSV; if given, subset shifts are correlated with PASI.")
@click.option("-t", "--template", "templates", multiple=True, metavar="PANEL=YAML",
              help="Template for a panel (repeatable): a YAML path or a shipped template's name; default: the "
                   "shipped tcell_skin_homing, treg and monocytes templates.")
@click.option("--gating-dir", default=None, type=click.Path(file_okay=False),
              help="Folder where template names given with -t are looked up first.")
@click.option("--compensation", default="auto", show_default=True)
@click.option("-j", "--jobs", default=1, show_default=True, type=int,
              help="Worker processes of a local Dask cluster (0 = all cores).")
@click.option("--scheduler", default=None, metavar="ADDRESS",
              help="Run on an existing Dask cluster (e.g. tcp://host:8786); see docs/scale-out.md.")
@click.option("--resume", is_flag=True,
              help="Take over the files an interrupted run into the same -o folder already gated.")
@click.option("--anndata/--no-anndata", default=False, show_default=True)
def study(sample_sheet: str, out_dir: str, clinical: str | None, templates: tuple[str, ...], gating_dir: str | None,
          compensation: str, jobs: int, scheduler: str | None, resume: bool, anndata: bool) -> None:
    """Gate every file of SAMPLE_SHEET (file, sample_id, patient, week, panel) with its panel's template.

    Writes one population table for the study and, with --clinical, the PASI
    correlation outputs. Exit code 1 if any file failed.
    """
    from rich.console import Console

    from immuneprofile.exceptions import ResumeError
    from immuneprofile.study.clinical import ClinicalDataError
    from immuneprofile.study.run import DEFAULT_TEMPLATES, run_study
    from immuneprofile.template.parse import TemplateError

    err = Console(stderr=True, soft_wrap=True)
    mapping: dict[str, str] = dict(DEFAULT_TEMPLATES)
    for item in templates:
        panel, sep, path = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r}: write PANEL=path/to/template.yaml", param_hint="--template")
        mapping[panel] = path

    def tick(path: str, error: str | None) -> None:
        if error:
            err.print(f"[red]failed:[/red] {error}", markup=True, highlight=False)

    try:
        res = run_study(sample_sheet, out_dir, templates=mapping, gating_dir=gating_dir, clinical=clinical,
                        compensation=compensation, jobs=jobs, scheduler=scheduler, resume=resume, anndata=anndata,
                        progress=tick)
    except (TemplateError, ClinicalDataError, ResumeError) as exc:
        raise click.ClickException(str(exc))
    n_samples = res["table"]["sample_id"].nunique() if not res["table"].empty else 0
    err.print(f"{n_samples} sample(s) gated, {len(res['errors'])} failed -> {out_dir}", highlight=False)
    for path in res["files"].values():
        click.echo(str(path))
    sys.exit(1 if res["errors"] else 0)


@main.command()
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--events", "n_events", default=50_000, show_default=True, type=int, help="Events per file.")
@click.option("--seed", default=0, show_default=True, type=int)
def simulate(out_dir: str, n_events: int, seed: int) -> None:
    """Write a simulated case-series study (FCS files, truth, clinical and sample sheets) to OUT_DIR."""
    from immuneprofile.study.simulate import simulate_study

    simulate_study(out_dir, n_events=n_events, seed=seed)
    click.echo(f"wrote simulated study to {out_dir}")


@main.command("correlate")
@click.option("--populations", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Population table (populations.csv or .parquet from `immuneprofile gate`).")
@click.option("--clinical", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Clinical CSV: patient, week, pasi[, treatment, notes].")
@click.option("--samples", type=click.Path(exists=True), default=None,
              help="Sample sheet CSV (sample_id, patient, week), or FCS files/directory to read PATIENT/WEEK keywords.")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False))
def correlate_cmd(populations: str, clinical: str, samples: str | None, out_dir: str) -> None:
    """Relate subset shifts to PASI: changes from baseline, PASI75/90, rmcorr, mixed models, plots."""
    from immuneprofile.study.association import correlate
    from immuneprofile.study.clinical import ClinicalDataError

    try:
        res = correlate(populations, clinical, samples, out_dir)
    except ClinicalDataError as exc:
        raise click.ClickException(str(exc))
    for path in res["files"].values():
        click.echo(str(path))


@main.group()
def reference() -> None:
    """Reference-sample QC: store each batch's reference frequencies and check new batches (Westgard)."""


@reference.command("add")
@click.option("--db", required=True, type=click.Path(dir_okay=False),
              help="Study database (SQLite file, created on first use).")
@click.option("--batch", "batch_id", required=True, help="Batch identifier (must be new).")
@click.option("--populations", required=True, type=click.Path(exists=True, dir_okay=False),
              help="populations.csv/.parquet of the batch (from `immuneprofile gate`).")
@click.option("--sample", "samples", multiple=True,
              help="Reference sample id (repeat for one per panel); needed if the table has several samples.")
@click.option("--date", default=None, help="Batch date YYYY-MM-DD (default: today).")
@click.option("--note", default="", help="Free-text note stored with the batch.")
def reference_add(db: str, batch_id: str, populations: str, samples: tuple[str, ...], date: str | None,
                  note: str) -> None:
    """Store the reference sample's population frequencies of one batch."""
    from immuneprofile.qc.reference import ReferenceDBError, add_reference

    try:
        rows = add_reference(db, batch_id, populations, sample=list(samples) or None, date=date, note=note)
    except ReferenceDBError as exc:
        raise click.ClickException(str(exc))
    click.echo(f"batch {batch_id}: stored {len(rows)} population(s) of "
               f"{', '.join(sorted(set(rows['sample_id'])))} in {db}")


@reference.command("check")
@click.option("--db", required=True, type=click.Path(exists=True, dir_okay=False), help="Study database.")
@click.option("--populations", required=True, type=click.Path(exists=True, dir_okay=False),
              help="populations.csv/.parquet of the batch to check.")
@click.option("--sample", "samples", multiple=True, help="Reference sample id (repeatable).")
@click.option("--batch", "batch_id", default=None,
              help="Id of the batch checked; if already stored, only earlier batches form the history.")
@click.option("--min-history", default=3, show_default=True, type=int,
              help="Earlier batches needed before a population is judged.")
@click.option("--plots", "plots_dir", default=None, type=click.Path(file_okay=False),
              help="Write one Levey-Jennings PNG per population to this directory.")
@click.option("--out", "out_csv", default=None, type=click.Path(dir_okay=False),
              help="Write the check table to this CSV.")
def reference_check(db: str, populations: str, samples: tuple[str, ...], batch_id: str | None, min_history: int,
                    plots_dir: str | None, out_csv: str | None) -> None:
    """Check a batch's reference sample against the history (1-3s, 2-2s); exit 1 if any population fails."""
    from rich.console import Console
    from rich.table import Table

    from immuneprofile.qc.reference import ReferenceDBError, check_reference, write_levey_jennings

    try:
        res = check_reference(db, populations, batch_id=batch_id, sample=list(samples) or None,
                              min_history=min_history)
    except ReferenceDBError as exc:
        raise click.ClickException(str(exc))
    table = Table(title=f"reference check against {db}")
    for col in ("template", "population", "value", "n", "mean", "sd", "z", "rules", "status"):
        table.add_column(col, justify="right" if col in ("value", "n", "mean", "sd", "z") else "left")
    colour = {"pass": "green", "fail": "bold red", "insufficient-history": "yellow"}
    for r in res.itertuples(index=False):
        table.add_row(r.template, r.population, f"{r.value:.2f}", str(r.n_history), f"{r.mean:.2f}",
                      f"{r.sd:.2f}", f"{r.z:.2f}", r.rules or r.warning,
                      f"[{colour.get(r.status, 'white')}]{r.status}[/]")
    Console(width=140).print(table)
    if out_csv:
        res.to_csv(out_csv, index=False)
    if plots_dir:
        paths = write_levey_jennings(db, res, plots_dir)
        click.echo(f"{len(paths)} Levey-Jennings plot(s) in {plots_dir}")
    n_fail = int((res["status"] == "fail").sum())
    click.echo(f"FAIL: {n_fail} population(s) out of control" if n_fail else "PASS")
    sys.exit(1 if n_fail else 0)


@reference.command("remove")
@click.option("--db", required=True, type=click.Path(exists=True, dir_okay=False), help="Study database.")
@click.option("--batch", "batch_id", required=True, help="Batch to delete.")
def reference_remove(db: str, batch_id: str) -> None:
    """Delete a stored batch (e.g. one added by mistake)."""
    from immuneprofile.qc.reference import ReferenceDBError, remove_batch

    try:
        remove_batch(db, batch_id)
    except ReferenceDBError as exc:
        raise click.ClickException(str(exc))
    click.echo(f"removed batch {batch_id} from {db}")


@main.command("report")
@click.option("-t", "--template", "template_path", required=True, type=click.Path(dir_okay=False),
              help="Gating template (YAML).")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Output directory: report.html, populations.csv[, reference_check.csv].")
@click.option("--reference-db", default=None, type=click.Path(dir_okay=False),
              help="Reference database to check this batch's reference sample against (read-only).")
@click.option("--reference-sample", "reference_samples", multiple=True,
              help="Reference sample id in this batch (default: sample ids containing 'ref').")
@click.option("--compensation", default="auto", show_default=True,
              help="'auto', 'fcs', 'none', or a CSV matrix path.")
def report_cmd(template_path: str, files: tuple[str, ...], out_dir: str, reference_db: str | None,
               reference_samples: tuple[str, ...], compensation: str) -> None:
    """Gate FILES and write an HTML report: gating plots, population tables, reference check, warnings."""
    from immuneprofile.qc.report import make_report
    from immuneprofile.template.parse import TemplateError

    try:
        path, batch = make_report(template_path, files, out_dir, compensation=compensation,
                                  reference_db=reference_db, reference_sample=list(reference_samples) or None)
    except TemplateError as exc:
        raise click.ClickException(str(exc))
    click.echo(f"{len(batch.results)} sample(s) gated, {len(batch.errors)} failed -> {path}")


if __name__ == "__main__":  # pragma: no cover
    main()
