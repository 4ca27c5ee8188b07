"""Layout-to-image training (App. E.2.1): the loader hands each sample's 92 layout tokens (KEY.tokens.npy, written
by precompute from its boxes) to the transformer trained jointly with the UNet through cross-attention. One rank
in this process; each latent paints its boxes (a box fills its category's channel), so the layout carries what
the model must predict. Wrong pairings of tokens and presets fail before any step."""
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from factories import (
    LAYOUT_POLICY,
    boxes_of,
    logged_losses,
    make_config,
    run_train,
    spatial_train_overrides,
    write_layout_latents,
)

from jobs.checkpointing import CheckpointManager
from jobs.train.setup import build_models
from ldm.presets import PRESETS
from pipeline.latents.loader import LatentLoader

PRESET = PRESETS["debug-layout"]
POLICY = LAYOUT_POLICY


@pytest.fixture(scope="module")
def latents(tmp_path_factory) -> Path:
    return write_layout_latents(tmp_path_factory.mktemp("layout") / "latents")


def overrides_for(latent_dir: Path, run_dir: Path, max_steps: int, **extra) -> list[str]:
    # v-prediction, as the demo models: its loss at large t is the x0 error, which only the layout can lower.
    return spatial_train_overrides("debug-layout", "layout", latent_dir, run_dir, max_steps,
                                   **{"model.objective": "v"} | extra)


def test_the_batch_holds_each_samples_layout_tokens_and_the_transformer_trains(latents):
    cfg = make_config(overrides_for(latents, Path("r"), 1))
    assert cfg.condition_key == "tokens"
    batch = next(iter(LatentLoader(cfg.data)))
    assert batch["tokens"].shape == (8, 92) and batch["tokens"].dtype == torch.int64
    for key, tokens in zip(batch["key"], batch["tokens"]):
        assert POLICY.tokenizer.decode(tokens)[0] == POLICY.tokenizer.decode(POLICY.tokenizer.encode(
            boxes_of(int(key)))[0])[0]
    models = build_models(cfg, torch.device("cpu"))
    transformer = models.module.conditioner
    assert transformer.token_embedding.num_embeddings == 8192 and transformer.token_embedding.weight.requires_grad
    assert transformer(batch["tokens"]).shape == (8, 92, PRESET.unet.context_dim)


@pytest.mark.parametrize("tokenizer, preset, message", [
    ({"kind": "openclip", "name_or_path": None, "max_length": 92}, "debug-layout",
     r"holds tokens made with a openclip caption tokenizer, model.preset='debug-layout' is layout-to-image"),
    ({**POLICY.spec(), "num_tokens": 257}, "debug-layout",
     r"layout tokens of a 257-token vocabulary, model.preset='debug-layout' embeds 8192: rerun jobs.precompute "
     r"with layout.num_tokens=8192"),
])
def test_tokens_that_do_not_fit_the_preset_are_refused_before_training(tmp_path, single_process_env, tokenizer,
                                                                       preset, message):
    other = write_layout_latents(tmp_path / "other", num_samples=8, tokenizer=tokenizer)
    with pytest.raises(ValueError, match=message):
        run_train(single_process_env, overrides_for(other, tmp_path / "run", 1, **{"model.preset": preset}))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_text_preset_refuses_layout_tokens_and_a_layout_preset_needs_tokens(latents, tmp_path, single_process_env):
    with pytest.raises(ValueError, match=r"holds tokens made with layout.boxes_key, model.preset='debug-t2i' is "
                                         r"text-to-image"):
        run_train(single_process_env, overrides_for(latents, tmp_path / "run", 1,
                                                    **{"model.preset": "debug-t2i"}))
    with pytest.raises(ValueError, match=r"is layout-to-image: its transformer reads the layout tokens, set "
                                         r"data.use_tokens=true"):
        make_config(overrides_for(latents, tmp_path / "run", 1, **{"data.use_tokens": False}))


@pytest.mark.slow
def test_the_transformer_trains_on_the_layout_tokens_and_resumes_exactly_with_boxes(tmp_path, latents,
                                                                                 single_process_env):
    """The loss falls; the token embedding (its EMA) learns exactly the rows of the tokens the layouts hold (the
    others get no gradient, so AdamW leaves them as initialised); a run stopped at step 4 and resumed ends bitwise equal to an
    uninterrupted one, transformer included."""
    extra = {"checkpoint.every_steps": 3, "logger.image_every": 10**6}
    straight = tmp_path / "straight"
    assert run_train(single_process_env, overrides_for(latents, straight, 40, **extra, **{"data.batch_size": 16})) == 0
    values = logged_losses(straight)
    assert np.mean(values[-8:]) < 0.8 * np.mean(values[:8]), values
    torch.manual_seed(0)  # the run's initial weights (jobs.train seeds with cfg.seed = 0)
    initial = build_models(make_config(overrides_for(latents, straight, 1)), torch.device("cpu"))
    before = initial.module.state_dict()["conditioner.token_embedding.weight"]
    used = sorted({int(t) for i in range(8) for t in POLICY.tokenizer.encode(boxes_of(i))[0]})
    ema = load_file(str(CheckpointManager(straight / "checkpoints").latest() / "ema.safetensors"))
    trained = ema["conditioner.token_embedding.weight"]
    changed = (trained != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == used, (changed[:20], used)
    split, again = tmp_path / "split", tmp_path / "again"
    run_train(single_process_env, overrides_for(latents, split, 6, **extra, **{"trainer.stop_after_steps": 4}))
    assert run_train(single_process_env, overrides_for(latents, split, 6, **extra)) == 0
    assert run_train(single_process_env, overrides_for(latents, again, 6, **extra)) == 0
    assert logged_losses(split) == logged_losses(again) and len(logged_losses(again)) == 6
    a, b = (load_file(str(CheckpointManager(d / "checkpoints").latest() / "ema.safetensors")) for d in (again, split))
    assert "conditioner.token_embedding.weight" in a and all(torch.equal(a[k], b[k]) for k in a)
