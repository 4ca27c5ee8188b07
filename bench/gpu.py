"""Every GPU measurement in one command, for the rare session that is lent a GPU (issue 18).

    bench/gpu.sh                       # on the GPU: about 8 minutes, writes bench/results/DATE_DEVICE.json
    bench/gpu.sh --smoke --out DIR     # the same runs at tiny sizes on CPU (tests/test_bench_gpu.py)

Runs, each as its own process (a crash or timeout in one is recorded and the rest go on):
  gpu_tests            pytest -m gpu (the GPU-marked tests; they skip themselves without CUDA)
  train_step_eager     bench/train_step.py --unet-only: the 1.45B preset's 872M UNet at 256^2 in bf16, ours
                       (loader + DeepSpeed + EMA) against diffusers' UNet2DConditionModel + AdamW, with img/s,
                       TFLOP/s and MFU against the bf16 matmul peak measured in the same run
  train_step_compiled  the same under torch.compile (both sides)
  memory_zero{1,2,3}   bench/train_step.py --memory-only --zero-stage S: the 1.45B preset's peak memory per
                       ZeRO stage on one GPU (the UNet and the text transformer trained jointly)
  sample               bench/sample.py: DDIM-50 with guidance, ours against the diffusers loop
  precompute           bench/precompute.py: encode against diffusers' AutoencoderKL.encode, and the stage
On CPU the smoke form compiles with the eager backend (graph capture without code generation): inductor's
CPU code generation alone took longer than 150 s on 2 cores. The results file holds every run's JSON line (or its error), the device, torch's version and the date;
jobs.plan reads the newest one matching its device and preset for its GPU-hours (jobs/plan.py).
"""
import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
GPU_BUDGET_S = 8 * 60
SMOKE_TIMEOUT_S = 300  # per run on CPU, beside the rest of the test suite

# name: (arguments after `python`, seconds allowed on the GPU, the smoke form's arguments)
RUNS = {
    "gpu_tests": (["-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/"], 120, None),
    "train_step_eager": (["bench/train_step.py", "--gpu", "--unet-only", "--batch", "64", "--steps", "10"], 75,
                         ["bench/train_step.py", "--unet-only", "--batch", "2", "--steps", "1", "--rounds", "1"]),
    "train_step_compiled": (["bench/train_step.py", "--gpu", "--unet-only", "--compile", "--batch", "64", "--steps",
                             "10"], 180, ["bench/train_step.py", "--unet-only", "--compile", "--compile-backend", "eager",
                                          "--batch", "2", "--steps", "1", "--rounds", "1"]),
    **{f"memory_zero{stage}": (["bench/train_step.py", "--gpu", "--memory-only", "--zero-stage", str(stage), "--batch",
                                "8", "--steps", "2"], 45,
                               ["bench/train_step.py", "--memory-only", "--zero-stage", str(stage), "--batch", "2",
                                "--steps", "1"]) for stage in (1, 2, 3)},
    "sample": (["bench/sample.py", "--gpu"], 45, ["bench/sample.py", "--batch", "1", "--steps", "2", "--rounds", "1"]),
    "precompute": (["bench/precompute.py", "--gpu", "--num-images", "2048"], 60,
                   ["bench/precompute.py", "--num-images", "8", "--per-shard", "4", "--batch-size", "4", "--rounds",
                    "1", "--reps", "1"]),
}


def last_json(text: str) -> dict | None:
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


def pytest_counts(text: str) -> dict:
    """{"passed": n, "skipped": n, ...} from pytest's summary line."""
    lines = [line for line in text.splitlines() if re.search(r"\d+ (passed|skipped|failed|deselected)", line)]
    return {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?)",
                                                   lines[-1] if lines else "")}


def run_one(name: str, args: list[str], timeout_s: float) -> dict:
    """One run's JSON line (pytest: its counts), with its seconds; on failure its return code and output tail."""
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout_s,
                              env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s", "command": " ".join(args)}
    seconds = round(time.perf_counter() - start, 1)
    result = pytest_counts(done.stdout) if name == "gpu_tests" else last_json(done.stdout)
    if done.returncode != 0 or not result:
        return {"error": f"exit code {done.returncode}", "command": " ".join(args), "seconds": seconds,
                "output_tail": (done.stdout + done.stderr)[-2000:]}
    return {**result, "seconds": seconds}


def device_name(smoke: bool) -> str:
    import torch

    if smoke or not torch.cuda.is_available():
        return "cpu"
    return torch.cuda.get_device_name()


def results_path(out: Path, device: str, date: str) -> Path:
    return out / f"{date}_{re.sub(r'[^A-Za-z0-9]+', '-', device).strip('-').lower()}.json"


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on CPU: the same runs, to keep them working")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder of the results file (default bench/results)")
    ap.add_argument("--only", nargs="*", default=None, help="names of the runs to do (default all)")
    args = ap.parse_args(argv)
    import torch

    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py needs a CUDA device; --smoke runs the same code paths on CPU")
    device, start = device_name(args.smoke), time.perf_counter()
    record = {"format": "ldm-pipeline/bench-results", "version": 1, "device": device, "smoke": args.smoke,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "torch": torch.__version__, "runs": {}}
    for name, (gpu_args, timeout_s, smoke_args) in RUNS.items():
        if args.only is not None and name not in args.only:
            continue
        run_args = gpu_args if not args.smoke else smoke_args or gpu_args
        left = GPU_BUDGET_S - (time.perf_counter() - start)
        if not args.smoke and left < 20:
            record["runs"][name] = {"error": "skipped: the 8-minute budget is spent"}
            continue
        record["runs"][name] = run_one(name, run_args, SMOKE_TIMEOUT_S if args.smoke else min(timeout_s, left))
        print(json.dumps({name: record["runs"][name]}), flush=True)
    record["seconds"] = round(time.perf_counter() - start, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    path = results_path(args.out, device, record["date"][:10])
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)
    print(json.dumps({"results": str(path), "seconds": record["seconds"],
                      "failed": sorted(k for k, v in record["runs"].items() if "error" in v)}))
    return path


if __name__ == "__main__":
    main()
