"""The outputs of ``cbir eval``: ``eval.json`` (every figure) and ``index.html``, one
self-contained page (plots and images inlined as base64 PNG, no script, no external file)."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from model.atomic import atomic_write  # noqa: E402
from model.data.render import ANATOMY_PALETTE, SEG_PALETTE, grey_rgb, overlay  # noqa: E402
from service.evaluation.figures import SPACE_FIGURES  # noqa: E402
from service.evaluation.protocol import Evaluation  # noqa: E402

CLASS_TO_BRATS = np.array([0, 1, 2, 4], np.uint8)  # model class -> BraTS label (palette index)
METHOD_COLOURS = {"model": "#1f77b4", "pixels": "#ff7f0e", "random": "#7f7f7f",
                  "oracle": "#2ca02c"}
EXAMPLE_ROWS = (("normal", "normal space", "normal_dice"),
                ("abnormal", "abnormal space", "lesion_dice"),
                ("concat", "concat space", "lesion_dice"),
                ("pixels", "raw pixels", "lesion_dice"))
SHOWN = 5  # neighbours per example row


def write_report(evaluation: Evaluation, out_dir: Path) -> tuple[Path, Path]:
    """Write ``eval.json`` and ``index.html`` into ``out_dir`` (each atomically)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out_dir / "eval.json", out_dir / "index.html"
    data = json.dumps(evaluation.result, indent=2).encode()
    atomic_write(json_path, lambda fh: fh.write(data))
    page = render_html(evaluation).encode()
    atomic_write(html_path, lambda fh: fh.write(page))
    return json_path, html_path


# -- pictures ------------------------------------------------------------------------------------


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def bars_plot(space: str, figs: dict, ks: list[int]) -> str | None:
    """One panel per k: each figure's value per method, with its 95 % interval."""
    names = [n for n in SPACE_FIGURES[space] if "at_k" in figs.get(n, {})]
    if not names:
        return None
    methods = list(figs[names[0]]["at_k"][str(ks[0])])
    fig, axes = plt.subplots(1, len(ks), figsize=(4.2 * len(ks), 3.6), sharey=True,
                             squeeze=False)
    width = 0.8 / len(methods)
    x = np.arange(len(names))
    for ax, k in zip(axes[0], ks, strict=True):
        for j, method in enumerate(methods):
            cells = [figs[n]["at_k"][str(k)][method] for n in names]
            values = np.array([c["value"] for c in cells])
            lo = values - np.array([c["ci"][0] for c in cells])
            hi = np.array([c["ci"][1] for c in cells]) - values
            ax.bar(x + (j - (len(methods) - 1) / 2) * width, values, width, label=method,
                   color=METHOD_COLOURS.get(method), yerr=np.clip([lo, hi], 0, None),
                   capsize=2, error_kw={"elinewidth": 0.8})
        ax.set_xticks(x, names, rotation=35, ha="right", fontsize=8)
        ax.set_title(f"{space}, k = {k}", fontsize=10)
        ax.set_ylim(0, 1.05)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(methods), fontsize=8,
               bbox_to_anchor=(0.5, 1.08))
    return _png(fig)


def curves_plot(curves: dict) -> str | None:
    panels = [(space, name, c) for space, per in curves.items() for name, c in per.items()]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(3.8 * len(panels), 3.2), sharey=True,
                             squeeze=False)
    for ax, (space, name, curve) in zip(axes[0], panels, strict=True):
        for method, values in curve.items():
            ks = np.arange(1, len(values) + 1)
            ax.plot(ks, values, marker=".", label=method, color=METHOD_COLOURS.get(method))
        ax.set_title(f"{space}: {name}", fontsize=9)
        ax.set_xlabel("k")
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("precision@k")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=8,
               bbox_to_anchor=(0.5, 1.1))
    return _png(fig)


def _lesion_rgb(image: np.ndarray, classes: np.ndarray) -> np.ndarray:
    return overlay(image, CLASS_TO_BRATS[classes], SEG_PALETTE)


def _tile(ax, rgb: np.ndarray, title: str) -> None:
    ax.imshow(rgb)
    ax.set_title(title, fontsize=7)
    ax.axis("off")


