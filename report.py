"""The main job's report: one HTML page to look at after `python train.py && python sample.py --eval`.

    python report.py                      # out/toy (the curriculum) + out/samples (the benchmark)
    python report.py --run out/toy --eval out/samples --out out/samples/report.html

It shows the loss curves of every stage (read from each run's metrics.jsonl, drawn as inline SVG:
no plotting package), the benchmark's table with its intervals (eval.json), its grids and one of
its documents. Every run of train.py appends its logged steps to <run>/metrics.jsonl:
{"stage", "step", "loss", "lm", "diffusion", "anchor", "lr", "steps_per_s", "seconds"}.
"""
import html
import json
import math
from pathlib import Path

import cli
import pages
from cli import Stop

COLOURS = {"lm": "#1f77b4", "diffusion": "#d62728", "align": "#9467bd", "anchor": "#2ca02c"}  # one per loss, everywhere
GRIDS = [("Held-out single shapes", "eval_grid.png"), ("Two shapes", "eval_two_shapes.png")]


def read_metrics(folder):
    # a run's metrics.jsonl -> {step: record}; a resumed run logs a step twice: the last one counts
    path = Path(folder) / "metrics.jsonl"
    records = {}
    for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
            records[int(record["step"])] = record
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a crash: the rest still draw
    return dict(sorted(records.items()))


def svg_curves(series, title, width=420, height=220):
    # {name: [(step, value)]} -> an SVG line chart, the values on a log scale (losses span decades)
    points = [(x, y) for pts in series.values() for x, y in pts if y > 0 and math.isfinite(y)]
    if not points:
        return f"<p>{html.escape(title)}: nothing logged</p>"
    left, right, top, bottom = 48, 10, 22, 28  # margins, pixels
    x0, x1 = min(x for x, _ in points), max(x for x, _ in points)
    y0, y1 = (math.log10(f(y for _, y in points)) for f in (min, max))
    y0, y1 = math.floor(y0), math.ceil(y1) if math.ceil(y1) > math.floor(y0) else math.floor(y0) + 1

    def px(x, y):  # data -> pixel coordinates
        u = left + (x - x0) / max(1, x1 - x0) * (width - left - right)
        v = top + (y1 - math.log10(y)) / (y1 - y0) * (height - top - bottom)
        return f"{u:.1f},{v:.1f}"
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="11">',
           f'<text x="{left}" y="14" font-weight="bold">{html.escape(title)}</text>']
    for e in range(y0, y1 + 1):  # a grid line per decade
        v = px(x0, 10.0 ** e).split(",")[1]
        out.append(f'<line x1="{left}" x2="{width - right}" y1="{v}" y2="{v}" stroke="#ddd"/>'
                   f'<text x="{left - 4}" y="{v}" text-anchor="end" dy="4">1e{e}</text>')
    out.append(f'<text x="{left}" y="{height - 8}">step {x0}</text>'
               f'<text x="{width - right}" y="{height - 8}" text-anchor="end">{x1}</text>')
    for i, (name, pts) in enumerate(series.items()):
        pts = [(x, y) for x, y in pts if y > 0 and math.isfinite(y)]
        if pts:  # a logged step is one batch's loss: faint, under its running mean over ~5%
            colour, mean = COLOURS.get(name, "#555"), smooth(pts, max(1, len(pts) // 20))
            for line, style in ((pts, 'stroke-opacity="0.25"'), (mean, 'stroke-width="1.5"')):
                out.append(f'<polyline fill="none" stroke="{colour}" {style} '
                           f'points="{" ".join(px(x, y) for x, y in line)}"/>')
            out.append(f'<text x="{width - right - 110}" y="{top + 12 + 13 * i}" '
                       f'fill="{colour}">{html.escape(name)} {mean[-1][1]:.4f} (mean)</text>')
    return "\n".join(out + ["</svg>"])


def smooth(points, k):  # [(x, y)] -> the mean of each point's last k values (fewer at the start)
    ys = [y for _, y in points]
    return [(x, sum(ys[max(0, i - k + 1):i + 1]) / (i + 1 - max(0, i - k + 1)))
            for i, (x, _) in enumerate(points)]


def stage_folders(run):
    # a curriculum's folder -> its stages' run folders, in order; a single run's folder -> itself
    listing = Path(run) / "curriculum.json"
    if listing.is_file():
        stages = json.loads(listing.read_text(encoding="utf-8")).get("stages", [])
        return [Path(run) / s for s in stages if (Path(run) / s).is_dir()]
    return [Path(run)]


def curves_html(run):
    charts = []
    for folder in stage_folders(run):
        metrics = read_metrics(folder)
        if not metrics:
            continue
        last = list(metrics.values())[-1]
        series = {k: [(s, r[k]) for s, r in metrics.items() if k in r] for k in COLOURS}
        series = {k: points for k, points in series.items() if any(y > 0 for _, y in points)}
        title = (f"stage {last.get('stage', folder.name)}: {last['step']} steps, "
                 f"{last.get('seconds', 0) / 60:.1f} min")
        charts.append(svg_curves(series, title))
    return "\n".join(charts) or "<p>no metrics.jsonl found</p>"


def write(run, evaluation, out):
    # run: a curriculum's (or a run's) folder; evaluation: the benchmark's folder (eval.json, its
    # PNGs, documents); out: the report's path, inside that folder so the images' paths hold
    run, evaluation, out = Path(run), Path(evaluation), Path(out)
    if not run.is_dir():
        raise Stop(f"--run {run}: no such folder; train with `python train.py` first")
    body = ["<h1>DreamLLM on the shapes world</h1>", "<h2>Training: the losses per stage</h2>",
            curves_html(run)]
    report_file = evaluation / "eval.json"
    if report_file.is_file():
        report = json.loads(report_file.read_text(encoding="utf-8"))
        body += ["<h2>The toy benchmark</h2>", pages.rows_table(report.get("rows", []))]
        for title, name in GRIDS:  # their files: relative to the evaluation folder
            if (evaluation / name).is_file():
                body.append(f'<h3>{title}</h3><img src="{name}" alt="{title}">')
        for document in report.get("details", {}).get("documents", [])[:1]:
            body += ["<h3>A document it wrote</h3>",
                     f"<p><b>{html.escape(document.get('opening', ''))}</b></p>",
                     pages.document(document.get("segments", []))]
        body.append('<p>Every image, answer and document: <a href="eval.html">eval.html</a></p>')
    page = pages.page("DreamLLM report", body)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out


def main(argv=None):
    p = cli.Parser(description="Write report.html: the loss curves per stage, the benchmark's "
                   "table, grids and a document.", formatter_class=cli.Help)
    p.add_argument("--run", default="out/toy", help="the curriculum's folder (or one run's)")
    p.add_argument("--eval", default="out/samples", help="the benchmark's folder (eval.json)")
    p.add_argument("--out", help="the page (default: report.html in the --eval folder)")
    args = p.parse_args(argv)
    cli.main(lambda: print(f"wrote {write(args.run, args.eval, args.out or Path(args.eval) / 'report.html')}"),
             "report.py")


if __name__ == "__main__":
    main()
