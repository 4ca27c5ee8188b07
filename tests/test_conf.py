"""Every top-level config in conf/ composes with its schema and validates (with its required keys set)."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import jobs.config
from jobs.config import to_dataclass

CONF = Path(__file__).resolve().parents[1] / "conf"
# Required keys (???) each job's config leaves to the command line, with example values.
REQUIRED = {"ingest": ["inputs=[urls.parquet]", "output_dir=out"],
            "precompute": ["input_dir=data/images", "output_dir=data/latents", "autoencoder=models/kl-f8"],
            "train": ["data.path=data/latents", "trainer.max_steps=10"],
            "train_autoencoder": ["run_dir=runs/ae", "data.path=data/images"],
            "sample": ["source=runs/x", "out_dir=samples/x"],
            "export": ["source=runs/x", "out_dir=exports/x"],
            "fid_stats": ["reference=data/images", "out=refs/x"],
            "evaluate": ["reference_stats=refs/x", "images=samples/x", "out_dir=evals/x"]}
jobs.config.register_schemas()


@pytest.mark.parametrize("name", sorted(p.stem for p in CONF.glob("*.yaml")))
def test_config_composes_and_validates(name):
    schema = jobs.config.SCHEMAS[f"{name}_schema"]
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose(name, overrides=REQUIRED[name])
    assert isinstance(to_dataclass(cfg, schema), schema)


def test_bad_values_fail_before_any_work_naming_the_key():
    with initialize_config_dir(str(CONF), version_base="1.3"):
        with pytest.raises(ValueError, match="resize_mode must be one of"):
            to_dataclass(compose("ingest", overrides=REQUIRED["ingest"] + ["resize_mode=stretch"]),
                         jobs.config.SCHEMAS["ingest_schema"])
        with pytest.raises(ValueError, match="output_dir"):
            to_dataclass(compose("ingest", overrides=["inputs=[a.parquet]"]), jobs.config.SCHEMAS["ingest_schema"])
        with pytest.raises(Exception, match="image_size"):
            compose("ingest", overrides=REQUIRED["ingest"] + ["image_size=big"])
