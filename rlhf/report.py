"""`rlhf report RUN_DIR... [--out DIR]`: one Markdown and one HTML page with tables and PNG plots.

A path is a run folder (has manifest.json) or a folder of run folders (e.g. runs/tiny). The page has
the eval table (if an eval run is among them), its judged win rates and the KL-reward frontier (every
evaluated model's KL to the reference against its reward-model score, gold accuracy and win rate), then
per stage its key final metrics and its training curves: SFT loss, RM accuracy, PPO score / gold accuracy
/ KL / entropy, DPO margin and accuracy.
Damaged or foreign folders are reported, not fatal: a folder whose manifest is broken or names no stage
of this pipeline is skipped with a warning, and so are unreadable lines of metrics.jsonl or eval.json.
"""

from __future__ import annotations

import argparse
import html
import json
from pathlib import Path

from rlhf.artifacts import read_manifest
from rlhf.files import write_text_atomic
from rlhf.card import markdown_table, win_rate_table
from rlhf.errors import UserError, describe, warn

ORDER = ["tasks", "pretrain", "sft", "rm", "ppo", "dpo", "eval", "export"]
# per stage: subplots, each a title and the series it draws
PLOTS = {
    "pretrain": [("loss", ["train/loss", "eval/loss"])],
    "sft": [("loss", ["train/loss", "eval/loss"]), ("perplexity", ["eval/perplexity"])],
    "rm": [("pairwise accuracy", ["train/rewards/accuracy", "eval/rewards/accuracy"]),
           ("loss", ["train/loss/pairwise", "eval/loss/pairwise"])],
    "ppo": [("reward-model score", ["objective/score"]),
            ("gold accuracy vs proxy", ["gold/accuracy", "gold/proxy_score"]),
            ("KL to reference (nats / response)", ["objective/kl"]), ("entropy (nats / token)", ["objective/entropy"])],
    "dpo": [("implicit reward margin", ["train/rewards/margin", "eval/rewards/margin"]),
            ("preference accuracy", ["train/rewards/accuracy", "eval/rewards/accuracy"]),
            ("response logps", ["train/logps/chosen", "train/logps/rejected"])],
}
KEY_METRICS = {
    "pretrain": ["eval/loss", "eval/perplexity"], "sft": ["train/loss", "eval/loss", "eval/perplexity"],
    "rm": ["eval/rewards/accuracy", "eval/loss/pairwise", "reward/mean", "reward/std"],
    "ppo": ["objective/score", "objective/kl", "gold/accuracy", "response/eos_rate", "kl_coef"],
    "dpo": ["eval/rewards/accuracy", "eval/rewards/margin", "eval/logps/chosen", "eval/loss/dpo"],
    "export": ["parity/cast_max_abs_logit_diff"],
}


def find_runs(paths: list[Path]) -> list[tuple[Path, dict]]:
    """Run folders among `paths` (or directly inside them), in stage order."""
    runs = []
    for path in paths:
        if not path.exists():
            raise UserError(f"{path} not found")
        if not path.is_dir():
            raise UserError(f"{path} is a file, not a run folder or a folder of run folders")
        candidates = [path] if (path / "manifest.json").is_file() else sorted(p for p in path.iterdir() if p.is_dir())
        for c in candidates:
            try:
                manifest = read_manifest(c)
            except UserError as err:
                warn(f"report: skipping {c} ({describe(err)})")
                continue
            if manifest is None:
                if c.name.endswith(".partial"):
                    warn(f"report: skipping {c} (unfinished run)")
                continue
            if manifest.get("stage") not in ORDER:
                warn(f"report: skipping {c} (its manifest.json names no stage of this pipeline)")
                continue
            runs.append((c, manifest))
    if not runs:
        raise UserError(f"no finished run folders in {', '.join(map(str, paths))}")
    return sorted(runs, key=lambda r: (ORDER.index(r[1]["stage"]), str(r[0])))


