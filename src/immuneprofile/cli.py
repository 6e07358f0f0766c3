"""Command-line interface: a thin shell over the library functions."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from immuneprofile import __version__
from immuneprofile.exceptions import ImmuneProfileError

# Exit codes: 0 all well; 1 some files (or reference populations) failed, the others' results written;
# 2 the run could not start (bad template, sheet, option or database): one red line, no traceback.
# Every message prints user text (file names, labels, populations) literally, never as rich markup.


def _console():
    from rich.console import Console

    return Console(stderr=True, soft_wrap=True, highlight=False)


def _say(label: str, style: str, message: str, console=None) -> None:
    """Print ``label`` in ``style`` followed by ``message`` taken literally (no markup)."""
    from rich.text import Text

    text = Text.assemble((label, style), " ", str(message)) if label else Text(str(message))
    (console or _console()).print(text)


class _Group(click.Group):
    """Click group turning every :class:`ImmuneProfileError` into one red line and exit code 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ImmuneProfileError as exc:
            _say("error:", "bold red", str(exc))
            ctx.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="immuneprofile")
def main() -> None:
    """immuneprofile: gate FCS files with declarative templates and relate subsets to PASI."""


@main.command()
@click.option("-t", "--template", "template_paths", multiple=True,
              help="Gating template: a YAML file or a shipped template's name (treg, monocytes, "
                   "tcell_skin_homing). Repeatable: each file is read once and "
                   "gated with every template.")
