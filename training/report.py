"""The training report: one self-contained HTML file beside the model (`report.html`).

Inline SVG, no script and no plotting library (nothing to install on a worker image, nothing
fetched when it is opened): ROC and precision-recall curves of the model and of the baseline on the
held-out events, score histograms of positives and negatives, feature importance (gain), the
metrics and what the data was.
"""
from __future__ import annotations

from html import escape

import numpy as np

from app.models.evaluate import pr_curve, roc_curve, thin

W, H, PAD = 390, 300, 56
MODEL_COLOUR, BASE_COLOUR, POS_COLOUR, NEG_COLOUR = "#1f6feb", "#d97706", "#c2410c", "#2563eb"


def _xy(x: float, y: float) -> tuple[float, float]:
    return PAD + x * (W - PAD - 12), H - PAD - y * (H - PAD - 16)


def _axes(title: str, xlabel: str, ylabel: str, ytop: float = 1.0) -> list[str]:
    out = [f'<text x="{W / 2}" y="12" text-anchor="middle" class="t">{escape(title)}</text>']
    x0, y0 = _xy(0, 0)
    x1, y1 = _xy(1, 1)
    out.append(f'<rect x="{x0}" y="{y1}" width="{x1 - x0}" height="{y0 - y1}" class="frame"/>')
    for v in (0, 0.25, 0.5, 0.75, 1):
        gx, _ = _xy(v, 0)
        _, gy = _xy(0, v)
        out.append(f'<line x1="{gx}" y1="{y0}" x2="{gx}" y2="{y0 + 4}" class="tick"/>'
                   f'<text x="{gx}" y="{y0 + 15}" text-anchor="middle">{v:g}</text>')
        out.append(f'<line x1="{x0 - 4}" y1="{gy}" x2="{x0}" y2="{gy}" class="tick"/>'
                   f'<text x="{x0 - 6}" y="{gy + 4}" text-anchor="end">{v * ytop:.2g}</text>')
    out.append(f'<text x="{(x0 + x1) / 2}" y="{H - 8}" text-anchor="middle">{escape(xlabel)}</text>')
    out.append(f'<text transform="translate(11,{(y0 + y1) / 2}) rotate(-90)" text-anchor="middle">'
               f'{escape(ylabel)}</text>')
    return out


def _polyline(x: np.ndarray, y: np.ndarray, colour: str, name: str, dashed: bool = False) -> str:
    x, y = thin(np.asarray(x, dtype=float), np.asarray(y, dtype=float))
    pts = " ".join(f"{px:.1f},{py:.1f}" for px, py in (_xy(a, b) for a, b in zip(x, y)))
    dash = ' stroke-dasharray="5,4"' if dashed else ""
    return (f'<polyline class="curve" data-series="{escape(name)}" points="{pts}" fill="none" '
            f'stroke="{colour}" stroke-width="2"{dash}/>')


def _legend(items: list[tuple[str, str]], at: tuple[float, float] = (0.45, 0.28)) -> str:
    out = []
    for k, (label, colour) in enumerate(items):
        x, y = _xy(at[0], at[1] - 0.09 * k)
        out.append(f'<rect x="{x}" y="{y - 8}" width="12" height="4" fill="{colour}"/>'
                   f'<text x="{x + 16}" y="{y - 3}">{escape(label)}</text>')
    return "".join(out)


def _svg(kind: str, body: list[str]) -> str:
    return (f'<svg id="{kind}" xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
            f'viewBox="0 0 {W} {H}">' + "".join(body) + "</svg>")


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.4f}" if isinstance(v, float) else escape(str(v))


def roc_svg(y: np.ndarray, p: np.ndarray, p_base: np.ndarray, auc: float | None, auc_base: float | None) -> str:
    body = _axes("ROC (held out)", "false positive rate", "true positive rate")
    body.append(_polyline(np.array([0, 1]), np.array([0, 1]), "#999", "chance", dashed=True))
    body.append(_polyline(*roc_curve(y, p_base), BASE_COLOUR, "baseline"))
    body.append(_polyline(*roc_curve(y, p), MODEL_COLOUR, "model"))
    body.append(_legend([(f"model AUC {_fmt(auc)}", MODEL_COLOUR), (f"baseline AUC {_fmt(auc_base)}", BASE_COLOUR)]))
    return _svg("roc", body)


def pr_svg(y: np.ndarray, p: np.ndarray, p_base: np.ndarray, ap: float | None, ap_base: float | None) -> str:
    body = _axes("Precision-recall (held out)", "recall", "precision")
    rate = float(y.mean())
    body.append(_polyline(np.array([0, 1]), np.array([rate, rate]), "#999", "positive rate", dashed=True))
    body.append(_polyline(*pr_curve(y, p_base), BASE_COLOUR, "baseline"))
    body.append(_polyline(*pr_curve(y, p), MODEL_COLOUR, "model"))
    items = [(f"model PR-AUC {_fmt(ap)}", MODEL_COLOUR), (f"baseline PR-AUC {_fmt(ap_base)}", BASE_COLOUR)]
    body.append(_legend(items, at=(0.04, 0.2)))
    return _svg("pr", body)


