"""``ggufopt report RESULTS_DIR``: regenerate a sweep's HTML/Markdown report and plots from its
results folder alone (no cache, model or Ray needed), e.g. after copying the folder elsewhere."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "report",
        help="regenerate a sweep's report (report.html, report.md, plots/*.png) from its results folder",
        description="Read a sweep's output folder (results.parquet, and chunks.parquet, tokens.parquet, "
        "pareto.parquet, best.json, sweep.json where present) and write report.html (self-contained: "
        "the plots are embedded), report.md and plots/*.png into it. Prints the report's path.",
    )
    p.add_argument("results_dir", metavar="RESULTS_DIR", help="output folder of a sweep (holds results.parquet)")
    p.add_argument("--open-path-only", action="store_true",
                   help="print only the absolute path of report.html (for `xdg-open \"$(ggufopt report DIR "
                   "--open-path-only)\"` or scripts)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ggufopt_ray.report.html import PLOTS_DIR, write_report

    path = write_report(args.results_dir)
    if args.open_path_only:
        print(path)
        return 0
    plots = sorted(p.name for p in (path.parent / PLOTS_DIR).glob("*.png"))
    print(f"markdown {path.parent / 'report.md'}")
    print(f"plots    {path.parent / PLOTS_DIR}/ ({', '.join(plots) if plots else 'none: no plottable data'})")
    print(f"report   {path}")
    return 0