def example_plot(ev: Evaluation, row: int) -> str:
    """One query: per space, the query and its first neighbours, labels overlaid (anatomy in the
    normal space, lesions elsewhere), each titled with its patient:slice and its Dice."""
    q, refs = ev.queries, ev.references
    fig, axes = plt.subplots(len(EXAMPLE_ROWS), SHOWN + 1, figsize=(1.9 * (SHOWN + 1), 8.2),
                             squeeze=False)
    for r, (key, title, score_name) in enumerate(EXAMPLE_ROWS):
        anatomy = key == "normal" and q.anatomy is not None and refs.anatomy is not None
        if anatomy:
            query_rgb = overlay(q.image[row], q.anatomy[row], ANATOMY_PALETTE)
        else:
            query_rgb = _lesion_rgb(q.image[row], q.lesion[row])
        _tile(axes[r][0], query_rgb, f"{title}\nquery {q.patient[row]}:{q.slice_index[row]}")
        scores = ev.scores.get(score_name)
        at = (np.flatnonzero(scores.rows == row) if scores is not None else np.zeros(0, int))
        for c, ref in enumerate(ev.neighbours[key][row][:SHOWN], start=1):
            image = refs.image[ref].astype(np.float32) / 255.0
            rgb = (overlay(image, refs.anatomy[ref], ANATOMY_PALETTE) if anatomy
                   else _lesion_rgb(image, refs.lesion[ref]))
            label = f"{refs.patient[ref]}:{refs.slice_index[ref]}"
            if at.size:
                label += f"\nDice {scores.values[at[0], ref]:.2f}"
            _tile(axes[r][c], rgb, label)
    fig.tight_layout()
    return _png(fig)


def compose_plot(ev: Evaluation) -> str | None:
    if ev.compose_example is None:
        return None
    a, b, composite = ev.compose_example
    q, refs = ev.queries, ev.references
    fig, axes = plt.subplots(1, SHOWN + 3, figsize=(1.9 * (SHOWN + 3), 2.4))
    _tile(axes[0], _lesion_rgb(q.image[a], q.lesion[a]),
          f"A (normal code)\n{q.patient[a]}:{q.slice_index[a]}")
    _tile(axes[1], _lesion_rgb(q.image[b], q.lesion[b]),
          f"B (abnormal code)\n{q.patient[b]}:{q.slice_index[b]}")
    _tile(axes[2], grey_rgb(composite), "decoded pair")
    for c, ref in enumerate(ev.neighbours["compose"][a][:SHOWN], start=3):
        image = refs.image[ref].astype(np.float32) / 255.0
        _tile(axes[c], _lesion_rgb(image, refs.lesion[ref]),
              f"{refs.patient[ref]}:{refs.slice_index[ref]}")
    fig.tight_layout()
    return _png(fig)


def pseudo_normal_plot(ev: Evaluation) -> str | None:
    rows = [r for r in ev.examples if ev.queries.has_lesion[r]]
    if not rows:
        return None
    q, d = ev.queries, ev.drawn
    columns = ["input", "x_hat+", "x_hat- (pseudo-normal)", "twin (truth)",
               "|x_hat- - twin| x 4", "predicted lesion", "true lesion"]
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(1.9 * len(columns),
                                                               2.1 * len(rows)), squeeze=False)
    for i, r in enumerate(rows):
        twin = q.healthy[r] if q.healthy is not None else np.zeros_like(q.image[r])
        tiles = [grey_rgb(q.image[r]), grey_rgb(d.reconstruction[r]),
                 grey_rgb(d.pseudo_normal[r]), grey_rgb(twin),
                 grey_rgb(np.clip(np.abs(d.pseudo_normal[r] - twin) * 4, 0, 1)),
                 _lesion_rgb(q.image[r], d.predicted[r]), _lesion_rgb(q.image[r], q.lesion[r])]
        for c, (tile, title) in enumerate(zip(tiles, columns, strict=True)):
            _tile(axes[i][c], tile, title if i == 0 else "")
        axes[i][0].set_title(f"{columns[0]}\n{q.patient[r]}:{q.slice_index[r]}", fontsize=7)
    fig.tight_layout()
    return _png(fig)


# -- page ----------------------------------------------------------------------------------------


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _cell(c: dict) -> str:
    ci = c.get("ci")
    interval = f" <span class=ci>[{_fmt(ci[0])}, {_fmt(ci[1])}]</span>" if ci else ""
    share = c.get("of_oracle")
    frac = f" <span class=frac>{share:.0%} of oracle</span>" if share is not None else ""
    return f"{_fmt(c['value'])}{interval}{frac}"


def figure_table(space: str, figs: dict, ks: list[int]) -> str:
    head = "".join(f"<th>k = {k}</th>" for k in ks)
    body = []
    for name in SPACE_FIGURES[space]:
        fig = figs[name]
        label = html.escape(fig["label"])
        if "at_k" not in fig:
            body.append(f"<tr><td>{label}</td><td></td><td colspan={len(ks)} class=missing>"
                        f"n/a: {html.escape(fig['missing'])}</td></tr>")
            continue
        methods = list(fig["at_k"][str(ks[0])])
        for j, method in enumerate(methods):
            first = (f"<td rowspan={len(methods)}>{label}<br><span class=n>{fig['queries']} "
                     f"query slices, {fig['patients']} patients</span></td>" if j == 0 else "")
            cells = "".join(f"<td>{_cell(fig['at_k'][str(k)][method])}</td>" for k in ks)
            body.append(f"<tr class={method}>{first}<td>{method}</td>{cells}</tr>")
    return (f"<table data-space={space}><tr><th>figure</th><th>method</th>{head}</tr>"
            + "".join(body) + "</table>")


