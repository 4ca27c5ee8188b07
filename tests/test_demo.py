"""The embedded demo: its stage runner (reuse, invalidation, failures that name the log) and the whole
pipeline end to end at a reduced size (the same stages and jobs, fewer images and steps)."""
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from jobs.demo import run as demo
from jobs.demo.report import SECTIONS
from jobs.demo.stages import Stage, StageFailed, StageRunner, last_json_line, run_logged
from ldm.image_metrics import psnr


class Counting:
    """A stage's work function that counts its calls and writes into its output folder."""

    def __init__(self, folder, value):
        self.folder, self.value, self.calls = folder, value, 0

    def __call__(self, log_path):
        self.calls += 1
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"call_{self.calls}").write_text("x")
        log_path.write_text(f"ran {self.calls}\n")
        return {"value": self.value}


def stages(tmp_path, works, configs):
    return [Stage(name, config, work, lambda r: f"value {r['value']}", [work.folder])
            for name, config, work in zip(("a", "b", "c"), configs, works)]


def run_all(tmp_path, works, configs, lines):
    runner = StageRunner(tmp_path / "out", echo=lines.append)
    return [runner.run(stage) for stage in stages(tmp_path, works, configs)], runner


def test_rerun_reuses_finished_stages_and_redoes_what_changed_and_everything_after(tmp_path):
    works = [Counting(tmp_path / name, i) for i, name in enumerate("abc")]
    lines = []
    first, _ = run_all(tmp_path, works, [{"k": 1}, {"k": 2}, {"k": 3}], lines)
    assert first == [{"value": 0}, {"value": 1}, {"value": 2}] and [w.calls for w in works] == [1, 1, 1]
    assert re.fullmatch(r"\[demo\] a +value 0 \(\d+\.\d s\)", lines[0])
    again, runner = run_all(tmp_path, works, [{"k": 1}, {"k": 2}, {"k": 3}], lines)
    assert again == first and [w.calls for w in works] == [1, 1, 1] and runner.reused == ["a", "b", "c"]
    assert "reused" in lines[-1]
    run_all(tmp_path, works, [{"k": 1}, {"k": 20}, {"k": 3}], lines)  # b's settings change: b and c rerun
    assert [w.calls for w in works] == [1, 2, 2]
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["call_2"]  # b's old outputs were deleted


def test_a_killed_stage_resumes_from_its_outputs_only_with_the_same_settings(tmp_path):
    runner = StageRunner(tmp_path / "out", echo=lambda line: None)
    folder = tmp_path / "partial"

    def killed(log_path):
        folder.mkdir()
        (folder / "checkpoint").write_text("half")
        raise KeyboardInterrupt  # the process dies mid-stage: no done marker

    with pytest.raises(KeyboardInterrupt):
        runner.run(Stage("train", {"steps": 10}, killed, str, [folder]))
    seen = []
    resume = lambda log_path: seen.append(sorted(p.name for p in folder.iterdir())) or {}  # noqa: E731
    StageRunner(tmp_path / "out", echo=lambda line: None).run(Stage("train", {"steps": 10}, resume, str, [folder]))
    assert seen == [["checkpoint"]]  # same settings: the partial run's checkpoint is still there to resume
    (tmp_path / "out" / "stages" / "train.done.json").unlink()
    (tmp_path / "out" / "stages" / "train.started.json").write_text(json.dumps({"hash": "other", "config": {}}))
    fresh = lambda log_path: seen.append(folder.exists()) or {}  # noqa: E731
    StageRunner(tmp_path / "out", echo=lambda line: None).run(Stage("train", {"steps": 10}, fresh, str, [folder]))
    assert seen[-1] is False  # made with other settings: deleted before the stage ran


def test_a_failing_job_names_the_stage_and_its_log(tmp_path, capsys):
    log = tmp_path / "logs" / "ingest.log"
    command = [sys.executable, "-c", "import sys; print('working'); sys.exit('no shards found')"]
    with pytest.raises(StageFailed, match=rf"stage 'ingest' failed \(exit code 1\): read {re.escape(str(log))}"):
        run_logged("ingest", command, log)
    text = log.read_text()
    assert text.startswith("$ ") and "working" in text and "no shards found" in text
    assert "no shards found" in capsys.readouterr().err  # the end of the log is repeated on the console


def test_the_job_summary_is_its_last_json_line(tmp_path):
    assert last_json_line('noise\n{"a": 1}\nprogress {"b": 2\n{"c": 3}\n', "x", tmp_path) == {"c": 3}
    with pytest.raises(StageFailed, match="printed no JSON summary"):
        last_json_line("only text\n", "x", tmp_path / "x.log")


