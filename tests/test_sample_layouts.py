"""`python -m jobs.sample layouts=FILE.jsonl`: one list of boxes per line becomes the layout tokens of the model's
training manifest (its vocabulary and classes), the empty layout is the unconditional branch of guidance, and bad
boxes fail before any sample naming the line. `layouts=<layout latent folder>` (jobs.sample and jobs.evaluate,
the Tab. 9 protocol) takes each sample's stored tokens, its crop included."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from factories import CONF, LAYOUT_POLICY, boxes_of, tiny_bundle, write_latents, write_layout_latents
from hydra import compose, initialize_config_dir

import jobs.config
from jobs.sample.conditions import Conditions, condition_pair
from jobs.sample.config import SampleConfig
from jobs.sample.generate import SamplingConfig, generate
from jobs.sample.run import sample
from ldm.diffusion.layout import Box
from pipeline.conditions.layouts import LayoutConfig
from pipeline.models.bundle import save_ldm

CPU = torch.device("cpu")
POLICY = LayoutConfig("boxes", num_classes=4)
LAYOUTS = [[{"category": 1, "bbox": [0.0, 0.0, 0.5, 0.5]}],
           [{"category": 3, "bbox": [0.5, 0.5, 0.5, 0.5], "is_group_of": True},
            {"category": 0, "bbox": [0.1, 0.6, 0.2, 0.3]}]]
jobs.config.register_schemas()
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def layout_model():
    return dataclasses.replace(tiny_bundle("debug-layout"), tokenizer=POLICY.spec())


def _job(**overrides) -> SampleConfig:
    values = {"sampling.num_steps": 3, "sampling.batch_size": 3, "progress_bar": False, "device": "cpu",
              "weights": "raw", "num_per_prompt": 1} | overrides
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return jobs.config.to_dataclass(compose("sample", overrides=[f"{k}={v}" for k, v in values.items()]),
                                        SampleConfig)


def _jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_boxes_become_the_manifests_tokens_and_the_empty_layout_is_unconditional(layout_model):
    boxes = [[Box(1, 0.0, 0.0, 0.5, 0.5)], [Box(3, 0.5, 0.5, 0.5, 0.5, is_group_of=True)]]
    cond, uncond = condition_pair(layout_model, Conditions(layouts=boxes), (16, 16), CPU)
    tokens = torch.stack([POLICY.tokenizer.encode(b)[0] for b in boxes])
    torch.testing.assert_close(cond["context"], layout_model.conditioner(tokens))
    empty = POLICY.tokenizer.encode([])[0].expand(2, -1)
    torch.testing.assert_close(uncond["context"], layout_model.conditioner(empty))
    cfg = SamplingConfig(num_steps=3, guidance_scale=1.0, batch_size=2)
    a, b = generate(layout_model, Conditions(layouts=boxes), [0, 0], cfg, CPU, output="latents")
    assert (a - b).abs().max() > 1e-3  # same seed, other boxes: another sample


def test_job_samples_a_jsonl_of_layouts_and_records_each_samples_boxes(tmp_path, layout_model):
    source = save_ldm(layout_model, tmp_path / "layout")
    layouts = _jsonl(tmp_path / "boxes.jsonl", LAYOUTS)
    sample(_job(source=source, out_dir=tmp_path / "out", layouts=layouts, num_per_prompt=2))
    record = json.loads((tmp_path / "out" / "samples.json").read_text())
    assert [s["layout"] for s in record["samples"]] == [LAYOUTS[0], LAYOUTS[0], LAYOUTS[1], LAYOUTS[1]]
    assert sorted(p.name for p in (tmp_path / "out").glob("0*.png")) == [f"{i:06d}.png" for i in range(4)]


@pytest.mark.parametrize("lines, message", [
    ([LAYOUTS[0], [{"category": 1, "bbox": [0.6, 0.0, 0.5, 0.5]}]], r"layout 1: box 0 reaches past the image"),
    ([[{"category": 9, "bbox": [0.0, 0.0, 0.5, 0.5]}]], r"layout 0: box 0 has category 9 outside \[0, num_classes = 4\)"),
    ([{"category": 1}], r"line 1: the boxes must be a list"),
])
def test_bad_layouts_fail_before_any_sample_naming_the_line(tmp_path, layout_model, lines, message):
    source = save_ldm(layout_model, tmp_path / "layout")
    with pytest.raises(ValueError, match=message):
        sample(_job(source=source, out_dir=tmp_path / "out", layouts=_jsonl(tmp_path / "bad.jsonl", lines)))
    assert not (tmp_path / "out").exists()


def test_layouts_need_a_layout_model_and_a_layout_model_needs_layouts(tmp_path, layout_model):
    layouts = _jsonl(tmp_path / "boxes.jsonl", LAYOUTS)
    t2i = save_ldm(tiny_bundle("debug-t2i"), tmp_path / "t2i")
    with pytest.raises(ValueError, match=r"is text-conditional: it takes prompts / prompt_file, not layouts"):
        sample(_job(source=t2i, out_dir=tmp_path / "out", layouts=layouts))
    source = save_ldm(layout_model, tmp_path / "layout")
    with pytest.raises(ValueError, match=r"is layout-conditional \(boxes\): it takes layouts, not prompts"):
        sample(_job(source=source, out_dir=tmp_path / "out", prompts="[a cat]"))
    untokenized = save_ldm(dataclasses.replace(layout_model, tokenizer=None), tmp_path / "bare")
    with pytest.raises(ValueError, match=r"records no layout tokenizer"):
        sample(_job(source=untokenized, out_dir=tmp_path / "out", layouts=layouts))


CROP = (0.25, 0.0, 0.75, 1.0)  # a centre crop of a 2:1 picture, as precompute stores it


def test_a_layout_latent_folder_gives_each_sample_its_stored_tokens_crop_included(tmp_path, layout_model):
    assert POLICY.spec() == LAYOUT_POLICY.spec()
    folder = write_layout_latents(tmp_path / "val", num_samples=3, crop=CROP)
    source = save_ldm(layout_model, tmp_path / "layout")
    sample(_job(source=source, out_dir=tmp_path / "out", layouts=folder))
    record = json.loads((tmp_path / "out" / "samples.json").read_text())
    assert [s["layout"] for s in record["samples"]] == [{"latent_key": f"{i:06d}"} for i in range(3)]
    stored = torch.stack([POLICY.tokenizer.encode(boxes_of(i), CROP)[0] for i in range(2)])
    cond, _ = condition_pair(layout_model, Conditions(layouts=list(stored)), (16, 16), CPU)
    torch.testing.assert_close(cond["context"], layout_model.conditioner(stored))
    whole = torch.stack([POLICY.tokenizer.encode(boxes_of(i))[0] for i in range(2)])
    assert (stored[:, -2:] != whole[:, -2:]).all() and torch.equal(stored[:, :-2], whole[:, :-2])


def test_a_latent_folder_of_other_tokens_is_refused_before_any_sample(tmp_path, layout_model):
    source = save_ldm(layout_model, tmp_path / "layout")
    other = write_layout_latents(tmp_path / "other", num_samples=2, tokenizer={**POLICY.spec(), "max_objects": 29})
    with pytest.raises(ValueError, match=r"the layouts were stored with tokenizer .*max_objects': 29.* precompute them"):
        sample(_job(source=source, out_dir=tmp_path / "out", layouts=other))
    captions = write_latents(tmp_path / "captions", num_samples=4, num_shards=1)
    with pytest.raises(ValueError, match=r"its manifest records no layout tokens .*layout.boxes_key"):
        sample(_job(source=source, out_dir=tmp_path / "out", layouts=captions))
    assert not (tmp_path / "out").exists()


def test_evaluate_cycles_through_the_stored_layouts(tmp_path, layout_model):
    from jobs.evaluate.config import EvaluateConfig
    from jobs.evaluate.run import condition_rule

    folder = write_layout_latents(tmp_path / "val", num_samples=3, crop=CROP)
    source = save_ldm(layout_model, tmp_path / "layout")

    def config(**extra) -> EvaluateConfig:
        values = {"reference_stats": "x", "out_dir": "y", "source": source, "num_samples": 10} | extra
        with initialize_config_dir(str(CONF), version_base="1.3"):
            return jobs.config.to_dataclass(compose("evaluate", overrides=[f"{k}={v}" for k, v in values.items()]),
                                            EvaluateConfig)

    layouts = condition_rule(layout_model, config(layouts=folder))([4, 2, 9]).layouts
    expected = [POLICY.tokenizer.encode(boxes_of(i), CROP)[0] for i in (1, 2, 0)]
    assert all(torch.equal(a, b) for a, b in zip(layouts, expected, strict=True))
    with pytest.raises(ValueError, match=r"is a layout-to-image model: set layouts="):
        condition_rule(layout_model, config())
    with pytest.raises(ValueError, match=r"is not a layout-to-image model: drop layouts"):
        condition_rule(tiny_bundle("debug-cin"), config(layouts=folder))
    with pytest.raises(ValueError, match=r"images= evaluates a folder as it is: drop .*layouts"):
        config(layouts=folder, images=tmp_path, source="null")
