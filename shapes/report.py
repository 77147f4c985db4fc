"""The main job's report: one HTML page to look at after `python train.py && python sample.py --eval`.

    python -m shapes.report               # out/toy (the curriculum) + out/samples (the benchmark)
    python -m shapes.report --run out/toy --eval out/samples --out out/samples/report.html

It shows the loss curves of every stage (read from each run's metrics.jsonl, drawn as inline SVG: no
plotting package), the benchmark's table with its intervals (eval.json), its grids and one of its
documents. Where the project has run the same preset (docs/reference/<preset>/), each chart carries
our run's curves dashed, and the table our run's row and the range of our runs beside yours: is your
run a normal one? Beside report.html, summary.png: the held-out drawings, a document and the
curves in one picture (the README shows ours). Every run of train.py appends its logged steps to
<run>/metrics.jsonl:
{"stage", "step", "loss", "lm", "diffusion", "anchor", "lr", "steps_per_s", "seconds"}.
"""
import html
import json
import math
import os
from pathlib import Path

from PIL import Image, ImageDraw

from plumbing import cli
from plumbing.cli import Stop
from shapes import pages

COLOURS = {"lm": "#1f77b4", "diffusion": "#d62728", "align": "#9467bd", "anchor": "#2ca02c"}  # one per loss, everywhere
GRIDS = [("Held-out single shapes", "eval_grid.png"), ("Two shapes", "eval_two_shapes.png")]
REFERENCE = Path(__file__).resolve().parent.parent / "docs" / "reference"  # our runs of each preset


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


