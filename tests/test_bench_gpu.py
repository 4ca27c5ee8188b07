"""bench/gpu.sh, the one GPU command (issue 18): its --smoke form runs every measurement at tiny sizes on CPU, so
the script cannot rot between the sessions that have a GPU; jobs.plan takes its GPU-hours from the newest results
file that matches its preset and device, and says which."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import jobs.config
from jobs.plan import format_plan, plan
from jobs.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import gpu  # noqa: E402  (bench/gpu.py: bench/ is no package)

jobs.config.register_schemas()


@pytest.mark.slow
def test_smoke_runs_every_measurement_and_writes_one_results_file(tmp_path):
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--smoke", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHON": sys.executable})  # this environment, whichever it is
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    record = json.loads(Path(summary["results"]).read_text())
    assert Path(summary["results"]).parent == tmp_path and summary["failed"] == []
    assert record["smoke"] is True and record["device"] == "cpu" and set(record["runs"]) == set(gpu.RUNS)
    runs = record["runs"]
    assert runs["gpu_tests"].get("failed", 0) == 0 and runs["gpu_tests"]["skipped"] >= 1  # no CUDA here
    for name in ("train_step_eager", "train_step_compiled"):
        assert runs[name]["ours_img_s"] > 0 and runs[name]["peer_img_s"] > 0 and runs[name]["ratio"] > 0
        assert runs[name]["matmul_peak_tflops"] > 0 and runs[name]["text_encoder"] == "frozen"
    assert runs["train_step_compiled"]["compiled"] is True and runs["train_step_eager"]["compiled"] is False
    assert runs["train_step_compiled"]["compile_backend"] == "eager"  # inductor's CPU code generation: minutes
    assert [runs[f"memory_zero{s}"]["zero_stage"] for s in (1, 2, 3)] == [1, 2, 3]
    assert all(runs[f"memory_zero{s}"]["peak_memory_gib"] > 0 for s in (1, 2, 3))
    assert runs["sample"]["ours_samples_s"] > 0 and runs["precompute"]["end_to_end_img_per_s"] > 0


def test_a_failing_run_is_recorded_and_the_rest_go_on(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu, "RUNS", {"broken": (["-c", "raise SystemExit(3)"], 30, None),
                                      "fine": (["-c", "print('{\"bench\": \"x\", \"ours_img_s\": 1.0}')"], 30, None)})
    path = gpu.main(["--smoke", "--out", str(tmp_path)])
    runs = json.loads(path.read_text())["runs"]
    assert runs["broken"]["error"] == "exit code 3" and runs["fine"]["ours_img_s"] == 1.0
    assert path.name.endswith("_cpu.json") and not list(tmp_path.glob("*.tmp"))


def _results(folder: Path, name: str, device: str, runs: dict, smoke: bool = False) -> None:
    record = {"format": "ldm-pipeline/bench-results", "version": 1, "device": device, "smoke": smoke,
              "date": name[:10] + "T00:00:00+00:00", "runs": runs}
    (folder / name).write_text(json.dumps(record))


def _step(preset: str, img_s: float, compiled: bool = False, text: str = "frozen") -> dict:
    return {"bench": "train_step", "preset": preset, "ours_img_s": img_s, "compiled": compiled, "text_encoder": text}


def _plan(results: Path, **extra) -> dict:
    overrides = {"model": "debug-t2i", "data.path": "unset", "trainer.max_steps": 1000, "data.batch_size": 8,
                 "plan.num_gpus": 2, "plan.bench_results": results} | extra
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"{k}={v}" for k, v in overrides.items()])
    return plan(jobs.config.to_dataclass(cfg, TrainConfig))


def test_plan_takes_the_newest_matching_results_file_and_names_it(tmp_path):
    _results(tmp_path, "2026-11-01_nvidia-h100.json", "NVIDIA H100 80GB HBM3",
             {"train_step_eager": _step("debug-t2i", 400.0), "train_step_compiled": _step("debug-t2i", 600.0, True)})
    _results(tmp_path, "2026-12-01_nvidia-a100.json", "NVIDIA A100-SXM4-80GB",
             {"train_step_eager": _step("debug-t2i", 200.0), "other": _step("ldm-kl8-t2i-1.45b", 50.0)})
    _results(tmp_path, "2026-12-05_cpu.json", "cpu", {"train_step_eager": _step("debug-t2i", 9.0)}, smoke=True)
    newest = _plan(tmp_path)  # any GPU: the A100 file is the newest (the smoke file never counts)
    assert newest["img_per_s_per_gpu"] == 200.0 and newest["throughput_source"]["device"].startswith("NVIDIA A100")
    assert newest["gpu_hours"] == pytest.approx(1000 * 8 * 2 / 200.0 / 3600)
    h100 = _plan(tmp_path, **{"plan.device": "H100", "trainer.compile": True})
    assert h100["img_per_s_per_gpu"] == 600.0 and h100["throughput_source"]["run"] == "train_step_compiled"
    assert "measured on NVIDIA H100 80GB HBM3" in format_plan(h100) and "2026-11-01_nvidia-h100.json" in format_plan(h100)
    given = _plan(tmp_path, **{"plan.img_per_s_per_gpu": 100.0})
    assert given["img_per_s_per_gpu"] == 100.0 and given["throughput_source"] == {"kind": "plan.img_per_s_per_gpu"}
    none = _plan(tmp_path, **{"plan.device": "V100"})
    assert "gpu_hours" not in none and "no bench/gpu.sh result for this preset" in format_plan(none)


@pytest.mark.slow
def test_the_two_rank_training_bench_measures_ours_against_ddp_on_two_ranks():
    done = subprocess.run([sys.executable, "bench/train_step.py", "--ranks", "2", "--batch", "2", "--steps", "1",
                           "--rounds", "1"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1  # rank 0 alone prints
    result = json.loads(lines[0])
    assert result["ranks"] == 2 and result["peer"] == "torch DDP + AdamW" and result["zero_stage"] == 2
    assert result["ours_img_s"] > 0 and result["peer_img_s"] > 0 and result["ratio"] > 0