def test_settings_errors_name_the_option():
    with pytest.raises(ValueError, match="--num-samples"):
        demo.parse_args(["--num-samples", "500"])
    with pytest.raises(ValueError, match="raise --ae-max-steps"):
        demo.parse_args(["--ae-steps", "2000"])
    settings, reuse, task = demo.parse_args(["--guidance-t-max", "none", "--train-steps", "7", "--fresh"])
    assert settings.guidance_t_max is None and settings.train_steps == 7 and reuse is False and task == "t2i"
    assert demo.parse_args(["--task", "sr"])[2] == "sr" and demo.parse_args(["--task", "semantic"])[2] == "semantic"
    assert demo.parse_args(["--task", "guiding"])[2] == "guiding" and demo.parse_args(["--task", "class"])[2] == "class"
    assert demo.parse_args(["--task", "layout"])[2] == "layout"
    with pytest.raises(SystemExit):
        demo.parse_args(["--task", "inpaint"])  # argparse names the choices


HEADLINE_KEYS = ("caption_adherence_guided", "caption_adherence_unguided", "caption_adherence_unconditional",
                 "caption_adherence_chance", "fid", "kid", "fid_unguided", "kid_unguided", "fid_feature_extractor",
                 "fid_comparable_to_published", "adherence_by_attribute", "adherence_check", "stage_seconds",
                 "stage_cpu_seconds", "report")
STAGES = ("generate", "ingest", "autoencoder", "latents", "ldm", "sample", "fid", "adherence")
SHARED_STAGES, SR_STAGES = STAGES[:3], ("image_latents", "sr_ldm", "sr_eval")
SR_HEADLINE_KEYS = ("sr_psnr", "bicubic_psnr", "sr_ssim", "bicubic_ssim", "sr_fid", "autoencoder_psnr", "sr_check",
                    "stage_seconds", "report")
SR_SECTIONS = ("Headline", "Stages", "Training curves", "Autoencoder reconstructions", "Super-resolution", "Settings")
SEMANTIC_STAGES = ("sem_ldm", "sem_eval")
LAYOUT_STAGES = ("layout_data", "layout_ingest", "layout_latents", "layout_ldm", "layout_eval")


