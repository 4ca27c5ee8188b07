"""Classifier guidance in latent space (App. D.4, LDM-8-G): the classifier of noisy latents
(ldm/diffusion/classifier.py), `python -m jobs.train_classifier`, and jobs.sample classifier=DIR.

The latents are tests/factories.write_latents' four smooth patterns, labelled through a classes.txt by their
captions ("pattern 0".."pattern 3"); the frozen LDM is factories.tiny_bundle("debug-cin") exported (random
weights: only its preset's UNet config, schedule and scale factor matter to the classifier).
"""
import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from factories import CONF, pattern, perturb, tiny_bundle, write_latents
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from safetensors.torch import load_file

import jobs.config
from jobs.sample.conditions import Conditions
from jobs.sample.config import SampleConfig
from jobs.sample.generate import SamplingConfig, generate
from jobs.sample.run import sample
from jobs.train_classifier.checkpoint import load_classifier
from jobs.train_classifier.config import TrainClassifierConfig
from jobs.train_classifier.run import train_classifier
from ldm.diffusion.classifier import LatentClassifier, classifier_log_likelihood, encoder_config
from ldm.diffusion.schedules import NoiseSchedule
from ldm.diffusion.unet import UNet
from ldm.presets import PRESETS
from pipeline.models.bundle import load_ldm, save_ldm

CIN = PRESETS["debug-cin"]
CPU = torch.device("cpu")
NUM_PATTERNS = 4  # the classes present in the latents; the model (and so the classifier) has 10
TRAIN_STEPS = 200  # measured: accuracy 1.0 at t < 300 for seeds 0-3 (0.6-1.0 at 80 steps)
jobs.config.register_schemas()
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("classifier")
    (root / "classes.txt").write_text("".join(f"pattern {i}\n" for i in range(NUM_PATTERNS)))
    return {"latents": write_latents(root / "latents", num_samples=64, num_shards=4), "classes": root / "classes.txt",
            "cin": save_ldm(tiny_bundle("debug-cin"), root / "cin"), "root": root}


def train_config(data: dict, out_dir: Path, max_steps: int, **extra) -> TrainClassifierConfig:
    values = {"source": data["cin"], "data.path": data["latents"], "out_dir": out_dir, "max_steps": max_steps,
              "data.label_key": "null", "data.classes_file": data["classes"], "data.num_workers": 0,
              "data.batch_size": 16, "lr": 1e-3, "log_every": 25, "checkpoint_every": 10**6, "device": "cpu",
              "weights": "raw"} | extra
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train_classifier", overrides=[f"{k}={v}" for k, v in values.items()])
    return jobs.config.to_dataclass(cfg, TrainClassifierConfig)


