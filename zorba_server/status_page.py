"""GET /: a small read-only HTML page for people (no scripts, reloads itself)."""

from __future__ import annotations

import html
from typing import Any

WIDTH, HEIGHT, PAD = 600, 160, 24


def render(status: dict[str, Any]) -> str:
    e = html.escape
    rounds = status["rounds"]
    current = status["current_round"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        "<meta http-equiv='refresh' content='10'><title>zorba-server</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}"
        ".cov{display:inline-block;width:14px;margin:1px;text-align:center;font-size:10px}</style>",
        "</head><body>",
        f"<h1>zorba-server: run {e(status['run_id'])}</h1>",
        f"<p>model {e(str(status['model_fingerprint']))} &middot; {status['num_blocks']} blocks "
        f"&middot; pool K={status['pool_size']} &middot; alpha version {status['version']}"
        f"{' &middot; <b>finished</b>' if status['finished'] else ''}</p>",
        f"<p>state: {e(status['state'])}</p>",
        "<p>run: " + " &middot; ".join(f"{e(k)} {e(str(v))}" for k, v in status["hyper"].items())
        + "</p>",
    ]
    if current is not None:
        final = (f": the final check of version {current['base_version']}"
                 if current.get("final_check") else "")
        parts.append(
            f"<h2>Round {current['round']}{final}</h2><p>{current['reported']} of {current['assigned']} "
            f"reports ({current['pending']} committing), deadline in "
            f"{current['deadline_in_s']:.0f} s, schedule by {e(current['schedule_method'])}</p>"
        )
        if current["excluded"]:
            parts.append("<p>left out: " + "; ".join(
                f"{e(cid)}: {e(why)}" for cid, why in current["excluded"].items()) + "</p>")
    parts.append("<h2>Block coverage (clients per block)</h2><p>")
    for b, n in enumerate(status["block_coverage"]):
        shade = "#cfc" if n else "#fcc"
        parts.append(f"<span class='cov' style='background:{shade}' title='block {b}'>{n}</span>")
    parts.append("</p>")
    parts.append(energy_html(status.get("block_energy", {})))
    parts.append(signal_html(status.get("block_signal", {})))
    parts.append("<h2>Loss</h2>")
    parts.append(loss_svg([(r["round"], r["loss"]) for r in rounds if r["loss"] is not None]))
    parts.append("<h2>Clients</h2><table><tr><th>id</th><th>name</th><th>device</th>"
                 "<th>budget MiB</th><th>samples</th><th>blocks</th><th>step s</th>"
                 "<th>calibration</th><th>reports</th><th>last loss</th><th>last peak MiB</th>"
                 "<th>peak / budget</th><th>last round KiB up / down</th><th>loss guard</th>"
                 "<th>seen s ago</th></tr>")
    for c in status["clients"]:
        loss = "" if c["last_loss"] is None else f"{c['last_loss']:.4f}"
        peak = f"{c['last_peak_bytes'] / 2**20:.0f}" if c["last_peak_bytes"] else ""
        share = "" if c["peak_over_budget"] is None else f"{c['peak_over_budget']:.0%}"
        wire = ("" if c["last_round_bytes_up"] is None else
                f"{c['last_round_bytes_up'] / 1024:.1f} / {c['last_round_bytes_down'] / 1024:.1f}")
        guard = ("quarantined" if c["guard_quarantined"] else
                 f"{c['guard_outlier_rounds']} implausible" if c["guard_outlier_rounds"] else "")
        parts.append(
            f"<tr{'' if c['active'] else ' style=color:#999'}><td>{e(c['client_id'])}</td>"
            f"<td>{e(c['name'])}</td><td>{e(c['device'])}</td>"
            f"<td>{c['budget_bytes'] / 2**20:.0f}</td><td>{c['num_samples']}</td>"
            f"<td>{e(','.join(map(str, c['blocks'])))}</td><td>{c['step_time_s']:.3f}</td>"
            f"<td>{c['calibration']:.2f}</td><td>{c['rounds_reported']}</td><td>{loss}</td>"
            f"<td>{peak}</td><td>{share}</td><td>{wire}</td><td>{guard}</td>"
            f"<td>{'left' if c['left'] else format(c['last_seen_s'], '.0f')}</td></tr>")
    parts.append("</table><h2>Rounds (latest 50)</h2><table><tr><th>round</th><th>status</th>"
                 "<th>reports</th><th>loss</th><th>schedule</th><th>note</th></tr>")
    for r in reversed(rounds[-50:]):
        loss = "" if r["loss"] is None else f"{r['loss']:.4f}"
        parts.append(f"<tr><td>{r['round']}</td><td>{e(r['status'])}</td>"
                     f"<td>{r['reports']}/{r['assigned']}</td><td>{loss}</td>"
                     f"<td>{e(r['schedule_method'])}</td><td style='text-align:left'>"
                     f"{e(r['message'])}</td></tr>")
    parts.append("</table><p><a href='/v1/status'>JSON</a> &middot; <a href='/metrics'>metrics</a>"
                 "</p></body></html>")
    return "".join(parts)


