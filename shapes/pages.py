"""The HTML the scripts write, in one place: sample.py's document.html, benchmark.py's eval.html,
report.py's report.html and sweep.py's results.html. Plain pages with no package and no script:
every text is escaped here, and images are files named relative to the page.
"""
import html

STYLE = ("body{font-family:sans-serif;max-width:60em;margin:2em auto;line-height:1.4}"
         "table{border-collapse:collapse}td,th{padding:2px 8px;text-align:left;"
         "vertical-align:top;border-bottom:1px solid #ddd}img{image-rendering:pixelated}"
         ".ok{background:#e6f4e6}.no{background:#f8e6e6}"  # a right / a wrong item
         ".doc{max-width:40em;border-top:1px solid #ccc;padding-top:.5em}")


def page(title, body):
    # -> a whole page: `title` (text) and `body`, a list of HTML parts, one after another
    return ('<!DOCTYPE html>\n<html><head><meta charset="utf-8">'
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def table(head, rows, marks=None, escape=True):
    # head: [text]; rows: [[cell]], texts (escaped here) or, with escape=False, HTML already;
    # marks: one class per row ("ok", "no") or None
    cell = html.escape if escape else str
    marks = marks or [None] * len(rows)
    lines = ["<tr>" + "".join(f"<th>{html.escape(str(c))}</th>" for c in head) + "</tr>"]
    lines += [(f'<tr class="{m}">' if m else "<tr>") + "".join(f"<td>{cell(str(c))}</td>" for c in r)
              + "</tr>" for r, m in zip(rows, marks)]
    return "<table>" + "".join(lines) + "</table>"


def proportion(r):
    # a benchmark row {"value", "low", "high"} -> ("0.50", "[0.43, 0.57]"); ("-", "-") for N = 0
    if r["value"] is None:
        return "-", "-"
    return f"{r['value']:.2f}", f"[{r['low']:.2f}, {r['high']:.2f}]"


def rows_table(rows):  # the benchmark's rows: name, N, value, 95% interval
    return table(["", "N", "value", "95% interval"],
                 [[r["name"], r["n"], *proportion(r)] for r in rows])


def document(segments, width=128):
    # [{"text": ...} | {"image": "document_1.png", "seen": [...] (optional)}] -> one paragraph,
    # the pictures `width` pixels wide; "seen", what the benchmark's analyser saw, under each
    parts = []
    for s in segments:
        if "text" in s:
            parts.append(html.escape(s["text"]))
            continue
        parts.append(f'<br><img src="{html.escape(s["image"])}" alt="{html.escape(s["image"])}" '
                     f'width="{width}">')
        if "seen" in s:
            parts.append(f' <small>seen: {html.escape(", ".join(s["seen"]) or "nothing")}</small>')
        parts.append("<br>")
    return '<p class="doc">' + "".join(parts) + "</p>"