@pytest.mark.slow
def test_demo_runs_every_stage_end_to_end_and_a_rerun_reuses_them(tmp_path, capsys):
    args = ["--out", str(tmp_path / "demo"), "--num-images", "144", "--num-held-out", "24", "--num-shards", "2",
            "--ae-steps", "20", "--ae-max-steps", "30", "--train-steps", "20", "--num-samples", "24",
            "--sample-steps", "4", "--num-calibration", "8"]
    demo.main(args)
    lines = capsys.readouterr().out.strip().splitlines()
    headline = json.loads(lines[-1])  # the last line is the JSON of headline figures
    assert set(HEADLINE_KEYS) <= set(headline) and set(headline["stage_seconds"]) == set(STAGES)
    for stage in STAGES:
        assert any(re.match(rf"\[demo\] {stage} +\S.*\(\d+\.\d s\)$", line) for line in lines), stage
    for key in ("caption_adherence_guided", "caption_adherence_unguided", "caption_adherence_unconditional"):
        assert 0.0 <= headline[key] <= 1.0
    assert headline["fid"] > 0 and headline["fid_comparable_to_published"] is False  # no Inception weights here
    # 20 steps cannot keep the captions in reconstructions: the stage trained on, resuming, to --ae-max-steps
    stage = json.loads((tmp_path / "demo" / "stages" / "autoencoder.done.json").read_text())["summary"]
    assert [check["step"] for check in stage["reconstruction_checks"]] == [20, 30]
    assert headline["autoencoder_steps"] == 30
    assert stage["reconstruction_checks"][0]["all"] < demo.commands.RECONSTRUCTION_ADHERENCE_MIN
    assert "resumed from" in (tmp_path / "demo" / "logs" / "autoencoder.log").read_text()
    text = (tmp_path / "demo" / "report.md").read_text()
    assert re.findall(r"^## (.+)$", text, flags=re.M) == list(SECTIONS)
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert (tmp_path / "demo" / link).is_file(), link
    assert json.loads((tmp_path / "demo" / "metrics.json").read_text()) == headline

    demo.main(args)  # everything finished: every stage is reused, the figures are the same
    lines = capsys.readouterr().out.strip().splitlines()
    again = json.loads(lines[-1])
    assert again["stages_reused"] == list(STAGES)
    assert {k: again[k] for k in ("fid", "caption_adherence_guided")} == {k: headline[k] for k in ("fid",
                                                                                                  "caption_adherence_guided")}

    # --task sr in the same folder: the shared stages are reused, the SR stages run the real jobs
    demo.main([*args, "--task", "sr"])
    sr = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(SR_HEADLINE_KEYS) <= set(sr) and sr["stages_reused"] == list(SHARED_STAGES)
    assert set(sr["stage_seconds"]) == {*SHARED_STAGES, *SR_STAGES}
    assert json.loads((tmp_path / "demo" / "metrics-sr.json").read_text()) == sr
    # The scores are those of the pictures the job saved: the samples and the bicubic upsampling of the
    # saved low-res inputs, against the held-out images
    ev = tmp_path / "demo" / "sr" / "eval" / "bicubic"
    held_out = sorted((tmp_path / "demo" / "data" / "held_out").glob("*.jpg"))
    hr = _signed([Image.open(f).convert("RGB") for f in held_out])
    low = [Image.open(ev / "low_res" / f"{i:06d}.png") for i in range(len(held_out))]
    assert low[0].size == (8, 8)
    up = _signed([x.resize((32, 32), Image.Resampling.BICUBIC) for x in low])
    samples = _signed([Image.open(ev / "samples" / f"{i:06d}.png") for i in range(len(held_out))])
    assert sr["bicubic_psnr"] == pytest.approx(float(psnr(up, hr).mean()), abs=1e-3)
    assert sr["sr_psnr"] == pytest.approx(float(psnr(samples, hr).mean()), abs=1e-3)
    assert sr["sr_check"]["passed"] == (sr["sr_psnr"] > sr["bicubic_psnr"])
    text = (tmp_path / "demo" / "report-sr.md").read_text()
    assert re.findall(r"^## (.+)$", text, flags=re.M) == list(SR_SECTIONS)
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert (tmp_path / "demo" / link).is_file(), link

    # --task semantic: the maps came through ingest and image_latents (reused from --task sr); the IoUs
    # are those of the saved samples against the held-out scenes' maps, and against their neighbours'
    demo.main([*args, "--task", "semantic"])
    sem = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert sem["stages_reused"] == [*SHARED_STAGES, "image_latents"]
    assert set(sem["stage_seconds"]) == {*SHARED_STAGES, "image_latents", *SEMANTIC_STAGES}
    from jobs.demo.tasks.inpainting import shape_pixels
    from jobs.demo.tasks.semantic import iou

    maps = np.stack([np.asarray(Image.open(tmp_path / "demo" / "data" / "maps" / f"{f.stem}.png")) > 0
                     for f in held_out])
    found = np.stack([shape_pixels(np.asarray(Image.open(tmp_path / "demo" / "semantic" / "eval" / "samples" /
                                                         f"{i:06d}.png").convert("RGB"))) for i in range(len(held_out))])
    assert sem["semantic_iou"] == pytest.approx(float(iou(found, maps).mean()), abs=1e-6)
    assert sem["shuffled_iou"] == pytest.approx(float(iou(found, np.roll(maps, 1, axis=0)).mean()), abs=1e-6)
    assert sem["semantic_check"]["passed"] == (sem["semantic_iou"] >= sem["shuffled_iou"] + 0.3)
    assert "## Semantic synthesis" in (tmp_path / "demo" / "report-semantic.md").read_text()

    # --task guiding: an unconditional model sampled from the same seeds with and without image guiding to each
    # held-out scene's 8 px image; the PSNRs are those of the saved samples against the scenes
    demo.main([*args, "--task", "guiding"])
    guide = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert guide["stages_reused"] == [*SHARED_STAGES, "image_latents"]
    assert set(guide["stage_seconds"]) == {*SHARED_STAGES, "image_latents", "guide_ldm", "guide_eval"}
    ev = tmp_path / "demo" / "guiding" / "eval"
    targets = sorted((ev / "targets").glob("*.png"))
    assert [f.stem for f in targets] == [f.stem for f in held_out] and Image.open(targets[0]).size == (8, 8)
    for variant in ("guided", "unguided"):
        pictures = _signed([Image.open(ev / variant / f"{i:06d}.png").convert("RGB") for i in range(len(held_out))])
        assert guide[f"{variant}_psnr_to_target"] == pytest.approx(float(psnr(pictures, hr).mean()), abs=1e-3)
    record = json.loads((ev / "guided" / "samples.json").read_text())
    assert [Path(r["guide_image"]).name for r in record["samples"]] == [f.name for f in targets]
    assert record["sampling"]["image_guidance_scale"] > 0
    assert json.loads((ev / "unguided" / "samples.json").read_text())["sampling"]["image_guidance_scale"] == 0
    assert guide["guiding_check"]["passed"] == (guide["guided_psnr_to_target"] > guide["unguided_psnr_to_target"])
    assert "## Image guiding" in (tmp_path / "demo" / "report-guiding.md").read_text()

    # --task class: the class (the scene's shape) came by name from the metadata; the adherences are the
    # detector's reading of the saved guided and unguided samples against the held-out scenes' shapes
    demo.main([*args, "--task", "class"])
    cls = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert cls["stages_reused"] == [*SHARED_STAGES, "image_latents"]
    from jobs.demo.adherence import detect
    from jobs.demo.scenes import SHAPES, scene_for_index

    shapes = [scene_for_index(int(f.stem), 0).shape for f in held_out]
    record = json.loads((tmp_path / "demo" / "class" / "eval" / "guided" / "samples.json").read_text())
    assert [r["class_id"] for r in record["samples"]] == [SHAPES.index(shape) for shape in shapes]
    for variant in ("guided", "unguided"):
        found = [detect(Image.open(tmp_path / "demo" / "class" / "eval" / variant / f"{i:06d}.png").convert("RGB"))
                 for i in range(len(held_out))]
        assert cls[f"class_adherence_{variant}"] == pytest.approx(
            np.mean([f["shape"] == shape for f, shape in zip(found, shapes)]))
    assert cls["class_adherence_chance"] == pytest.approx(1 / 3)
    assert cls["class_check"]["passed"] == (cls["class_adherence_guided"] > max(cls["class_adherence_unguided"], 1 / 3))
    assert "## Class-conditional samples" in (tmp_path / "demo" / "report-class.md").read_text()

    # --task layout: its own scenes of 1-3 shapes, their boxes through ingest (KEY.json) and precompute (92 tokens
    # each); the adherences are the box detector's reading of the saved samples against their own and the next
    # layout's boxes
    demo.main([*args, "--task", "layout"])
    lay = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert lay["stages_reused"] == list(SHARED_STAGES)
    assert set(lay["stage_seconds"]) == {*SHARED_STAGES, *LAYOUT_STAGES}
    from jobs.demo.layout_scenes import box_adherence, read_layouts
    from pipeline.latents.manifest import iter_latent_samples, read_manifest

    root = tmp_path / "demo" / "layout"
    manifest = read_manifest(root / "latents")
    assert manifest["tokenizer"]["kind"] == "layout" and manifest["tokenizer"]["num_tokens"] == 257
    first = next(iter_latent_samples(root / "latents"))
    assert first["tokens"].shape == (92,) and "boxes" in first["meta"]
    layouts = read_layouts(root / "eval" / "layouts.jsonl")
    samples = [Image.open(root / "eval" / "samples" / f"{i:06d}.png").convert("RGB") for i in range(len(layouts))]
    assert len(layouts) == 24 and lay["num_boxes"] == sum(map(len, layouts))
    assert lay["layout_adherence"] == pytest.approx(box_adherence(samples, layouts))
    assert lay["layout_adherence_shuffled"] == pytest.approx(box_adherence(samples, layouts[1:] + layouts[:1]))
    assert lay["layout_adherence_scenes"] >= 0.95  # the detector finds the held-out scenes' own boxes
    assert lay["layout_check"]["passed"] == (lay["layout_adherence"] >= lay["layout_adherence_shuffled"] + 0.3)
    record = json.loads((root / "eval" / "samples" / "samples.json").read_text())
    assert [r["layout"] for r in record["samples"]] == layouts
    assert "## Layout-to-image" in (tmp_path / "demo" / "report-layout.md").read_text()


def _signed(images) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(x) for x in images])).permute(0, 3, 1, 2).float() / 127.5 - 1


@pytest.mark.full_demo
def test_full_demo_guided_samples_follow_their_captions_better_than_unguided_and_chance(tmp_path, capsys):
    """Issues 10 and 19 at the demo's own size (make demo): guided samples match their captions in at
    least 95 % of cases, more often than unguided ones and than chance, through an autoencoder whose
    reconstructions keep the captions. The reduced run above cannot pass it (at 300 LDM steps guided /
    unguided adherence was 0.18 / 0.19). About 10 minutes on 2 cores, so not in the default run."""
    demo.main(["--out", str(tmp_path / "demo")])
    headline = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    guided, unguided, chance = (headline[f"caption_adherence_{k}"] for k in ("guided", "unguided", "chance"))
    assert guided >= 0.95 and guided > unguided and guided > chance, headline
    assert headline["autoencoder_reconstruction_adherence"] >= demo.commands.RECONSTRUCTION_ADHERENCE_MIN
