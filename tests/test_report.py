"""The demo's run report (jobs/demo/report.py) from a hand-made run folder: every section, every plot and
image it links exists, the numbers it states are the stages' numbers, both plot back-ends draw."""
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

import jobs.demo.report as report
from jobs.demo.scenes import ALL_SCENES, render
from jobs.demo.stages import Stage, StageRunner

NUM = 6
VARIANTS = ("guided", "unguided", "unconditional")


@dataclass
class Settings:  # the fields of jobs.demo.DemoSettings that the report reads
    sample_steps: int = 5
    guidance_scale: float = 3.0
    guidance_t_max: int = 600


def write_run(out: Path) -> dict:
    """The files a demo run leaves where the report looks, and the stages' summaries."""
    (out / "prompts.txt").write_text("".join(s.caption + "\n" for s in ALL_SCENES[:NUM]))
    for variant in VARIANTS:
        (out / "samples" / variant).mkdir(parents=True)
        for i in range(NUM):
            render(ALL_SCENES[i], 32).save(out / "samples" / variant / f"{i:06d}.png")
    for run, key in (("autoencoder", "train/rec_loss"), ("ldm", "loss")):
        (out / run).mkdir(exist_ok=True)
        (out / run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, key: 1.0 / s}) + "\n"
                                                        for s in range(10, 110, 10)))
    (out / "autoencoder" / "images" / "eval").mkdir(parents=True)
    Image.new("RGB", (64, 32), "gray").save(out / "autoencoder" / "images" / "eval" / "reconstructions_00000010.png")
    shares = {k: 0.5 for k in ("shape", "colour", "position", "size", "colour_position", "all")}
    fid = {"fid": 12.5, "kid": 0.0123, "kid_std": 0.001, "metrics_json": str(out / "eval")}
    return {
        "ingest": {"downloaded": 6, "shards": 1, "images_per_s": 30.0},
        "autoencoder": {"eval": {"psnr": 25.4, "ssim": 0.87, "scale_factor": 0.45, "num_images": 8},
                        "export_dir": str(out / "autoencoder" / "autoencoder"), "img_per_s": 40.0},
        "ldm": {"img_per_s": 300.0, "steps": 100, "loss_first": 0.9, "loss_last": 0.2},
        "sample": {v: {"num_samples": NUM} for v in VARIANTS},
        "fid": {"guided": fid, "unguided": {**fid, "fid": 20.0}, "extractor": "stand-in: random Inception",
                "comparable": False, "num_reference": NUM},
        "adherence": {**{v: shares for v in VARIANTS}, "chance": {**shares, "all": 1 / 144}},
    }


def run_stages(out: Path, summaries: dict) -> StageRunner:
    runner = StageRunner(out, echo=lambda line: None)
    for name, summary in summaries.items():
        runner.run(Stage(name, {}, lambda log, summary=summary: summary, lambda r, name=name: f"did {name}"))
    return runner


def test_report_has_every_section_and_every_linked_file(tmp_path):
    summaries = write_run(tmp_path)
    path = report.write_report(tmp_path, Settings(), summaries, run_stages(tmp_path, summaries),
                               check={"passed": False})
    text = path.read_text()
    headings = re.findall(r"^## (.+)$", text, flags=re.M)
    assert headings == list(report.SECTIONS)
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(links) == 2 + 1 + 3 + 1  # two curves, reconstructions, three grids, side by side
    for link in links:
        assert Image.open(tmp_path / link).size[0] > 0, link
    assert "than unguided ones and than chance: **NO** (0.500 vs 0.500 and 0.007)" in text
    assert "NOT comparable to published FID" in text and "stand-in: random Inception" in text
    assert "| `ldm` | did ldm |" in text and "300 img/s (training, 2 ranks)" in text
    assert "12.50" in text and "0.0123" in text and "0.007" in text  # FID, KID, chance of all four


def test_loss_plot_has_a_log_axis_and_draws_the_curve_where_the_data_is(tmp_path):
    """A loss falling from 1 to 1e-3: on the log axis its line starts high on the left, ends low on the
    right, and passes the middle of the plot halfway (on a linear axis it would hug the bottom)."""
    steps, values = np.arange(1, 101, dtype=float), np.logspace(0, -3, 100)
    image = np.asarray(Image.open(report.plot_curve(steps, values, "t", "loss", tmp_path / "p.png")))
    line_yx = np.argwhere((image[..., 2] > 150) & (image[..., 0] < 100))  # matplotlib's default blue
    xs = line_yx[:, 1]
    left, mid, right = (line_yx[np.abs(xs - x) < 3] for x in np.percentile(xs, [2, 50, 98]))
    assert len(left) and len(mid) and len(right)
    assert left[:, 0].mean() < mid[:, 0].mean() < right[:, 0].mean()  # rows grow downwards
    top, bottom = line_yx[:, 0].min(), line_yx[:, 0].max()
    assert abs(mid[:, 0].mean() - (top + bottom) / 2) < 0.15 * (bottom - top)  # log: halfway at step 50


def test_sample_grid_keeps_index_order(tmp_path):
    files = []
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        files.append(tmp_path / f"{i}.png")
        Image.new("RGB", (4, 4), colour).save(files[-1])
    grid = np.asarray(Image.open(report.sample_grid(files, tmp_path / "g.png", columns=2, zoom=1)))
    assert grid.shape == (2 * 6, 2 * 6, 3)
    assert tuple(grid[0, 0]) == (255, 0, 0) and tuple(grid[0, 6]) == (0, 255, 0) and tuple(grid[6, 0]) == (0, 0, 255)