def read_series(run: Path, keys: list[str]) -> dict[str, tuple[list[int], list[float]]]:
    """metrics.jsonl -> {key: (steps, values)} for the keys present; unreadable lines are counted in one
    warning and left out."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    path = run / "metrics.jsonl"
    if not path.is_file():
        return out
    bad = 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            bad += bool(line.strip())
            continue
        for k in keys:
            if isinstance(row.get(k), (int, float)):
                out.setdefault(k, ([], []))
                out[k][0].append(row["step"])
                out[k][1].append(row[k])
    if bad:
        warn(f"report: {path}: left out {bad} line(s) that are not a JSON object with a step")
    return out


def plot_run(run: Path, stage: str, out_png: Path) -> bool:
    """One PNG with a subplot per panel of PLOTS[stage] that has data; False when nothing to plot."""
    panels = [(title, read_series(run, keys)) for title, keys in PLOTS.get(stage, [])]
    panels = [(t, s) for t, s in panels if s]
    if not panels:
        return False

    def draw(ax, series):
        for key, (steps, values) in series.items():
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=key)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)

    save_panels(panels, draw, f"{stage}: {run.name}", out_png)
    return True


def save_panels(panels: list[tuple[str, object]], draw, title: str, out_png: Path, height: float = 3.2) -> None:
    """One PNG, one subplot per (title, data) panel drawn by `draw(ax, data)`; written to a temp file and renamed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), height), squeeze=False)
    for ax, (panel_title, data) in zip(axes[0], panels):
        draw(ax, data)
        ax.set_title(panel_title, fontsize=10)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    tmp = out_png.with_name(out_png.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out_png)


def plot_frontier(results: list[dict], comparisons: list[dict], out_png: Path) -> bool:
    """KL to the reference (x) against reward-model score, gold accuracy (sampled) and judged win rate (y), one
    labelled point per evaluated model: the plot that compares PPO, DPO, ... runs. False when no model has a KL
    and one of these figures."""
    baseline = comparisons[0]["baseline"] if comparisons else None
    panels = [("reward-model score", {r["model"]: r.get("reward_score") for r in results}),
              ("gold accuracy (sampled)", {r["model"]: r.get("gold_accuracy") for r in results}),
              (f"judged win rate vs {baseline}", {c["model"]: c.get("win") for c in comparisons})]
    kl = {r["model"]: r.get("kl_to_reference") for r in results}
    panels = [(title, [(kl[m], y, m) for m, y in ys.items() if kl.get(m) is not None and y is not None])
              for title, ys in panels]
    panels = [(title, points) for title, points in panels if points]
    if not panels:
        return False

    def draw(ax, points):
        ax.scatter([x for x, _, _ in points], [y for _, y, _ in points], s=30)
        for x, y, name in points:
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.margins(0.15)  # room for the labels
        ax.set_xlabel("KL to reference (nats / response)")

    save_panels(panels, draw, "KL-reward frontier", out_png, height=3.4)
    return True


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _by_task_table(results: list[dict]) -> str:
    tasks = sorted({t for r in results for t in (r.get("gold_accuracy_by_task") or {})})
    if not tasks:
        return ""
    lines = ["| model | " + " | ".join(tasks) + " |", "| --- |" + " --- |" * len(tasks)]
    for r in results:
        acc = r.get("gold_accuracy_by_task") or {}
        lines.append(f"| {r['model']} | " + " | ".join(f"{100 * acc[t]:.1f}%" if acc.get(t) is not None else "—"
                                                      for t in tasks) + " |")
    return "\n".join(lines)