def svg_curves(series, title, width=420, height=220, reference=None):
    # {name: [(step, value)]} -> an SVG line chart, the values on a log scale (losses span decades);
    # reference: the same for our run of the stage, each loss's running mean dashed beside the run's
    reference = reference or {}
    points = [(x, y) for pts in [*series.values(), *reference.values()] for x, y in pts
              if y > 0 and math.isfinite(y)]
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
    for name, pts in reference.items():
        pts = [(x, y) for x, y in pts if y > 0 and math.isfinite(y)]
        if pts:
            mean = smooth(pts, max(1, len(pts) // 20))
            out.append(f'<polyline fill="none" stroke="{COLOURS.get(name, "#555")}" '
                       f'stroke-dasharray="4 3" points="{" ".join(px(x, y) for x, y in mean)}"/>')
    if any(reference.values()):
        out.append(f'<text x="{width - right}" y="{height - 18}" text-anchor="end" fill="#555">'
                   "dashed: our reference run</text>")
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


def losses(metrics):  # {step: record} -> {loss: [(step, value)]}, the losses ever above 0
    series = {k: [(s, r[k]) for s, r in metrics.items() if k in r] for k in COLOURS}
    return {k: points for k, points in series.items() if any(y > 0 for _, y in points)}


def curves_html(run, reference=None):
    # a chart per stage; reference: our run's folder of the preset (docs/reference/<preset>/<stage>/)
    charts = []
    for folder in stage_folders(run):
        metrics = read_metrics(folder)
        if not metrics:
            continue
        last = list(metrics.values())[-1]
        stage = last.get("stage", folder.name)
        ours = losses(read_metrics(reference / stage)) if reference else {}
        title = f"stage {stage}: {last['step']} steps, {last.get('seconds', 0) / 60:.1f} min"
        charts.append(svg_curves(losses(metrics), title, reference=ours))
    return "\n".join(charts) or "<p>no metrics.jsonl found</p>"


def beside_ours(rows, reference, stage):
    # the benchmark's rows beside our runs of the same stage (docs/reference/<preset>/eval.json: "rows",
    # our reference run's, and "runs", each row's value in each of our runs) ->
    # [(row, our reference run's value, lowest and highest of our runs, outside them)], n runs
    ours = json.loads((reference / "eval.json").read_text(encoding="utf-8"))
    value = {r["name"]: r["value"] for r in ours.get("rows", {}).get(stage, [])}
    runs = ours.get("runs", {}).get(stage, {})
    out = []
    for r in rows:
        seen = [v for v in runs.get(r["name"], []) if v is not None]
        lo, hi = (min(seen), max(seen)) if seen else (None, None)
        outside = bool(seen) and r["value"] is not None and not lo - 1e-9 <= r["value"] <= hi + 1e-9
        out.append((r, value.get(r["name"]), lo, hi, outside))
    return out, max((len(v) for v in runs.values()), default=0)


def unlike_ours(report, reference):
    # the benchmark's settings where this eval.json's differ from those our runs were measured
    # with (docs/reference/<preset>/eval.json: "settings"), e.g. ["images 4 (ours 16)"]: its rows are
    # then other items, or fewer, and our runs' range only a guide
    ours = json.loads((reference / "eval.json").read_text(encoding="utf-8")).get("settings")
    if not ours:
        return []
    flat = lambda d: {"seed": d.get("seed"), **d.get("sampling", {}), **d.get("sizes", {})}
    theirs, ours = flat(report), flat(ours)
    return [f"{k} {theirs.get(k)} (ours {v})" for k, v in ours.items() if theirs.get(k) != v]


def compared_table(report, reference, stage):  # beside_ours as a table, a row outside shaded
    compared, n = beside_ours(report.get("rows", []), reference, stage)
    unlike = unlike_ours(report, reference)
    cells = [[r["name"], r["n"], *pages.proportion(r), "-" if ours is None else f"{ours:.2f}",
              "-" if lo is None else f"{lo:.2f} to {hi:.2f}"] for r, ours, lo, hi, _ in compared]
    shown = os.path.relpath(reference / "eval.json")  # docs/reference/toy/eval.json, from the repo
    caveat = (f" This benchmark ran otherwise than ours ({', '.join(unlike)}): the range is a "
              "guide, not a test." if unlike else "")
    return (f"<p>Beside it, stage {html.escape(stage)} of our reference run ({html.escape(shown)}) "
            f"and the lowest and highest of our {n} runs of it (other seeds and thread counts; the "
            f"README says which); a row outside them is shaded.{html.escape(caveat)}</p>"
            + pages.table(["", "N", "value", "95% interval", "ours", f"our {n} runs"], cells,
                          ["no" if outside else None for *_, outside in compared]))


def benchmarked(report):
    # eval.json -> the config.json of the checkpoint it benchmarked ({} if it is not one here)
    try:
        return json.loads((Path(str(report.get("model", ""))) / "config.json").read_text("utf-8"))
    except (OSError, ValueError):
        return {}


def ours_for(run, report, references=REFERENCE):
    # -> (docs/reference/<preset>/, the stage benchmarked): our runs to set this one beside, the preset
    # the benchmarked checkpoint's (else the curriculum's); (None, stage) where we have none
    config, listing = benchmarked(report or {}), Path(run) / "curriculum.json"
    preset = config.get("preset") or (json.loads(listing.read_text(encoding="utf-8")).get("preset")
                                      if listing.is_file() else None)
    reference = Path(references) / preset if preset else None
    return (reference if reference and (reference / "eval.json").is_file() else None,
            config.get("stage"))


def summary(run, evaluation, references=REFERENCE):
    # one line for the terminal: which of the benchmark's rows lie outside our runs' range
    report = json.loads((Path(evaluation) / "eval.json").read_text(encoding="utf-8"))
    reference, stage = ours_for(run, report, references)
    if reference is None or stage is None:
        return None
    compared, n = beside_ours(report.get("rows", []), reference, stage)
    outside = [f"{r['name']} {r['value']:.2f} (ours {lo:.2f} to {hi:.2f})"
               for r, _, lo, hi, out in compared if out]
    unlike = unlike_ours(report, reference)
    return (f"beside our {n} runs of stage {stage} ({os.path.relpath(reference / 'eval.json')}): "
            + ("every row within their range" if not outside else
               f"{len(outside)} rows outside their range: " + "; ".join(outside))
            + (f" (run otherwise than ours: {', '.join(unlike)}; a guide, not a test)" if unlike
               else ""))


def write(run, evaluation, out, references=REFERENCE):
    # run: a curriculum's (or a run's) folder; evaluation: the benchmark's folder (eval.json, its
    # PNGs, documents); out: the report's path, inside that folder so the images' paths hold;
    # references: where our runs of each preset are, to compare with (<references>/<preset>/)
    run, evaluation, out = Path(run), Path(evaluation), Path(out)
    if not run.is_dir():
        raise Stop(f"--run {run}: no such folder; train with `python train.py` first")
    report_file = evaluation / "eval.json"
    report = json.loads(report_file.read_text(encoding="utf-8")) if report_file.is_file() else None
    reference, stage = ours_for(run, report, references)
    body = ["<h1>DreamLLM on the shapes world</h1>", "<h2>Training: the losses per stage</h2>",
            curves_html(run, reference)]
    if report is not None:
        body += ["<h2>The toy benchmark</h2>", compared_table(report, reference, stage)
                 if reference and stage else pages.rows_table(report.get("rows", []))]
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
    if report is not None:
        summary_png(run, evaluation, report, out.parent / "summary.png")
    return out


def summary_png(run, evaluation, report, out, width=1100):
    # One picture of what the main job gives, for the README: the held-out prompts' drawings
    # (the benchmark's held_out.png), the first document it wrote, and each stage's loss curves
    # (running means, log scale), drawn with Pillow
    panels = []
    if (evaluation / "held_out.png").is_file():
        panels.append(Image.open(evaluation / "held_out.png").convert("RGB"))
    for document in report.get("details", {}).get("documents", [])[:1]:
        panels.append(document_png(evaluation, document))
    charts = [chart_png(read_metrics(folder), folder.name) for folder in stage_folders(run)
              if read_metrics(folder)]
    top = max([p.height for p in panels], default=0)
    width = max(width, 8 + sum(p.width + 16 for p in panels))
    canvas = Image.new("RGB", (width, 24 + top + (200 if charts else 0) + 10), "white")
    pen = ImageDraw.Draw(canvas)
    pen.text((8, 6), "Held-out prompts, drawn", fill="black")
    x = 8
    for i, panel in enumerate(panels):
        if i:
            pen.text((x, 6), "A document it wrote", fill="black")
        canvas.paste(panel, (x, 22))
        x += panel.width + 16
    for i, chart in enumerate(charts):
        canvas.paste(chart, (8 + i * (width - 16) // max(4, len(charts)), 24 + top))
    canvas.save(out, optimize=True)
    return out


def document_png(evaluation, document, width=300, scale=2):
    # a document's segments as a column: its opening in bold, text wrapped, pictures scaled up
    lines = [("b", document.get("opening", ""))]
    for seg in document.get("segments", []):
        lines += [("img", seg["image"])] if "image" in seg else [("t", seg.get("text", ""))]
    canvas = Image.new("RGB", (width, 600), "white")
    pen, y = ImageDraw.Draw(canvas), 0
    for kind, value in lines:
        if kind == "img" and (evaluation / value).is_file():
            im = Image.open(evaluation / value).convert("RGB")
            canvas.paste(im.resize((im.width * scale, im.height * scale), Image.NEAREST), (0, y + 2))
            y += im.height * scale + 6
            continue
        words, line = value.split(), ""
        for word in words + [None]:  # wrap at the panel's width
            if word is None or pen.textlength(f"{line} {word}".strip()) > width - 4:
                pen.text((0, y), line, fill="black" if kind == "b" else "dimgray")
                y, line = y + 13, word or ""
            else:
                line = f"{line} {word}".strip()
    return canvas.crop((0, 0, width, min(600, y + 4)))


def chart_png(metrics, stage, width=260, height=190, pad=34):
    # one stage's losses, running means on a log scale, each in its COLOURS colour
    series = {k: smooth(v, max(1, len(v) // 20)) for k, v in losses(metrics).items()}
    points = [(x, y) for v in series.values() for x, y in v if y > 0 and math.isfinite(y)]
    canvas = Image.new("RGB", (width, height), "white")
    pen = ImageDraw.Draw(canvas)
    pen.text((pad, 2), f"stage {stage}", fill="black")
    if not points:
        return canvas
    x0, x1 = min(x for x, _ in points), max(x for x, _ in points)
    y0 = math.floor(math.log10(min(y for _, y in points)))
    y1 = max(y0 + 1, math.ceil(math.log10(max(y for _, y in points))))
    px = lambda x, y: (pad + (x - x0) / max(1, x1 - x0) * (width - pad - 6),
                       18 + (y1 - math.log10(y)) / (y1 - y0) * (height - 36))
    for e in range(y0, y1 + 1):  # a grid line per decade
        v = px(x0, 10.0 ** e)[1]
        pen.line([(pad, v), (width - 6, v)], fill="#ddd")
        pen.text((2, v - 6), f"1e{e}", fill="gray")
    pen.text((pad, height - 14), f"step {x0}", fill="gray")
    pen.text((width - 60, height - 14), f"{x1}", fill="gray")
    for i, (name, pts) in enumerate(series.items()):
        pts = [px(x, y) for x, y in pts if y > 0 and math.isfinite(y)]
        if len(pts) > 1:
            pen.line(pts, fill=COLOURS.get(name, "#555"), width=2)
        pen.text((width - 80, 18 + 12 * i), name, fill=COLOURS.get(name, "#555"))
    return canvas


def main(argv=None):
    p = cli.Parser(prog="python -m shapes.report", description="Write report.html: the loss "
                   "curves per stage, the benchmark's table, grids and a document.",
                   formatter_class=cli.Help)
    p.add_argument("--run", default="out/toy", help="the curriculum's folder (or one run's)")
    p.add_argument("--eval", default="out/samples", help="the benchmark's folder (eval.json)")
    p.add_argument("--out", help="the page (default: report.html in the --eval folder)")
    args = p.parse_args(argv)

    def report():
        print(f"wrote {write(args.run, args.eval, args.out or Path(args.eval) / 'report.html')}")
        if (Path(args.eval) / "eval.json").is_file() and (line := summary(args.run, args.eval)):
            print(line)
    cli.main(report, "python -m shapes.report")


if __name__ == "__main__":
    main()
