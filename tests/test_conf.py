"""Every top-level config in conf/ composes with its schema and validates (with its required keys set)."""
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import jobs.config
from jobs.config import to_dataclass

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
# Required keys (???) each job's config leaves to the command line, with example values.
REQUIRED = {"ingest": ["inputs=[urls.parquet]", "output_dir=out"],
            "precompute": ["input_dir=data/images", "output_dir=data/latents", "autoencoder=models/kl-f8"],
            "train": ["data.path=data/latents", "trainer.max_steps=10"],
            "train_classifier": ["source=runs/x", "data.path=data/latents", "out_dir=classifiers/x", "max_steps=10"],
            "train_autoencoder": ["run_dir=runs/ae", "data.path=data/images"],
            "sample": ["source=runs/x", "out_dir=samples/x"],
            "export": ["source=runs/x", "out_dir=exports/x"],
            "fid_stats": ["reference=data/images", "out=refs/x"],
            "evaluate": ["reference_stats=refs/x", "images=samples/x", "out_dir=evals/x"]}
jobs.config.register_schemas()


@pytest.mark.parametrize("name", sorted(p.stem for p in CONF.glob("*.yaml")))
def test_config_composes_and_validates(name):
    schema = jobs.config.schema_class(f"{name}_schema")
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose(name, overrides=REQUIRED[name])
    assert isinstance(to_dataclass(cfg, schema), schema)


def test_bad_values_fail_before_any_work_naming_the_key():
    with initialize_config_dir(str(CONF), version_base="1.3"):
        with pytest.raises(ValueError, match="resize_mode must be one of"):
            to_dataclass(compose("ingest", overrides=REQUIRED["ingest"] + ["resize_mode=stretch"]),
                         jobs.config.schema_class("ingest_schema"))
        with pytest.raises(ValueError, match="output_dir"):
            to_dataclass(compose("ingest", overrides=["inputs=[a.parquet]"]), jobs.config.schema_class("ingest_schema"))
        with pytest.raises(Exception, match="image_size"):
            compose("ingest", overrides=REQUIRED["ingest"] + ["image_size=big"])


@pytest.mark.parametrize("module, needless", [
    ("jobs.train.run", {"torch_fidelity", "torchvision", "pandas"}),
    ("jobs.sample.run", {"torch_fidelity", "pandas"}),
    ("jobs.train_autoencoder.run", {"torch_fidelity", "pandas"}),
    ("jobs.ingest", {"torch_fidelity", "torchvision"})])
def test_a_job_imports_only_its_own_dependencies_at_start(module, needless):
    """A job registers its own schema only: importing every job's config made each process start
    (every rank, sbatch task, demo stage) import torch-fidelity, torchvision and pandas, ~3 s."""
    code = f"import sys, {module}; print(sorted(m for m in {sorted(needless)!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert done.stdout.strip() == "[]", done.stdout
