"""An HTML report of one or several run directories (``vqkit report DIR [DIR ...]``).

For each run: what it is (tokenizer, prior or GAN, from ``config.json`` / ``train_config.json``), the scalar entries
of ``eval.json``, its latest images, and training curves drawn from ``metrics.jsonl``. Several runs also get a table
side by side, and callers may add their own tables (``extra_tables``).

The page is one self-contained file: every picture is embedded as a base64 ``data:`` URI, so the HTML can be moved
or mailed on its own. The curves are also written next to the run's other files as ``<run>/curves_<group>.png``.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image

from .data.images import save_image
from .io import VQKitFileError, atomic_write_text, read_json

RUN_FILES = ("config.json", "train_config.json", "eval.json", "metrics.jsonl")
FINAL_IMAGES = ("reconstructions.png", "samples.png")
SMALL_IMAGE_WIDTH = 400  # pixels; narrower pictures are doubled on the page (pixelated, not blurred)

# Curve groups: (name, panels); a panel is the metrics.jsonl keys drawn on one pair of axes. Keys a run did not log
# are left out, and so are groups left empty.
CURVE_GROUPS = (
    ("losses", (("loss", "rec_loss", "q_loss", "p_loss"),)),
    ("psnr", (("psnr",),)),
    ("codebook", (("usage",), ("perplexity",))),
    ("accuracy", (("acc",),)),
    ("gan", (("d_loss", "g_loss"), ("logits_real", "logits_fake"), ("d_weight",))),
    ("lr", (("lr",),)),
)

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.3em; margin-top: 2em; border-bottom: 1px solid #ccc; }
h3 { font-size: 1.05em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f4f4f4; }
figure { display: inline-block; margin: 0 1em 1em 0; vertical-align: top; }
figure img { max-width: 100%; image-rendering: pixelated; border: 1px solid #eee; }
figcaption, .path { font-size: 0.8em; color: #666; }
"""