def build_report(paths: list[Path], out: Path) -> Path:
    """Write README.md, index.html and one PNG per plotted stage into `out`; returns README.md."""
    runs = find_runs(paths)
    out.mkdir(parents=True, exist_ok=True)
    md = ["# RLHF run report", ""]
    body = ["<h1>RLHF run report</h1>"]
    for run, manifest in runs:
        if manifest["stage"] == "eval" and (run / "eval.json").is_file():
            evaluation = _eval_json(run / "eval.json")
            if evaluation is None:
                continue
            results = evaluation["results"]
            table, by_task = markdown_table(results), _by_task_table(results)
            md += ["## Evaluation", "", f"`{run}`", "", table, ""]
            body += ["<h2>Evaluation</h2>", _html_table(table)]
            if by_task:
                md += ["Gold accuracy (sampled) by task:", "", by_task, ""]
                body += ["<p>Gold accuracy (sampled) by task:</p>", _html_table(by_task)]
            more_md, more_html = _judge_and_frontier(run, evaluation, out)
            md += more_md
            body += more_html
    for run, manifest in runs:
        stage = manifest["stage"]
        if stage == "eval":
            continue
        metrics = manifest.get("metrics") if isinstance(manifest.get("metrics"), dict) else {}
        shown = [f"{k} = {_fmt(metrics[k])}" for k in KEY_METRICS.get(stage, []) if metrics.get(k) is not None]
        wall = manifest.get("wall_time_s")
        wall = wall if isinstance(wall, (int, float)) and not isinstance(wall, bool) else 0
        line = f"wall time {wall:.0f} s" + (", " + ", ".join(shown) if shown else "")
        md += [f"## {stage}: `{run}`", "", line, ""]
        body += [f"<h2>{stage}: <code>{html.escape(str(run))}</code></h2>", f"<p>{html.escape(line)}</p>"]
        png = out / f"{stage}-{run.name}.png"
        if plot_run(run, stage, png):
            md += [f"![{stage} curves]({png.name})", ""]
            body.append(f'<img src="{png.name}" alt="{stage} curves" style="max-width:100%">')
    readme = out / "README.md"
    write_text_atomic(readme, "\n".join(md) + "\n")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px}")
    write_text_atomic(out / "index.html", f"<!doctype html><html><head><meta charset='utf-8'><title>RLHF report"
                                          f"</title><style>{style}</style></head><body>{''.join(body)}</body></html>\n")
    return readme


def _judge_and_frontier(run: Path, evaluation: dict, out: Path) -> tuple[list[str], list[str]]:
    """Markdown lines and HTML parts: the eval run's judged win rates (if it had a judge) and its frontier plot."""
    md: list[str] = []
    body: list[str] = []
    judge = evaluation.get("judge") or {}
    comparisons = judge.get("comparisons") or []
    if comparisons:
        title = f"Judged win rates against {judge.get('baseline')} (judge: {judge.get('model')})"
        table = win_rate_table(comparisons)
        md += [f"{title}:", "", table, ""]
        body += [f"<p>{html.escape(title)}:</p>", _html_table(table)]
    png = out / f"frontier-{run.name}.png"
    if plot_frontier(evaluation["results"], comparisons, png):
        md += [f"![KL-reward frontier]({png.name})", ""]
        body.append(f'<img src="{png.name}" alt="KL-reward frontier" style="max-width:100%">')
    return md, body


def _eval_json(path: Path) -> dict | None:
    """An eval.json whose `results` are objects naming a model; None (with a warning) when it is not one."""
    try:
        evaluation = json.loads(path.read_text(encoding="utf-8"))
        if not all(isinstance(r, dict) and "model" in r for r in evaluation["results"]):
            raise TypeError("a result is not an object with a model")
    except (OSError, ValueError, RecursionError, KeyError, TypeError) as err:
        warn(f"report: skipping the evaluation table of {path} ({describe(err)})")
        return None
    return evaluation


def _html_table(markdown: str) -> str:
    rows = [r.strip().strip("|").split("|") for r in markdown.splitlines() if r.strip() and "---" not in r]
    head, rest = rows[0], rows[1:]
    cells = lambda row, tag: "".join(f"<{tag}>{html.escape(c.strip())}</{tag}>" for c in row)  # noqa: E731
    body = "".join(f"<tr>{cells(r, 'td')}</tr>" for r in rest)
    return "<table><tr>" + cells(head, "th") + "</tr>" + body + "</table>"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="rlhf report", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders or folders of run folders")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <first run>/report)")
    args = parser.parse_args(argv)
    out = args.out or (args.runs[0] / "report")
    print(build_report(args.runs, out))
    return 0