@click.argument("files", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Output directory (created if missing; outputs of an earlier run there are replaced).")
@click.option("--compensation", default="auto", show_default=True,
              help="'auto' (file's $SPILLOVER if any), 'fcs', 'none', or a CSV matrix path.")
@click.option("-j", "--jobs", default=1, show_default=True, type=int,
              help="Worker processes (0 = all cores). With more than 1, no AnnData is written.")
@click.option("--anndata/--no-anndata", default=True, show_default=True,
              help="Write the gated events as events.h5ad.")
@click.option("--workspace", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A FlowJo workspace (.wsp) used as the template (instead of -t); the population "
                   "table gets FlowJo's stored counts as `flowjo_count` where the samples match.")
@click.option("--group", default="All Samples", show_default=True, help="The workspace's sample group.")
@click.option("--flowjo", "flowjo_out", type=click.Path(dir_okay=False), default=None,
              help="Also write the gates and populations as a FlowJo workspace (.wsp) at this path.")
def gate(template_paths: tuple[str, ...], files: tuple[str, ...], out_dir: str, compensation: str, jobs: int,
         anndata: bool, workspace: str | None, group: str, flowjo_out: str | None) -> None:
    """Gate FILES with a template; write populations.csv/.parquet, thresholds.csv and events.h5ad.

    With several templates (-t repeated) the tables have a row per template and
    population, and the events go to events_<template>.h5ad. A file that cannot
    be read or gated is reported and skipped; the exit code is 1 if any file failed.
    """
    from rich.markup import escape
    from rich.progress import Progress

    from immuneprofile.batch import gate_files
    from immuneprofile.stats import clear_outputs, to_anndata, write_tables

    err = _console()
    templates, flowjo_counts = _gate_templates(template_paths, workspace, group)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clear_outputs(out)
    with Progress(console=err, transient=False) as bar:
        task = bar.add_task(escape(f"gating with {', '.join(t.name for t in templates)}"), total=len(files))

        def tick(path: str, error: str | None) -> None:
            bar.advance(task)
            if error:
                _say("failed:", "red", error, bar.console)

        batch = gate_files(files, templates, compensation=compensation, jobs=jobs, progress=tick)
    write_tables(out, _with_flowjo_counts(batch.table, flowjo_counts), batch.thresholds, batch.errors)
    if flowjo_out:  # gates and populations for FlowJo users
        _write_flowjo(err, templates, batch.results, flowjo_out, compensation)
    if batch.results and anndata and jobs == 1:
        for k, t in enumerate(templates):
            name = "events.h5ad" if len(templates) == 1 else f"events_{t.name}.h5ad"
            try:  # results: files in order, templates in order within a file (each its fitted copy)
                to_anndata(batch.results[k::len(templates)]).write_h5ad(out / name)
            except ValueError as exc:
                _say(f"AnnData not written ({name}):", "yellow", str(exc), err)
    n_ok, n_bad = len(batch.results) // len(templates), len(batch.errors)
    _say("", "", f"{n_ok} file(s) gated, {n_bad} failed -> {out}", err)
    sys.exit(1 if n_bad else 0)


def _gate_templates(template_paths: tuple[str, ...], workspace: str | None, group: str):
    """``gate``'s templates (``-t``, or ``--workspace``'s) and FlowJo's stored counts (``None`` without a workspace)."""
    from immuneprofile.template.parse import load_template

    if bool(workspace) == bool(template_paths):
        raise click.UsageError("give a template (-t) or a FlowJo workspace (--workspace), not both or neither")
    if workspace:
        from immuneprofile.interop.flowjo import workspace_templates

        return workspace_templates(workspace, group=group)
    return [load_template(p) for p in template_paths], None


def _write_flowjo(err, templates, results, path: str, compensation: str) -> None:
    """``gate --flowjo``: the run's gates and populations as a FlowJo workspace (exit 1 if FlowJo cannot take them)."""
    from immuneprofile.exceptions import ImmuneProfileError
    from immuneprofile.interop.flowjo import write_flowjo

    if not results:
        return
    try:
        write_flowjo(templates, results, path, compensation=compensation)
    except ImmuneProfileError as exc:
        _say("FlowJo workspace not written:", "red", str(exc), err)
        sys.exit(1)


def _with_flowjo_counts(table, flowjo_counts):
    """The population table with FlowJo's counts beside ours (``gate --workspace``), else unchanged."""
    if flowjo_counts is None or table.empty:
        return table
    from immuneprofile.interop.flowjo import add_flowjo_counts

    return add_flowjo_counts(table, flowjo_counts)


@main.command("inspect")
@click.argument("files", nargs=-1, required=True, type=click.Path())
@click.option("-t", "--template", "template_paths", multiple=True,
              help="Template (YAML path or shipped name) whose markers to look for. Repeatable.")
@click.option("--dataset", default=None, type=int, help="Data set of a multi-data-set file (0-based).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (a list, one object per file).")
def inspect_cmd(files: tuple[str, ...], template_paths: tuple[str, ...], dataset: int | None, as_json: bool) -> None:
    """A first look at FILES: channels, markers, events, data type, compensation, template readiness.

    Reads only each file's HEADER and TEXT. Exit code 1 if a file cannot be read or a
    template's marker is missing from a file.
    """
    import json

    from immuneprofile.io.inspect import format_inspection, inspect_fcs
    from immuneprofile.template.parse import load_template

    templates = [load_template(p) for p in template_paths]
    infos, bad = [], 0
    for path in files:
        try:
            infos.append(inspect_fcs(path, templates, dataset=dataset))
        except ImmuneProfileError as exc:
            bad += 1
            infos.append({"path": path, "error": str(exc)})
            if not as_json:
                _say("failed:", "red", str(exc))
            continue
        bad += any(not t["ready"] for t in infos[-1]["templates"])
        if not as_json:
            click.echo(format_inspection(infos[-1]))
    if as_json:
        click.echo(json.dumps(infos, indent=1))
    sys.exit(1 if bad else 0)


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
@click.option("-j", "--jobs", default=1, show_default=True, type=int)
@click.option("--anndata/--no-anndata", default=False, show_default=True)
def study(sample_sheet: str, out_dir: str, clinical: str | None, templates: tuple[str, ...], gating_dir: str | None,
          compensation: str, jobs: int, anndata: bool) -> None:
    """Gate every file of SAMPLE_SHEET (file, sample_id, patient, week, panel) with its panel's template.

    Writes one population table for the study and, with --clinical, the PASI
    correlation outputs. Exit code 1 if any file failed.
    """
    from immuneprofile.study.run import DEFAULT_TEMPLATES, run_study

    err = _console()
    mapping: dict[str, str] = dict(DEFAULT_TEMPLATES)
    for item in templates:
        panel, sep, path = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r}: write PANEL=path/to/template.yaml", param_hint="--template")
        mapping[panel] = path

    def tick(path: str, error: str | None) -> None:
        if error:
            _say("failed:", "red", error, err)

    res = run_study(sample_sheet, out_dir, templates=mapping, gating_dir=gating_dir, clinical=clinical,
                    compensation=compensation, jobs=jobs, anndata=anndata, progress=tick)
    n_samples = res["table"]["sample_id"].nunique() if not res["table"].empty else 0
    _say("", "", f"{n_samples} sample(s) gated, {len(res['errors'])} failed -> {out_dir}", err)
    for path in res["files"].values():
        click.echo(str(path))
    sys.exit(1 if res["errors"] else 0)


