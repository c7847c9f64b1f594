"""report.html from results.json: the SIM paper's table layout (model, steps, metric mean ± standard error) and a
grid of the same prompts and seeds side by side, one column per model. Plain HTML and CSS, no script; images are
linked relative to the report, so the folder can be moved or zipped as a whole."""

from __future__ import annotations

import html
import math
import os

# Table of the SIM paper (Luo et al., 2024) for PixArt-alpha at 512 px; prompt set not stated; PickScore as cosine.
SIM_PAPER_TABLE = [
    {"label": "SIM-DiT-600M", "steps": 1, "aesthetic": 6.42, "imagereward": 0.67, "pickscore": 0.223},
    {"label": "PixArt-\u03b1", "steps": 30, "aesthetic": 5.97, "imagereward": 0.82, "pickscore": 0.226},
]
DECIMALS = {"aesthetic": 2, "imagereward": 2, "pickscore": 3, "clip_score": 2, "fid": 2}

STYLE = """
:root { --ink: #1d2330; --muted: #687082; --line: #e3e6ee; --paper: #ffffff; --wash: #f5f6fa; --accent: #2f5bd3; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--ink);
       background: var(--wash); }
main { max-width: 1400px; margin: 0 auto; padding: 2rem 1.5rem 3rem; }
h1 { font-size: 1.6rem; margin: 0 0 .25rem; }
h2 { font-size: 1.15rem; margin: 2.2rem 0 .8rem; }
.meta, .notes, .path, figcaption, .seed { color: var(--muted); }
.meta { margin: 0; }
.card { background: var(--paper); border: 1px solid var(--line); border-radius: 10px; padding: 1rem 1.2rem; }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
th, td { padding: .55rem .8rem; text-align: right; border-bottom: 1px solid var(--line); white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
thead th { font-size: .8rem; text-transform: uppercase; letter-spacing: .04em; color: var(--muted); }
tbody tr:last-child td { border-bottom: none; }
td .pm { color: var(--muted); font-size: .85em; }
td.best { font-weight: 700; color: var(--accent); }
.path { font-size: .78rem; max-width: 28rem; overflow: hidden; text-overflow: ellipsis; }
table.paper { width: auto; }
table.paper td, table.paper th { color: var(--muted); padding-left: 2rem; }
.notes { font-size: .85rem; margin: .8rem 0 0; padding-left: 1.1rem; }
.grid { display: grid; gap: .8rem 1rem; align-items: start; justify-content: start; }
.grid .col-head { font-weight: 600; text-align: center; position: sticky; top: 0; background: var(--wash);
                  padding: .4rem 0; z-index: 1; }
.grid .prompt { font-size: .9rem; padding-top: .3rem; }
.seed { font-size: .75rem; }
figure { margin: 0; }
figure img { display: block; width: 100%; height: auto; border-radius: 8px; background: var(--line);
             image-rendering: auto; }
figcaption { font-size: .75rem; margin-top: .25rem; text-align: center; font-variant-numeric: tabular-nums; }
"""


def _fmt(value, decimals):
    return "\u2013" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{decimals}f}"


def _metric_cell(summary: dict | None, decimals: int, best: bool) -> str:
    if summary is None:
        return "<td>\u2013</td>"
    cls = ' class="best"' if best else ""
    if "value" in summary:  # set-level metric (FID)
        return f"<td{cls}>{_fmt(summary['value'], decimals)}</td>"
    sem = summary.get("sem")
    pm = f' <span class="pm">\u00b1 {_fmt(sem, decimals)}</span>' if sem is not None else ""
    return f"<td{cls}>{_fmt(summary['mean'], decimals)}{pm}</td>"


def _best_models(models: list[dict], metric: dict) -> set[int]:
    """Models whose value, as displayed, is the best of the column (ties all win; none with a single model)."""
    decimals = DECIMALS.get(metric["name"], 3)
    values = {}
    for i, model in enumerate(models):
        summary = model["summary"].get(metric["name"])
        if summary is not None:
            values[i] = round(summary["value"] if "value" in summary else summary["mean"], decimals)
    if len(values) < 2:
        return set()
    best = (max if metric["higher_is_better"] else min)(values.values())
    return {i for i, value in values.items() if value == best}


