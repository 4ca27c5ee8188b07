"""The demo's run report: one Markdown file with PNG plots, readable on GitHub or in any viewer.

`write_report(out_dir, settings, results, runner)` writes OUT/report.md and OUT/report/*.png:
the headline figures, every stage's line, wall time and throughput, both trainings' loss curves, the
autoencoder's reconstructions, sample grids (guided, unguided, unconditional, and one row per caption
side by side), the metrics tables (caption adherence per attribute with chance levels; FID / KID with
the feature extractor named), the command each stage ran, and where every artifact is.

Curves are drawn with matplotlib, on a log loss axis.
"""
import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

GRID_COLUMNS, GRID_ZOOM = 12, 2
SECTIONS = ("Headline", "Stages", "Training curves", "Autoencoder reconstructions", "Samples", "Metrics",
            "Artifacts", "Settings")


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def curve(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    points = [(r["step"], r[key]) for r in records if key in r and np.isfinite(r[key])]
    steps, values = zip(*points) if points else ((), ())
    return np.asarray(steps, float), np.asarray(values, float)


# ---------------------------------------------------------------------------------------------- plots


def plot_curve(steps: np.ndarray, values: np.ndarray, title: str, ylabel: str, path: Path,
               log_y: bool = True) -> Path:
    """A training curve as a PNG (matplotlib, no display needed); a log y axis by default: a loss that
    falls by orders of magnitude stays readable at its end."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    ax.plot(steps, values, linewidth=1.2)
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    if log_y and len(values) and np.all(values > 0):
        ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------- images


def sample_grid(files: list[Path], path: Path, columns: int = GRID_COLUMNS, zoom: int = GRID_ZOOM) -> Path:
    """Samples in index order, `columns` per row, enlarged `zoom` times (nearest: no smoothing)."""
    images = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    h, w, _ = images[0].shape
    rows = -(-len(images) // columns)
    grid = np.full((rows * (h + 2), columns * (w + 2), 3), 255, np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid[r * (h + 2):r * (h + 2) + h, c * (w + 2):c * (w + 2) + w] = image
    out = Image.fromarray(grid)
    out.resize((out.width * zoom, out.height * zoom), Image.NEAREST).save(path)
    return path


def side_by_side(rows: list[tuple[str, list[Path]]], labels: list[str], path: Path, zoom: int = 3) -> Path:
    """One row per caption: its caption, then the same index from each variant (columns `labels`)."""
    first = Image.open(rows[0][1][0])
    side, text_width, header = first.width * zoom, 260, 16
    canvas = Image.new("RGB", (text_width + len(labels) * (side + 4), header + len(rows) * (side + 4)), "white")
    draw = ImageDraw.Draw(canvas)
    for c, label in enumerate(labels):
        draw.text((text_width + c * (side + 4), 2), label, fill="black")
    for r, (caption, files) in enumerate(rows):
        top = header + r * (side + 4)
        draw.text((4, top + side // 2 - 5), caption, fill="black")
        for c, f in enumerate(files):
            canvas.paste(Image.open(f).convert("RGB").resize((side, side), Image.NEAREST),
                         (text_width + c * (side + 4), top))
    canvas.save(path)
    return path


def newest(folder: Path, pattern: str) -> Path | None:
    found = sorted(folder.glob(pattern))
    return found[-1] if found else None


# ---------------------------------------------------------------------------------------------- sections


def _rel(path, out_dir: Path) -> str:
    path = Path(path)
    return str(path.relative_to(out_dir)) if path.is_relative_to(out_dir) else str(path)


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows] + [""]


def _headline(results: dict, check: dict | None) -> list[str]:
    adh, fid = results["adherence"], results["fid"]
    label = "" if fid["comparable"] else " (stand-in extractor: NOT comparable to published FID)"
    verdict = [] if check is None else [
        f"Guided samples match their captions more often than unguided ones and than chance: "
        f"**{'yes' if check['passed'] else 'NO'}** ({adh['guided']['all']:.3f} vs {adh['unguided']['all']:.3f} "
        f"and {adh['chance']['all']:.3f}).", ""]
    return ["## Headline", ""] + verdict + _table(
        ["", "guided", "unguided", "unconditional", "chance"],
        [["caption adherence (all four attributes)", *(f"{adh[v]['all']:.3f}" for v in
                                                      ("guided", "unguided", "unconditional", "chance"))],
         [f"FID{label}", f"{fid['guided']['fid']:.2f}", f"{fid['unguided']['fid']:.2f}", "", ""],
         ["KID", f"{fid['guided']['kid']:.4f}", f"{fid['unguided']['kid']:.4f}", "", ""]])


def _throughput(name: str, r: dict, seconds: float) -> str:
    """Items per second of a stage, from its own figures where the job measured them."""
    rates = {"ingest": lambda: f"{r['images_per_s']:.0f} img/s (download + shard)",
             "autoencoder": lambda: f"{r.get('img_per_s') or 0:.0f} img/s (training)",
             "latents": lambda: f"{r['samples_per_s']:.0f} img/s (decode + encode)",
             "ldm": lambda: f"{r.get('img_per_s') or 0:.0f} img/s (training, 2 ranks)",
             "image_latents": lambda: f"{r['samples_per_s']:.0f} img/s (decode + encode)",
             "sr_ldm": lambda: f"{r.get('img_per_s') or 0:.0f} img/s (training, 2 ranks)",
             "sample": lambda: f"{sum(v['num_samples'] for v in r.values()) / max(seconds, 1e-9):.1f} samples/s "
                               "(incl. start-up)"}
    return rates[name]() if name in rates else ""


def _stages(out_dir: Path, results: dict, runner) -> list[str]:
    rows = []
    for name, summary in results.items():
        seconds = runner.elapsed(name)
        done = json.loads((out_dir / "stages" / f"{name}.done.json").read_text())
        reused = " (reused)" if name in runner.reused else ""
        rows.append([f"`{name}`", done["line"].replace("|", "/"), f"{seconds:.1f}{reused}",
                     f"{runner.elapsed(name, 'cpu_seconds'):.1f}", _throughput(name, summary, seconds),
                     f"[log]({_rel(runner.log_path(name), out_dir)})"])
    total = sum(runner.elapsed(name) for name in results)
    cpu = sum(runner.elapsed(name, "cpu_seconds") for name in results)
    return ["## Stages", "", f"Wall time of all stages: {total:.0f} s; CPU time {cpu:.0f} s (this process and the "
            "jobs it ran; on a machine shared with other work wall time grows with the load, CPU time much less). "
            "A reused stage shows the times of the run that made it.", ""] + _table(
        ["stage", "what it did", "wall s", "CPU s", "throughput", "log"], rows)


def curves(out_dir: Path, plots: Path, runs: list[tuple[str, str, str, str]]) -> list[str]:
    """The "Training curves" section: per (run folder, metrics key, title, y label), its curve from
    OUT/RUN/metrics.jsonl."""
    lines = ["## Training curves", ""]
    for run, key, title, ylabel in runs:
        png = plot_curve(*curve(read_jsonl(out_dir / run / "metrics.jsonl"), key), title, ylabel,
                         plots / f"{run.replace('/', '_')}_loss.png")
        lines += [f"![{title}]({_rel(png, out_dir)})", ""]
    return lines


T2I_CURVES = [("autoencoder", "train/rec_loss", "autoencoder: L1 reconstruction loss", "L1"),
              ("ldm", "loss", "LDM: diffusion loss (Eq. 2, mean over ranks)", "loss")]


def _reconstructions(out_dir: Path, results: dict) -> list[str]:
    grid = newest(out_dir / "autoencoder" / "images" / "eval", "reconstructions_*.png")
    ev = results["autoencoder"]["eval"]
    figures = ", ".join(f"{k} {ev[k]:.3f}" for k in ("psnr", "ssim", "scale_factor") if k in ev)
    lines = ["## Autoencoder reconstructions", "", f"Held-out images (top) and their reconstructions (bottom); "
             f"{figures} on {ev.get('num_images', '?')} held-out images.", ""]
    return lines + ([f"![reconstructions]({_rel(grid, out_dir)})", ""] if grid else ["(no grid was logged)", ""])


def _samples(out_dir: Path, plots: Path, captions: list[str], settings) -> list[str]:
    lines = ["## Samples", "", f"One sample per caption (`{_rel(out_dir / 'prompts.txt', out_dir)}`, in order), "
             f"DDIM {settings.sample_steps} steps, the same seed per caption in every variant. Guided: "
             f"classifier-free guidance scale {settings.guidance_scale} for t <= {settings.guidance_t_max}; "
             "unguided: the conditional model (scale 1); unconditional: the empty caption.", ""]
    variants = ("guided", "unguided", "unconditional")
    files = {v: sorted((out_dir / "samples" / v).glob("[0-9]*.png"))[:len(captions)] for v in variants}
    for v in variants:
        grid = sample_grid(files[v], plots / f"samples_{v}.png")
        lines += [f"**{v}**", "", f"![{v} samples]({_rel(grid, out_dir)})", ""]
    rows = [(captions[i], [files[v][i] for v in variants]) for i in range(min(8, len(captions)))]
    both = side_by_side(rows, list(variants), plots / "samples_side_by_side.png")
    return lines + ["The first captions, side by side:", "", f"![side by side]({_rel(both, out_dir)})", ""]


def _metrics(results: dict) -> list[str]:
    adh, fid = results["adherence"], results["fid"]
    keys = ("shape", "colour", "position", "size", "colour_position", "all")
    lines = ["## Metrics", "", "Caption adherence (jobs/demo/adherence.py: a deterministic detector reads shape, "
             "colour, quadrant and size back from each sample; the share that matches its caption):", ""]
    lines += _table(["variant", *keys], [[v, *(f"{adh[v][k]:.3f}" for k in keys)]
                                         for v in ("guided", "unguided", "unconditional", "chance")])
    label = "" if fid["comparable"] else " **Not comparable to published FID.**"
    lines += [f"FID / KID against {fid['num_reference']} held-out demo images (torch-fidelity's metric functions; "
              f"feature extractor: {fid['extractor']}).{label}", ""]
    return lines + _table(["variant", "FID", "KID", "KID std", "metrics.json"],
                          [[v, f"{fid[v]['fid']:.3f}", f"{fid[v]['kid']:.5f}", f"{fid[v]['kid_std']:.5f}",
                            f"`{fid[v]['metrics_json']}`"] for v in ("guided", "unguided")])


def _artifacts(out_dir: Path, results: dict) -> list[str]:
    where = [("captioned scenes + urls.parquet", out_dir / "data"), ("held-out FID images", out_dir / "data" /
             "held_out"), ("image shards (img2dataset layout)", out_dir / "shards"),
             ("autoencoder run (checkpoints, metrics.jsonl)", out_dir / "autoencoder"),
             ("exported autoencoder", results["autoencoder"]["export_dir"]),
             ("latent shards + manifest.json", out_dir / "latents"),
             ("LDM run (DeepSpeed checkpoints, ema.safetensors, metrics.jsonl)", out_dir / "ldm"),
             ("samples (PNG + samples.json)", out_dir / "samples"), ("FID statistics and metrics.json", out_dir / "eval"),
             ("stage logs", out_dir / "logs"), ("stage done markers (rerun reuse)", out_dir / "stages"),
             ("headline JSON", out_dir / "metrics.json")]
    return ["## Artifacts", ""] + [f"- {what}: `{path}`" for what, path in where] + [""]


def _settings(out_dir: Path, settings, runner, names) -> list[str]:
    values = {k: str(v) for k, v in dataclasses.asdict(settings).items()}
    lines = ["## Settings", "", "```json", json.dumps(values, indent=2), "```", "",
             "The command each stage ran (from its log):", "", "```bash"]
    for name in names:
        log = runner.log_path(name)
        commands = [line[2:] for line in log.read_text().splitlines() if line.startswith("$ ")] if log.is_file() else []
        lines += [f"# {name}"] + (commands or ["(in the demo process: jobs/demo/commands.py, jobs/demo/evaluation.py)"])
    return lines + ["```", ""]


def write_report(out_dir: Path, settings, results: dict, runner, check: dict | None = None) -> Path:
    """OUT/report.md (and its PNGs under OUT/report/) from the stages' summaries and the demo's
    adherence check ({"passed": bool, ...}); returns its path."""
    out_dir, plots = Path(out_dir), Path(out_dir) / "report"
    captions = [line for line in (out_dir / "prompts.txt").read_text().splitlines() if line]
    lines = ["# Demo run report", "", f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')} in `{out_dir}`. The whole "
             "pipeline on the embedded synthetic captioned scenes, on CPU; see README.md.", ""]
    lines += _headline(results, check) + _stages(out_dir, results, runner) + curves(out_dir, plots, T2I_CURVES)
    lines += _reconstructions(out_dir, results) + _samples(out_dir, plots, captions, settings)
    lines += _metrics(results) + _artifacts(out_dir, results) + _settings(out_dir, settings, runner, list(results))
    return write_markdown(out_dir / "report.md", lines)


def write_markdown(path: Path, lines: list[str]) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(path)
    return path


def image_task_report(s, results: dict, runner, task: str, title: str, scores: list[str], loss_curve: tuple,
                      pictures: Callable[[Path], list[str]]) -> Path:
    """OUT/report-TASK.md of an image-conditioned demo task: its headline `scores`, the stages, the
    autoencoder's and the task LDM's loss curves (`loss_curve`: one entry of `curves`), the
    reconstructions, the task's `pictures(plots folder)` and the settings."""
    plots = s.out / "report"
    lines = [f"# Demo run report: {title}", "", f"In `{s.out}`: `python -m jobs.demo --task {task}` on the embedded "
             "synthetic scenes, on CPU; see README.md.", ""]
    lines += scores + _stages(s.out, results, runner) + curves(s.out, plots, [T2I_CURVES[0], loss_curve])
    lines += _reconstructions(s.out, results) + pictures(plots) + _settings(s.out, s, runner, list(results))
    return write_markdown(s.out / f"report-{task}.md", lines)