@main.command()
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--events", "n_events", default=None, type=int,
              help="Events per file (default: per panel, as in example_data/).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--other-instrument", is_flag=True,
              help="Record on another cytometer's scale (scatter gains, 2^20 range, -H detectors, "
                   "$SPILLOVER over -A only, wider negatives); same cells, same truth.")
def simulate(out_dir: str, n_events: int | None, seed: int, other_instrument: bool) -> None:
    """Write a simulated case-series study (FCS files, truth, clinical and sample sheets) to OUT_DIR."""
    from immuneprofile.study.instrument import other_instrument as record
    from immuneprofile.study.simulate import simulate_study

    simulate_study(out_dir, n_events=n_events, seed=seed,
                   instrument=(lambda s, rng: record(s, rng=rng)) if other_instrument else None)
    click.echo(f"wrote simulated study to {out_dir}")


@main.command("correlate")
@click.option("--populations", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Population table (populations.csv or .parquet from `immuneprofile gate`).")
@click.option("--clinical", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Clinical CSV: patient, week, pasi[, treatment, notes].")
@click.option("--samples", type=click.Path(exists=True), default=None,
              help="Sample sheet CSV (sample_id, patient, week), or FCS files/directory to read PATIENT/WEEK keywords.")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False))
@click.option("--readouts", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Readout table (readouts.csv: sample_id, readout, pct, count, of_count); default: the declared "
                   "readouts found in the population table.")