# ------------------------------------------------------------------------------------------------- reading runs
def read_metrics(run_dir: Path) -> list[dict]:
    """Rows of metrics.jsonl; a line that does not parse (one being written by a running training) is skipped."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


def _read_optional_json(path: Path, what: str) -> dict:
    return read_json(path, what) if path.is_file() else {}


def describe_run(run_dir: Path) -> tuple[str, str]:
    """(kind, one-line description) from the saved model config, else from the run config (unfinished runs)."""
    model = _read_optional_json(run_dir / "config.json", "model config")
    train = _read_optional_json(run_dir / "train_config.json", "run config")
    model_type = model.get("model_type")
    if model_type == "vqkit.VQModel" or (not model and "codebook_size" in train.get("model", {})):
        kind, text = "tokenizer", _describe_tokenizer(model or train["model"])
    elif model_type == "vqkit.TokenPrior" or (not model and "prior" in train):
        kind, text = "prior", _describe_prior(model or train["prior"])
    elif model_type == "vqkit.DCGAN" or (not model and "d_steps" in train):
        kind, text = "GAN", _describe_gan(model or train["model"])
    else:
        kind, text = "run", f"model type {model_type}" if model_type else "no model config"
    facts = [f"data {train['data']['source']}" if "data" in train else None,
             f"{train['steps']} steps" if "steps" in train else None,
             f"preset {train['preset']}" if train.get("preset") else None]
    return kind, "; ".join([text] + [f for f in facts if f])


def _conditioning(config: dict) -> str:
    classes = config.get("num_classes")
    text = ", caption-conditional" if config.get("text_vocab") else ""
    return (f", class-conditional ({classes} classes)" if classes else "") + text


def _describe_tokenizer(c: dict) -> str:
    side = math.ceil(c.get("image_size", 0) / 2 ** (len(c.get("channel_mult", [1])) - 1))
    K = c.get("codebook_size", 0)
    bits = side * side * math.log2(K) if K > 1 else 0
    return (f"VQ tokenizer: {c.get('in_channels')}-channel {c.get('image_size')} px images -> {side}x{side} tokens, "
            f"K={K} ({bits:.0f} bits/image)")


def _describe_prior(c: dict) -> str:
    h, w = c.get("token_grid", ["?", "?"])
    return (f"{c.get('mode', '?')} token prior: {c.get('n_layers')} layers x {c.get('d_model')}, over {h}x{w} tokens "
            f"(K={c.get('codebook_size')}){_conditioning(c)}")


def _describe_gan(c: dict) -> str:
    return (f"DCGAN: {c.get('channels')}-channel {c.get('image_size')} px images, latent {c.get('latent_dim')}"
            f"{_conditioning(c)}")


def latest_images(run_dir: Path) -> list[tuple[str, Path]]:
    """(caption, path) of the final images, and of the newest training snapshot of each kind not yet final."""
    shown = [(name, run_dir / name) for name in FINAL_IMAGES if (run_dir / name).is_file()]
    finals = {name.removesuffix(".png") for name in FINAL_IMAGES if (run_dir / name).is_file()}
    newest: dict[str, Path] = {}
    for path in sorted((run_dir / "images").glob("*.png")):  # names end in the zero-padded step: sorted by step
        newest[path.stem.rpartition("_")[0] or path.stem] = path
    for kind, path in newest.items():
        if kind not in finals:
            step = path.stem.rpartition("_")[2].lstrip("0") or "0"
            shown.append((f"{kind} at step {step}", path))
    return shown


def scalar_entries(values: dict) -> dict:
    """The entries of an eval.json that fit a table cell (numbers, strings, booleans)."""
    return {k: v for k, v in values.items() if isinstance(v, (int, float, str, bool))}


# ------------------------------------------------------------------------------------------------------ curves
def curve_groups(rows: list[dict]) -> list[tuple[str, list[tuple[str, ...]]]]:
    """The CURVE_GROUPS that have data, each with its panels reduced to the keys that were logged."""
    logged = {k for row in rows for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
    groups = []
    for name, panels in CURVE_GROUPS:
        present = [tuple(k for k in panel if k in logged) for panel in panels]
        present = [p for p in present if p]
        if present:
            groups.append((name, present))
    return groups


def draw_curves(rows: list[dict], panels: list[tuple[str, ...]], path: Path) -> Path:
    """One small PNG with a panel per key tuple, metric against step, written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.4 * len(panels), 2.4), dpi=100, layout="constrained")
    canvas = FigureCanvasAgg(fig)  # Agg directly: no pyplot state, no GUI backend
    for i, keys in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for key in keys:
            points = [(row["step"], row[key]) for row in rows
                      if isinstance(row.get(key), (int, float)) and math.isfinite(row[key])]
            if points:
                ax.plot(*zip(*points), label=key, linewidth=1.2)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    canvas.draw()
    save_image(path, np.asarray(canvas.buffer_rgba(), dtype=np.float32) / 255.0)
    return path