def model_table(model: dict) -> str:
    rows = []
    for name, v in model.items():
        ci = "" if v["ci"] is None else f"[{_fmt(v['ci'][0])}, {_fmt(v['ci'][1])}]"
        rows.append(f"<tr><td>{html.escape(name)}</td><td>{_fmt(v['value'])}</td><td>{ci}</td>"
                    f"<td>{v['slices']}</td></tr>")
    rows = "".join(rows)
    return ("<table data-part=model><tr><th>figure</th><th>mean</th><th>95% interval</th>"
            f"<th>slices</th></tr>{rows}</table>")


def _img(src: str | None, alt: str) -> str:
    return "" if src is None else f'<img src="{src}" alt="{html.escape(alt)}">'


STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1300px;color:#222}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.85em}
td,th{border:1px solid #ccc;padding:.25em .5em;text-align:left;vertical-align:top}
th{background:#f2f2f2} .ci,.n{color:#777;font-size:.85em} .frac{color:#2a6;font-size:.85em}
tr.oracle td{background:#f4fbf4} .missing{color:#a33} .note{background:#fff4d6;padding:.5em}
img{max-width:100%;display:block;margin:.4em 0} code{font-size:.9em}
"""


def render_html(ev: Evaluation) -> str:
    r = ev.result
    ks = r["k"]
    ck, idx, qs = r["checkpoint"], r["index"], r["queries"]
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>cbir eval: "
             f"{html.escape(ck['preset'])} {ck['weights_sha256'][:12]}</title>"
             f"<style>{STYLE}</style></head><body>",
             "<h1>Retrieval evaluation</h1>",
             f"<p><code>{html.escape(r['command'])}</code></p>"]
    if ck.get("note"):
        parts.append(f"<p class=note>checkpoint note: {html.escape(ck['note'])}</p>")
    parts.append(
        "<table data-part=setup>"
        f"<tr><th>checkpoint</th><td>{html.escape(ck['preset'])}, weights "
        f"<code>{ck['weights_sha256']}</code></td></tr>"
        f"<tr><th>references</th><td>{html.escape(idx['dir'])} (generation "
        f"{idx['generation']}): {idx['patients']} patients, {idx['slices']} slices, "
        f"{r['references']['slices_with_lesion']} with a lesion</td></tr>"
        f"<tr><th>queries</th><td>{', '.join(map(html.escape, qs['cohorts']))}: "
        f"{len(qs['patients'])} patients, {qs['slices']} slices drawn (seed {qs['seed']}, "
        f"at most {qs['max_queries']}), {qs['with_lesion']} with a lesion</td></tr>"
        f"<tr><th>created</th><td>{r['created']}, {r['seconds']['total']:.0f} s</td></tr>"
        "</table>")
    parts.append("<h2>Methods</h2><ul>" + "".join(
        f"<li><b>{m}</b>: {html.escape(t)}</li>" for m, t in r["methods"].items()) + "</ul>"
        "<p>Each figure is the mean over query slices of the mean over a query's k neighbours; "
        "intervals are 95 % bootstrap intervals over query patients.</p>")
    for space in SPACE_FIGURES:
        title = ("compose (normal code of A with abnormal code of B, searched in concat)"
                 if space == "compose" else f"{space} space")
        parts.append(f"<section id=space-{space}><h2>{title}</h2>")
        parts.append(_img(bars_plot(space, r["figures"][space], ks), f"{space} figures"))
        parts.append(figure_table(space, r["figures"][space], ks) + "</section>")
    parts.append("<section id=precision><h2>Precision at k</h2>"
                 + _img(curves_plot(r["precision_curves"]), "precision curves") + "</section>")
    parts.append("<section id=model><h2>The model on the query slices</h2>"
                 "<p>Pseudo-normal x_hat- and the input itself against the lesion-free twin, "
                 "inside the lesion and in the brain outside it; x_hat+ against the input in "
                 "the brain; segmentation Dice per class (slices where truth or prediction has "
                 "the class).</p>" + model_table(r["model"]) + "</section>")
    parts.append("<section id=examples><h2>Example queries</h2>")
    for row in ev.examples:
        parts.append(_img(example_plot(ev, row), f"example {ev.queries.patient[row]}"))
    parts.append("<h3>Composed query</h3>" + _img(compose_plot(ev), "composed query"))
    parts.append("<h3>Pseudo-normal</h3>" + _img(pseudo_normal_plot(ev), "pseudo-normal"))
    parts.append("</section></body></html>")
    return "\n".join(parts)