def metrics_table(results: dict) -> str:
    metrics, models = results["metrics"], results["models"]
    arrows = {True: "\u2191", False: "\u2193"}
    head = "".join(f"<th>{html.escape(m['display_name'])} {arrows[m['higher_is_better']]}</th>" for m in metrics)
    best = {m["name"]: _best_models(models, m) for m in metrics}
    rows = []
    for i, model in enumerate(models):
        cells = "".join(
            _metric_cell(model["summary"].get(m["name"]), DECIMALS.get(m["name"], 3), i in best[m["name"]])
            for m in metrics
        )
        guidance = "\u2013" if model["guidance_scale"] is None else f"{model['guidance_scale']:g}"
        rows.append(
            f'<tr><td>{html.escape(model["label"])}<div class="path">{html.escape(model["path"])}</div></td>'
            f"<td>{model['steps']}</td><td>{guidance}</td>{cells}"
            f"<td>{_fmt(model.get('seconds_per_image'), 3)}</td></tr>"
        )
    return (
        '<table id="metrics"><thead><tr><th>Model</th><th>Steps</th><th>CFG</th>'
        f"{head}<th>s / image</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def paper_table(results: dict) -> str:
    names = [m["name"] for m in results["metrics"] if any(m["name"] in row for row in SIM_PAPER_TABLE)]
    if not names:
        return ""
    display = {m["name"]: m["display_name"] for m in results["metrics"]}
    head = "".join(f"<th>{html.escape(display[n])}</th>" for n in names)
    rows = "".join(
        f"<tr><td>{html.escape(row['label'])}</td><td>{row['steps']}</td>"
        + "".join(f"<td>{_fmt(row[n], DECIMALS.get(n, 3))}</td>" for n in names)
        + "</tr>"
        for row in SIM_PAPER_TABLE
    )
    return (
        '<h2>Reported in the SIM paper</h2><div class="card"><table class="paper" id="paper"><thead><tr>'
        f"<th>Model</th><th>Steps</th>{head}</tr></thead><tbody>{rows}</tbody></table>"
        '<ul class="notes"><li>PixArt-\u03b1 512 px; the paper does not state its prompt set, so compare trends, '
        "not digits.</li></ul></div>"
    )


def image_grid(results: dict) -> str:
    models, samples = results["models"], results["samples"][: results["config"].get("grid_size", 12)]
    per_image = [m for m in results["metrics"] if m["per_image"]]
    cells = ['<div class="col-head"></div>'] + [
        f'<div class="col-head">{html.escape(m["label"])}</div>' for m in models
    ]
    for sample in samples:
        i = sample["index"]
        cells.append(
            f'<div class="prompt">{html.escape(sample["prompt"])}<div class="seed">#{i} \u00b7 seed {sample["seed"]}'
            "</div></div>"
        )
        for model in models:
            scores = " \u00b7 ".join(
                f"{m['short_name']} {model['scores'][m['name']][i]:.{DECIMALS.get(m['name'], 3)}f}"
                for m in per_image
                if m["name"] in model["scores"]
            )
            alt = html.escape(f"{model['label']}: {sample['prompt']}", quote=True)
            src = html.escape(model["images"][i], quote=True)
            cells.append(
                f'<figure><a href="{src}"><img src="{src}" alt="{alt}" loading="lazy"></a>'
                f"<figcaption>{html.escape(scores)}</figcaption></figure>"
            )
    columns = f"minmax(10rem, 16rem) repeat({len(models)}, minmax(0, 20rem))"
    return f'<div class="grid" id="samples" style="grid-template-columns: {columns}">{"".join(cells)}</div>'


def render_report(results: dict) -> str:
    config = results["config"]
    notes = "".join(
        f'<li>{html.escape(m["note"])} <span class="path">Weights: {html.escape(str(m["weights"]))}</span></li>'
        for m in results["metrics"]
    )
    notes += "<li>Mean \u00b1 standard error of the mean over samples; best value per column in bold.</li>"
    notes += (
        "<li>s / image: generation time per image at the given batch size, text encoding and VAE decoding "
        "included, first (warm-up) batch excluded.</li>"
    )
    meta = (
        f"{len(results['samples'])} samples \u00b7 seed {config['seed']} \u00b7 captions: "
        f"{html.escape(os.path.basename(config['captions']))} \u00b7 {html.escape(config['device'])}, "
        f"{html.escape(config['dtype'])} \u00b7 {html.escape(results['created'])}"
    )
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(results["title"])}</title>
<style>{STYLE}</style>
</head>
<body>
<main>
<h1>{html.escape(results["title"])}</h1>
<p class="meta">{meta}</p>
<h2>Metrics</h2>
<div class="card">{metrics_table(results)}<ul class="notes">{notes}</ul></div>
{paper_table(results)}
<h2>Samples: same prompt and seed across models</h2>
{image_grid(results)}
<p class="meta" style="margin-top:2rem">All numbers and per-image scores: <a href="results.json">results.json</a></p>
</main>
</body>
</html>
"""


def write_report(results: dict, path: str | os.PathLike) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(render_report(results))