# -------------------------------------------------------------------------------------------------------- HTML
def format_value(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:,.1f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


def _cell(value) -> str:
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    return f"<td class=\"num\">{html.escape(format_value(value))}</td>" if numeric else \
        f"<td>{html.escape(format_value(value)) if value is not None else ''}</td>"


def html_table(rows: list[dict]) -> str:
    """A table with a column per key (in order of first appearance) and a row per dict."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(_cell(row.get(c)) for c in columns) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def key_value_table(values: dict) -> str:
    body = "".join(f"<tr><th>{html.escape(str(k))}</th>{_cell(v)}</tr>" for k, v in values.items())
    return f"<table>{body}</table>"


def image_tag(path: Path, caption: str) -> str:
    """A captioned <img> with the PNG embedded; small grids (MNIST-sized tiles) are shown at twice their size."""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    with Image.open(path) as picture:
        width = picture.width
    shown = 2 * width if width < SMALL_IMAGE_WIDTH else width
    return (f"<figure><img src=\"data:image/png;base64,{data}\" width=\"{shown}\" alt=\"{html.escape(caption)}\">"
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def run_section(run_dir: Path, kind: str, description: str, evaluation: dict) -> str:
    parts = [f"<h2>{html.escape(run_dir.name)} <small>({html.escape(kind)})</small></h2>",
             f"<p>{html.escape(description)}</p><p class=\"path\">{html.escape(str(run_dir.resolve()))}</p>"]
    if evaluation:
        parts += ["<h3>Evaluation (eval.json)</h3>", key_value_table(evaluation)]
    images = latest_images(run_dir)
    if images:
        parts += ["<h3>Images</h3>"] + [image_tag(path, caption) for caption, path in images]
    rows = read_metrics(run_dir)
    groups = curve_groups(rows)
    if groups:
        parts.append("<h3>Training curves (metrics.jsonl)</h3>")
        for name, panels in groups:
            parts.append(image_tag(draw_curves(rows, panels, run_dir / f"curves_{name}.png"), name))
    return "<section>" + "".join(parts) + "</section>"


def comparison_table(runs: list[tuple[Path, str, dict]]) -> str:
    """Runs side by side: a column per run, a row per eval.json entry that any of them has."""
    keys = list(dict.fromkeys(k for _, _, evaluation in runs for k in evaluation))
    head = "<th></th>" + "".join(f"<th>{html.escape(d.name)}</th>" for d, _, _ in runs)
    kinds = "<tr><th>kind</th>" + "".join(f"<td>{html.escape(kind)}</td>" for _, kind, _ in runs) + "</tr>"
    body = "".join(f"<tr><th>{html.escape(k)}</th>" + "".join(_cell(e.get(k)) for _, _, e in runs) + "</tr>"
                   for k in keys)
    return f"<table><tr>{head}</tr>{kinds}{body}</table>"


def _check_run_dir(run_dir: Path) -> None:
    if not run_dir.is_dir():
        raise VQKitFileError(f"{run_dir}: no such run directory")
    if not any((run_dir / name).is_file() for name in RUN_FILES):
        raise VQKitFileError(f"{run_dir}: not a vqkit run directory (none of {', '.join(RUN_FILES)} in it)")


def write_report(run_dirs: list[Path] | Path, out_html: Path, title: str | None = None,
                 extra_tables: dict[str, list[dict]] | None = None) -> Path:
    """Write a self-contained HTML report of ``run_dirs`` to ``out_html`` (atomically) and return its path.

    Pictures are embedded as base64 data URIs, so the file can be moved on its own. Each run's training curves are
    also saved as ``<run>/curves_<group>.png``. ``extra_tables`` maps a heading to rows (dicts, one column per key),
    e.g. a sample-evaluation table {"Samples": [{"method": "prior", "accuracy": 0.93, "FD": 12.1}, ...]}.
    Raises VQKitFileError for a directory that is missing or holds no run.
    """
    run_dirs = [Path(run_dirs)] if isinstance(run_dirs, (str, Path)) else [Path(d) for d in run_dirs]
    if not run_dirs:
        raise ValueError("write_report needs at least one run directory")
    for run_dir in run_dirs:
        _check_run_dir(run_dir)
    title = title or (f"vqkit report: {run_dirs[0].name}" if len(run_dirs) == 1 else "vqkit report")
    runs = [(d, *describe_run(d), scalar_entries(_read_optional_json(d / "eval.json", "evaluation"))) for d in run_dirs]
    parts = [f"<h1>{html.escape(title)}</h1>"]
    if len(runs) > 1:
        parts += ["<h2>Comparison</h2>", comparison_table([(d, kind, e) for d, kind, _, e in runs])]
    for heading, rows in (extra_tables or {}).items():
        parts += [f"<h2>{html.escape(heading)}</h2>", html_table(rows) if rows else "<p>(no rows)</p>"]
    parts += [run_section(d, kind, description, e) for d, kind, description, e in runs]
    page = (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")
    out_html = Path(out_html)
    atomic_write_text(out_html, page)
    return out_html


# ----------------------------------------------------------------------------------------------------------- CLI
def cmd_report(args) -> int:
    dirs = [Path(d) for d in args.dirs]
    out = Path(args.out) if args.out else (dirs[0] / "report.html" if len(dirs) == 1 else Path("report.html"))
    write_report(dirs, out, title=args.title)
    print(f"wrote {out}")
    return 0


def add_report_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``report`` to the top-level subparsers of ``vqkit``."""
    p = subparsers.add_parser("report", help="an HTML report of run directories (evaluation, images, curves)",
                              description="Write one self-contained HTML page (images embedded) describing one or "
                              "several run directories: what each is, its eval.json, its latest images and its "
                              "training curves (also saved as DIR/curves_*.png); several runs are also compared "
                              "side by side.")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="run directories (tokenizer, prior or GAN)")
    p.add_argument("--out", help="HTML file (default: DIR/report.html for one run, else ./report.html)")
    p.add_argument("--title", help="page title")
    p.set_defaults(func=cmd_report)
    return p