def histogram_svg(kind: str, title: str, y: np.ndarray, p: np.ndarray, bins: int = 40) -> str:
    """Share of each class's held-out events per score bin, positives and negatives overlaid."""
    edges = np.linspace(0, 1, bins + 1)
    series = []
    for label, colour, mask in (("negatives", NEG_COLOUR, y == 0), ("positives", POS_COLOUR, y == 1)):
        counts = np.histogram(np.clip(p[mask], 0, 1), edges)[0].astype(float)
        series.append((label, colour, counts / max(counts.sum(), 1)))
    top = max(float(max(s.max() for _, _, s in series)), 1e-9)
    body = _axes(title, "score", "share of the class's events", ytop=top)
    for label, colour, share in series:
        for b in range(bins):
            if share[b] <= 0:
                continue
            x0, y0 = _xy(edges[b], 0)
            x1, y1 = _xy(edges[b + 1], share[b] / top)
            body.append(f'<rect class="bar" data-series="{label}" x="{x0:.1f}" y="{y1:.1f}" '
                        f'width="{x1 - x0:.1f}" height="{y0 - y1:.1f}" fill="{colour}" fill-opacity="0.5"/>')
    body.append(_legend([(f"{label} (n={int((y == (1 if label == 'positives' else 0)).sum())})", colour)
                         for label, colour, _ in series], at=(0.55, 0.95)))
    return _svg(kind, body)


def importance_svg(names: list[str], gain: np.ndarray, recency: set[str]) -> str:
    share = gain / max(gain.sum(), 1e-12)
    order = np.argsort(-share, kind="mergesort")
    row, left, width = 18, 190, 560
    height = 30 + row * len(names)
    top = max(float(share.max()), 1e-12)
    body = ['<text x="4" y="14" class="t">'
            'Feature importance: share of total gain (recency features dark)</text>']
    for k, i in enumerate(order):
        y = 24 + k * row
        colour = MODEL_COLOUR if names[i] in recency else "#93b4e8"
        body.append(f'<text x="{left - 6}" y="{y + 12}" text-anchor="end">{escape(names[i])}</text>'
                    f'<rect class="bar" data-feature="{escape(names[i])}" x="{left}" y="{y + 2}" '
                    f'width="{(width - left - 50) * share[i] / top:.1f}" height="{row - 5}" fill="{colour}"/>'
                    f'<text x="{left + (width - left - 50) * share[i] / top + 4:.1f}" y="{y + 12}">'
                    f'{share[i]:.1%}</text>')
    return (f'<svg id="importance" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}">' + "".join(body) + "</svg>")


def _table(rows: list[tuple[str, str]]) -> str:
    return "<table>" + "".join(f"<tr><th>{escape(k)}</th><td>{v}</td></tr>" for k, v in rows) + "</table>"


def render(meta: dict, y: np.ndarray, p: np.ndarray, p_base: np.ndarray, gain: np.ndarray) -> str:
    """The whole report for one trained model; `y`, `p`, `p_base` are the held-out labels and
    scores of the model and of the baseline, `gain` the model's per-feature gain."""
    m, src, win = meta["metrics"], meta["source"], meta["window"]
    names = list(meta["features"])
    summary = [
        ("pipeline", escape(meta["pipeline"])),
        ("version", escape(meta.get("version", "(this file's model)"))),
        ("trained at", escape(meta["trained_at"])),
        ("data", escape(src.get("path") or f"topic {src.get('topic')}")),
        ("events", f"{src['events']:,} valid, {src['bad']:,} bad, {src.get('outside_window', 0):,} outside the window"),
        ("event time", f"{escape(win['from'])} .. {escape(win['to'])}; held out from "
                       f"{escape(m['holdout_from'])} ({m['holdout']:.0%})"),
        ("rows", f"{m['events_train']:,} train ({m['positives_train']:,} positive), "
                 f"{m['events_holdout']:,} held out ({m['positives_holdout']:,} positive)"),
        ("AUC", f"model {_fmt(m['auc_holdout'])}, baseline {_fmt(m['auc_baseline_holdout'])}"),
        ("PR-AUC (average precision)", f"model {_fmt(m['pr_auc_holdout'])}, baseline {_fmt(m['pr_auc_baseline_holdout'])}"),
        ("baseline features", escape(", ".join(m["baseline_features"]))),
        ("recency features (left out of the baseline)", escape(", ".join(m["recency_features"]))),
    ]
    for name in ("review", "decline"):
        if name in m:
            t, b = m[name], m[f"baseline_{name}"]
            summary.append((f"at {name} (score >= {t['threshold']})",
                            f"precision {_fmt(t['precision'])}, recall {_fmt(t['recall'])}, flagged {t['flagged']:,}"
                            f" (baseline: {_fmt(b['precision'])} / {_fmt(b['recall'])})"))
    if src.get("bad_samples"):
        summary.append(("first bad records", "<br>".join(escape(s) for s in src["bad_samples"])))
    charts = [roc_svg(y, p, p_base, m["auc_holdout"], m["auc_baseline_holdout"]),
              pr_svg(y, p, p_base, m["pr_auc_holdout"], m["pr_auc_baseline_holdout"]),
              histogram_svg("hist", "Held-out scores: model", y, p),
              histogram_svg("hist-baseline", "Held-out scores: baseline", y, p_base)]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>{escape(meta['pipeline'])} model {escape(meta.get('version', ''))}: training report</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 24px; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 20px; }}
th, td {{ text-align: left; padding: 3px 10px; border-bottom: 1px solid #eee; vertical-align: top; }}
svg {{ font: 11px system-ui, sans-serif; margin: 0 12px 12px 0; }}
svg .t {{ font-weight: 600; font-size: 12px; }}
svg .frame {{ fill: none; stroke: #bbb; }} svg .tick {{ stroke: #888; }}
</style></head><body>
<h1>{escape(meta['pipeline'])} model {escape(meta.get('version', ''))}</h1>
{_table(summary)}
<div>{''.join(charts)}</div>
<div>{importance_svg(names, np.asarray(gain, dtype=float), set(m['recency_features']))}</div>
</body></html>
"""