def energy_html(energy: dict[str, Any]) -> str:
    """Each block's estimated gradient energy E[g_b^2], as a share of the largest (a bar)."""
    values = energy.get("e_g2") or []
    if not values or max(values) <= 0:
        return "<h2>Gradient energy per block</h2><p>no scalars reported yet</p>"
    top = max(values)
    bars = "".join(
        f"<span class='cov' title='block {b}: E[g^2] {v:.4g}' style='background:#36c;"
        f"height:{max(1, round(40 * v / top))}px;vertical-align:bottom'></span>"
        for b, v in enumerate(values))
    return (f"<h2>Gradient energy per block</h2><p>E[g_b^2] estimated from "
            f"{energy.get('rows', 0)} reports (largest {top:.4g}):</p><p>{bars}</p>")


def signal_html(signal: dict[str, Any]) -> str:
    """Each block's estimated signal share rho_b in [0, 1] (a bar, its sd in the title)."""
    values, sds = signal.get("rho") or [], signal.get("sd") or []
    if not signal.get("rows"):
        return ("<h2>Signal share per block</h2><p>no two clients have measured a common "
                "direction on a common block yet</p>")
    bars = "".join(
        f"<span class='cov' title='block {b}: rho {v:.3f} +- {s:.3f}' style='background:#3a3;"
        f"height:{max(1, round(40 * v))}px;vertical-align:bottom'></span>"
        for b, (v, s) in enumerate(zip(values, sds, strict=True)))
    return (f"<h2>Signal share per block</h2><p>rho_b = G_b / E[g_b^2] from {signal['rows']} "
            f"pairs of reports (fleet mean {signal.get('prior', 0.0):.3f}; full bar = 1):</p>"
            f"<p>{bars}</p>")


def loss_svg(points: list[tuple[int, float]]) -> str:
    """Inline SVG polyline of (round, loss); a note instead when there is nothing to draw."""
    if not points:
        return "<p>no round has reported a loss yet</p>"
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    xspan, yspan = (x1 - x0) or 1, (y1 - y0) or 1.0

    def sx(x: float) -> float:
        return PAD + (x - x0) / xspan * (WIDTH - 2 * PAD)

    def sy(y: float) -> float:
        return HEIGHT - PAD - (y - y0) / yspan * (HEIGHT - 2 * PAD)

    coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
    return (
        f"<svg width='{WIDTH}' height='{HEIGHT}' xmlns='http://www.w3.org/2000/svg'>"
        f"<rect width='{WIDTH}' height='{HEIGHT}' fill='#fafafa' stroke='#ccc'/>"
        f"<polyline fill='none' stroke='#36c' stroke-width='2' points='{coords}'/>"
        f"<text x='4' y='14' font-size='11'>{y1:.4g}</text>"
        f"<text x='4' y='{HEIGHT - 4}' font-size='11'>{y0:.4g}</text>"
        f"<text x='{WIDTH - PAD}' y='{HEIGHT - 4}' font-size='11' text-anchor='end'>"
        f"round {x1}</text>"
        "</svg>"
    )