def run_job(cfg: TrainClassifierConfig) -> tuple[dict, list[dict]]:
    """(the summary, the JSON lines it printed)."""
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        summary = train_classifier(cfg)
    return summary, [json.loads(line) for line in stdout.getvalue().splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def trained(one_thread, data) -> tuple[Path, list[dict]]:
    out_dir = data["root"] / "trained"
    _, lines = run_job(train_config(data, out_dir, TRAIN_STEPS))
    return out_dir, lines


def sample_config(**overrides) -> SampleConfig:
    values = {"sampling.num_steps": 3, "sampling.batch_size": 4, "progress_bar": False, "device": "cpu",
              "weights": "raw", "num_per_prompt": 1} | overrides
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("sample", overrides=[f"{k}={v}" for k, v in values.items()])
    return jobs.config.to_dataclass(cfg, SampleConfig)


# ------------------------------------------------------------------------------------------- the network


@pytest.mark.parametrize("pool", ["attention", "mean"])
def test_logits_have_one_row_per_sample_and_depend_on_t_and_z(pool):
    cfg = encoder_config(CIN.unet, 4)
    classifier = perturb(LatentClassifier(cfg, 10, (16, 16), pool), torch.Generator().manual_seed(0))
    z_t = torch.randn(3, 4, 16, 16)
    t_B = torch.tensor([0, 0, 0])
    logits = classifier(z_t, t_B)
    assert logits.shape == (3, 10) and torch.isfinite(logits).all()
    assert (classifier(z_t, t_B + 900) - logits).abs().max() > 1e-3  # the time embedding reaches the logits
    assert (classifier(z_t.flip(-1), t_B) - logits).abs().max() > 1e-3
    log_p = classifier_log_likelihood(classifier, torch.tensor([1, 7, 3]))(z_t, t_B)
    torch.testing.assert_close(log_p, logits.log_softmax(-1)[torch.arange(3), torch.tensor([1, 7, 3])])


def test_the_encoder_is_the_unets_own_encoder_half_without_cross_attention():
    """Same submodules (names and shapes) as the UNet's time_embed / input_blocks / middle_block built from the
    same config, self-attention where the LDM cross-attends; the LDM's own config (context_dim) is refused."""
    cfg = encoder_config(CIN.unet, 4)
    classifier_keys = {k: v.shape for k, v in LatentClassifier(cfg, 10, (16, 16)).state_dict().items()
                       if not k.startswith("out.")}
    unet_keys = {k: v.shape for k, v in UNet(cfg).state_dict().items()
                 if k.split(".")[0] in ("time_embed", "input_blocks", "middle_block")}
    assert classifier_keys == unet_keys
    assert not any("transformer" in k for k in classifier_keys) and any(".qkv." in k for k in classifier_keys)
    with pytest.raises(ValueError, match=r"context_dim=64: .* encoder_config"):
        LatentClassifier(CIN.unet, 10, (16, 16))
    with pytest.raises(ValueError, match=r"this classifier was built for \(16, 16\)"):
        LatentClassifier(cfg, 10, (16, 16))(torch.randn(1, 4, 32, 32), torch.tensor([0]))


def test_the_classifier_guidance_gradient_raises_log_p_of_the_class():
    """One guided eps through gradient_guidance: moving z_t by -eps change (the direction DDIM moves z_0 in)
    raises log p(y | z_t) for y, and the wrong sign of Eq. 16 lowers it."""
    from ldm.diffusion.guidance import gradient_guidance

    schedule = NoiseSchedule.from_config(CIN.schedule)
    classifier = perturb(LatentClassifier(encoder_config(CIN.unet, 4), 10, (16, 16)), torch.Generator().manual_seed(1))
    labels, z_t, t_B = torch.tensor([2, 5]), torch.randn(2, 4, 16, 16), torch.tensor([400, 400])
    log_p = classifier_log_likelihood(classifier, labels)
    zero_eps = lambda z, t: torch.zeros_like(z)  # noqa: E731
    with torch.no_grad():
        shift = gradient_guidance(zero_eps, log_p, schedule, 1.0, through_model=False)(z_t, t_B)
        before, after, wrong = log_p(z_t, t_B), log_p(z_t - 0.05 * shift, t_B), log_p(z_t + 0.05 * shift, t_B)
    assert (after > before).all() and (wrong < before).all()


# ------------------------------------------------------------------------------------------- training


def test_training_learns_the_classes_at_low_noise(trained, data):
    """On the four patterns (chance 0.25): accuracy >= 0.9 at t < 100 after TRAIN_STEPS steps; a JSON line of
    loss and accuracy per log interval; the saved record names the LDM, its noise and the labels."""
    out_dir, lines = trained
    assert [line["step"] for line in lines] == list(range(25, TRAIN_STEPS + 1, 25))
    assert all({"loss", "accuracy"} <= set(line) for line in lines)
    assert lines[-1]["loss"] < lines[0]["loss"]
    classifier, record = load_classifier(out_dir)
    assert (record["num_classes"], record["preset"], record["latent_shape"], record["step"]) == (
        10, "debug-cin", [4, 16, 16], TRAIN_STEPS)
    assert record["labels"]["classes"] == [f"pattern {i}" for i in range(NUM_PATTERNS)]
    assert record["unet"]["context_dim"] is None and record["scale_factor"] == 1.0
    z_0 = torch.stack([torch.from_numpy(pattern(i % NUM_PATTERNS)) for i in range(64)])
    y = torch.arange(64) % NUM_PATTERNS
    generator = torch.Generator().manual_seed(123)
    t_B = torch.randint(0, 100, (64,), generator=generator)
    z_t = NoiseSchedule.from_config(CIN.schedule).q_sample(z_0, t_B, torch.randn(z_0.shape, generator=generator))
    with torch.no_grad():
        accuracy = (classifier(z_t, t_B).argmax(-1) == y).float().mean().item()
    assert accuracy >= 0.9, accuracy


def test_resume_continues_exactly(data, tmp_path):
    """N steps straight and N/2 + resume + N/2 give bitwise the same weights and AdamW state."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_job(train_config(data, straight, 12, log_every=4))
    _, first = run_job(train_config(data, resumed, 6, log_every=4))
    assert load_classifier(resumed)[1]["step"] == 6
    _, second = run_job(train_config(data, resumed, 12, log_every=4))
    assert [line["step"] for line in first + second] == [4, 6, 8, 12]
    for name in ("classifier.safetensors", "train_state.safetensors"):
        a, b = load_file(str(straight / name)), load_file(str(resumed / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    state = json.loads((resumed / "train_state.json").read_text())
    assert state["step"] == 12 and state["data"]["batches_consumed"] == 12
    with pytest.raises(ValueError, match=r"trained with other settings \(lr\).*resume=never"):
        train_classifier(train_config(data, resumed, 14, lr=2e-3))


@pytest.mark.parametrize("override, match", [
    ("lr=0", r"lr=0.0: must be positive"),
    ("pool=max", r"pool='max': use one of"),
    ("resume=sometimes", r"resume='sometimes'"),
    ("num_classes=1", r"num_classes=1: at least 2"),
    ("data.classes_file=null", r"set data.label_key=.* or data.classes_file="),
    ("data.condition=sr-bicubic", r"data.condition='sr-bicubic': the classifier reads z_t alone"),
])
def test_bad_values_fail_before_any_work_naming_the_key(data, tmp_path, override, match):
    key, value = override.split("=")
    with pytest.raises(ValueError, match=match):
        train_config(data, tmp_path / "out", 1, **{key: value})
    assert not (tmp_path / "out").exists()


def test_unknown_keys_and_unfit_models_or_folders_are_refused(data, tmp_path):
    with pytest.raises(ConfigCompositionException, match="num_clases"):
        train_config(data, tmp_path / "out", 1, num_clases=4)
    uncond = save_ldm(tiny_bundle("debug-uncond"), tmp_path / "uncond")
    with pytest.raises(ValueError, match=r"is not class-conditional: set num_classes="):
        train_classifier(train_config(data, tmp_path / "out", 1, source=uncond))
    with pytest.raises(ValueError, match=r"names 4 classes, the classifier has 3: set num_classes=4"):
        train_classifier(train_config(data, tmp_path / "out", 1, num_classes=3))
    with pytest.raises(ValueError, match=r"data.scale_factor=0.5, the model sees latents scaled by 1.0"):
        train_classifier(train_config(data, tmp_path / "out", 1, **{"data.scale_factor": 0.5}))
    assert not (tmp_path / "out").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"holds no classifier.json: every save replaces out_dir"):
        train_classifier(train_config(data, foreign, 1))
    assert (foreign / "notes.txt").read_text() == "keep me"


# ------------------------------------------------------------------------------------------- sampling


def test_classifier_guidance_raises_the_classifiers_likelihood_of_the_requested_class(trained, data, tmp_path):
    """jobs.sample classifier=DIR sampling.classifier_scale=10 (LDM-8-G's scale): the same seeds' z_0 get a
    higher mean log p(class_id | z_0) from the classifier than unguided (measured: -3.3 -> -1.0 nats with these
    settings); samples.json records the classifier and its scale."""
    out_dir, _ = trained
    classifier, _ = load_classifier(out_dir)
    bundle = load_ldm(data["cin"], weights="raw")
    ids = [0, 1, 2, 3] * 2

    def mean_log_p(scale: float) -> float:
        cfg = SamplingConfig(num_steps=10, batch_size=8, clip_x0=3.0, classifier_scale=scale)
        z_0 = generate(bundle, Conditions(class_ids=ids), list(range(8)), cfg, CPU, output="latents",
                       classifier=classifier if scale else None)
        with torch.no_grad():
            return classifier_log_likelihood(classifier, torch.tensor(ids))(z_0, torch.zeros(8, dtype=torch.long)).mean()

    unguided, guided = mean_log_p(0.0), mean_log_p(10.0)
    assert guided > unguided + 1.0, (guided, unguided)
    samples = tmp_path / "samples"
    sample(sample_config(source=data["cin"], out_dir=samples, class_ids="[0,3]", classifier=out_dir,
                         **{"sampling.classifier_scale": 10.0}))
    record = json.loads((samples / "samples.json").read_text())
    assert record["sampling"]["classifier_scale"] == 10.0
    assert record["classifier"] == {"path": str(out_dir), "step": TRAIN_STEPS, "preset": "debug-cin",
                                    "num_classes": 10, "scale": 10.0}
    assert [s["class_id"] for s in record["samples"]] == [0, 3] and len(list(samples.glob("0*.png"))) == 2


def test_classifier_guidance_refusals_name_what_to_change(trained, data, tmp_path):
    out_dir, _ = trained
    out = tmp_path / "out"
    scale = {"sampling.classifier_scale": 10.0}
    with pytest.raises(ValueError, match=r"classifier guidance needs both"):
        sample_config(source=data["cin"], out_dir=out, class_ids="[0]", classifier=out_dir)
    with pytest.raises(ValueError, match=r"classifier guidance needs both"):
        sample_config(source=data["cin"], out_dir=out, class_ids="[0]", **scale)
    with pytest.raises(ValueError, match=r"sampling.classifier_scale=10.0 needs a classifier of noisy latents"):
        generate(tiny_bundle("debug-cin"), Conditions(class_ids=[0]), [0], SamplingConfig(classifier_scale=10.0), CPU)
    t2i = save_ldm(tiny_bundle("debug-t2i"), tmp_path / "t2i")
    with pytest.raises(ValueError, match=r"preset 'debug-t2i' is not class-conditional \('text' conditioner\)"):
        sample(sample_config(source=t2i, out_dir=out, prompts="[a]", classifier=out_dir, **scale))
    with pytest.raises(ValueError, match=r"trained on latents \(4, 16, 16\), these samples are latents \(4, 32, 32\)"):
        sample(sample_config(source=data["cin"], out_dir=out, class_ids="[0]", classifier=out_dir,
                             **scale, **{"sampling.height": 128, "sampling.width": 128}))
    scaled = tiny_bundle("debug-cin")
    scaled.scale_factor = 0.5
    with pytest.raises(ValueError, match=r"trained on latents scaled by 1.0, the model sees them scaled by 0.5"):
        sample(sample_config(source=save_ldm(scaled, tmp_path / "scaled"), out_dir=out, class_ids="[0]",
                             classifier=out_dir, **scale))
    four = tmp_path / "four_classes"
    run_job(train_config(data, four, 1, num_classes=4))
    with pytest.raises(ValueError, match=r"the classifier has 4 classes, preset 'debug-cin' has 10"):
        sample(sample_config(source=data["cin"], out_dir=out, class_ids="[0]", classifier=four, **scale))
    assert not out.exists()