@click.option("--patients", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Patient table for the claim table (default: patients.csv beside the clinical CSV).")
@click.option("--period", default="MSC", show_default=True,
              help="Treatment period of the readout association ('all' pools every visit).")
@click.option("--permutations", "n_perm", default=9999, show_default=True, type=int,
              help="Within-patient permutations per p-value.")
def correlate_cmd(populations: str, clinical: str, samples: str | None, out_dir: str, readouts: str | None,
                  patients: str | None, period: str, n_perm: int) -> None:
    """Relate declared readouts to PASI: change from baseline against assay CV, permutation p-values, plots, claims."""
    from immuneprofile.study.association import correlate

    res = correlate(populations, clinical, samples, out_dir, readouts=readouts, patients=patients,
                    period=None if period == "all" else period, n_perm=n_perm)
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
    from immuneprofile.qc.reference import add_reference

    rows = add_reference(db, batch_id, populations, sample=list(samples) or None, date=date, note=note)
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
    from rich.text import Text

    from immuneprofile.qc.reference import check_reference, write_levey_jennings

    res = check_reference(db, populations, batch_id=batch_id, sample=list(samples) or None,
                          min_history=min_history)
    table = Table(title=Text(f"reference check against {db}"))
    for col in ("template", "population", "value", "n", "mean", "sd", "z", "rules", "status"):
        table.add_column(col, justify="right" if col in ("value", "n", "mean", "sd", "z") else "left")
    colour = {"pass": "green", "fail": "bold red", "insufficient-history": "yellow"}
    for r in res.itertuples(index=False):
        table.add_row(Text(str(r.template)), Text(str(r.population)), f"{r.value:.2f}", str(r.n_history),
                      f"{r.mean:.2f}", f"{r.sd:.2f}", f"{r.z:.2f}", Text(str(r.rules or r.warning)),
                      Text(str(r.status), style=colour.get(r.status, "white")))
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
    from immuneprofile.qc.reference import remove_batch

    remove_batch(db, batch_id)
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

    path, batch = make_report(template_path, files, out_dir, compensation=compensation,
                              reference_db=reference_db, reference_sample=list(reference_samples) or None)
    click.echo(f"{len(batch.results)} sample(s) gated, {len(batch.errors)} failed -> {path}")



@main.command("convert")
@click.argument("workspace", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for the YAML templates (created if missing).")
@click.option("--group", default=None, help="Only this sample group (default: every group with samples).")
def convert_cmd(workspace: str, out_dir: str, group: str | None) -> None:
    """Convert a FlowJo workspace (.wsp) into editable YAML templates, one per sample group."""
    from immuneprofile.interop.flowjo import convert_workspace

    files = convert_workspace(workspace, out_dir, group=group)
    for f in files:
        click.echo(str(f))
@main.command("discover")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("-t", "--template", "template_path", required=True,
              help="Gating template: a YAML file or a shipped template's name.")
@click.option("--on", "population", default=None, help="Gated population to analyse, e.g. 'CD3+' (default: all events).")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Output directory: clusters.csv, concordance.csv, abundance.csv, discovery.h5ad, PNG plots.")
@click.option("--method", type=click.Choice(["leiden", "flowsom"]), default="leiden", show_default=True)
@click.option("--n-per-sample", default=2000, show_default=True, type=int, help="Events drawn per sample.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the draw, embedding and clustering.")
@click.option("--markers", default=None, help="Comma-separated markers to use (default: every stained channel).")
@click.option("--samples", "sample_sheet", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Sample sheet CSV (sample_id, patient, week): visit colours and abundance per patient/week.")
@click.option("--resolution", default=0.5, show_default=True, type=float, help="Leiden resolution.")
@click.option("--n-clusters", default=10, show_default=True, type=int, help="FlowSOM metaclusters.")
@click.option("--compensation", default="auto", show_default=True,
              help="'auto', 'fcs', 'none', or a CSV matrix path.")
def discover_cmd(files: tuple[str, ...], template_path: str, population: str | None, out_dir: str, method: str,
                 n_per_sample: int, seed: int, markers: str | None, sample_sheet: str | None, resolution: float,
                 n_clusters: int, compensation: str) -> None:
    """Gate FILES, subsample a population, embed (UMAP), cluster, and check the clusters against the gates."""
    from immuneprofile.discovery import run_discovery

    err = _console()

    def tick(path: str, error: str | None) -> None:
        if error:
            _say("failed:", "red", error, err)

    res = run_discovery(files, template_path, out_dir, on=population, method=method, n_per_sample=n_per_sample,
                        seed=seed, markers=[m.strip() for m in markers.split(",")] if markers else None,
                        samples=sample_sheet, resolution=resolution, n_clusters=n_clusters,
                        compensation=compensation, progress=tick)
    conc = res["concordance"]
    click.echo(conc[["population", "n_gated", "clusters", "f1", "precision", "recall"]].to_string(
        index=False, float_format=lambda v: f"{v:.3f}"))
    err.print(f"{res['adata'].n_obs} events, {res['adata'].obs['cluster'].nunique()} {method} clusters; "
              f"{len(res['errors'])} file(s) failed -> {out_dir}", highlight=False)
    sys.exit(1 if res["errors"] else 0)


if __name__ == "__main__":  # pragma: no cover
    main()
