"""The LDM training job: configs, loss going down, exact resume, NaN skipping, ZeRO 1/2/3 on 2 ranks.

Tiny latent shards in the formats.md layout come from tests/factories.py: 4 smooth 16x16x4 patterns, each
with its own caption tokens, so that the debug text-to-image model has something learnable in seconds.
"""
import json
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from factories import make_config, overrides_for, torchrun_train, write_latents
from safetensors.torch import load_file

from jobs.checkpointing import TMP_PREFIX, CheckpointManager
from jobs.train.loop import NonFiniteLossError, train
from ldm.presets import PRESETS


@pytest.fixture(scope="module")
def latents(tmp_path_factory) -> Path:
    return write_latents(tmp_path_factory.mktemp("latents"))


def run_train(env, overrides: list[str]) -> int:
    env()
    return train(make_config(overrides))


def losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records]


def final_weights(run_dir: Path) -> tuple[dict, dict]:
    """(model state of the newest checkpoint, its EMA)."""
    folder = CheckpointManager(run_dir / "checkpoints").latest()
    module = torch.load(folder / "deepspeed" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    return module, load_file(str(folder / "ema.safetensors"))


# ---------------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize("experiment", ["demo", "t2i-1.45b"])
def test_experiments_compose_and_validate(experiment):
    cfg = make_config([f"experiment={experiment}", "data.path=data/latents"])
    assert cfg.model.preset == {"demo": "demo-t2i", "t2i-1.45b": "ldm-kl8-t2i-1.45b"}[experiment]
    if experiment == "t2i-1.45b":  # Tab. 15
        assert (cfg.optim.lr, cfg.trainer.max_steps, cfg.trainer.global_batch_size) == (1e-4, 390_000, 680)


PAPER_EXPERIMENTS = {"cin-ldm4": ("ldm-vq4-cin", 250, 1.5), "cin-ldm8": ("ldm-vq8-cin", 200, 1.0),
                     "celebahq": ("ldm-vq4-celebahq", 500, 1.0), "ffhq": ("ldm-vq4-ffhq", 200, 1.0),
                     "churches": ("ldm-kl8-churches", 200, 1.0), "bedrooms": ("ldm-vq4-bedrooms", 200, 1.0),
                     "layout-oi-ldm4": ("ldm-vq4-layout-openimages", 200, 1.0),
                     "layout-coco-ldm8": ("ldm-vq8-layout-coco", 100, 1.0)}


@pytest.mark.parametrize("experiment", sorted(PAPER_EXPERIMENTS))
def test_class_layout_and_unconditional_experiments_train_with_their_presets_table_settings(experiment):
    """Tab. 3 / 9 / 10 / 12 / 15: each experiment's batch, steps and learning rate are its preset's (the paper's), and
    it samples with the paper's steps and guidance; the global batch divides into the per-GPU batches."""
    preset_name, steps, guidance = PAPER_EXPERIMENTS[experiment]
    cfg = make_config([f"experiment={experiment}", "data.path=data/latents"])
    preset = PRESETS[preset_name]
    assert cfg.model.preset == preset_name
    assert (cfg.trainer.global_batch_size, cfg.trainer.max_steps) == (preset.batch_size, preset.num_train_steps)
    assert preset.learning_rate is None or cfg.optim.lr == preset.learning_rate
    assert (cfg.trainer.sample_steps, cfg.trainer.guidance_scale) == (steps, guidance)
    assert cfg.trainer.global_batch_size % cfg.data.batch_size == 0
    assert cfg.condition_key == {"class": "label", "layout": "tokens"}.get(preset.conditioner.kind)
    assert cfg.model.cond_dropout == (0.1 if preset.conditioner.kind == "class" else 0.0)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_trainer_groups_set_the_zero_stage(stage):
    cfg = make_config([f"trainer=zero{stage}", "data.path=x", "trainer.max_steps=1"])
    assert cfg.trainer.zero_stage == stage


@pytest.mark.parametrize("fused", [True, False])
def test_adamw_is_the_fused_kernel_unless_switched_off(fused):
    """One fused kernel per step: the unfused AdamW's ~10 passes over the flat ZeRO partition made
    the optimizer step about as costly as DeepSpeed's own step overhead (bench/train_step.py)."""
    from jobs.train.setup import build_optimizer

    cfg = make_config(["experiment=demo", "data.path=x", f"optim.fused={str(fused).lower()}"])
    optimizer, _ = build_optimizer(cfg, torch.nn.Linear(2, 2))
    assert bool(optimizer.defaults["fused"]) is fused


@pytest.mark.parametrize("override, key", [("trainer.zero_stage=4", "trainer.zero_stage"),
                                           ("trainer.precision=fp8", "trainer.precision"),
                                           ("optim.schedule=step", "optim.schedule"),
                                           ("model.cond_dropout=1.5", "model.cond_dropout"),
                                           ("data.use_tokens=false", "data.use_tokens"),
                                           ("logger.mode=loud", "logger.mode")])
def test_bad_config_names_the_key(override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        make_config(["experiment=demo", "data.path=x", override])


def test_missing_required_keys_are_named():
    with pytest.raises(ValueError, match="max_steps"):
        make_config(["data.path=x"])


def test_global_batch_mismatch_fails_before_training(tmp_path, latents, single_process_env):
    with pytest.raises(ValueError, match="trainer.global_batch_size"):
        run_train(single_process_env, overrides_for(latents, tmp_path, 1, **{"trainer.global_batch_size": 680}))


# ---------------------------------------------------------------------------------------------- training


@pytest.mark.slow
def test_loss_goes_down(tmp_path, latents, single_process_env):
    run_dir = tmp_path / "run"
    assert run_train(single_process_env, overrides_for(latents, run_dir, 100, **{"data.batch_size": 16})) == 0
    values = losses(run_dir)
    assert len(values) == 100
    first, last = np.mean(values[:10]), np.mean(values[-10:])
    assert last < 0.5 * first, (first, last)  # seen: about 1.0 -> 0.1 (eps-MSE starts at E[eps^2] = 1)


def test_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path, latents, single_process_env):
    """2N steps in one run vs N steps, a kill two steps after the checkpoint at N, and resume=auto."""
    n = 4
    straight, split = tmp_path / "straight", tmp_path / "split"
    extra = {"checkpoint.every_steps": n, "optim.warmup_steps": 3, "optim.schedule": "cosine"}
    assert run_train(single_process_env, overrides_for(latents, straight, 2 * n, **extra)) == 0
    run_train(single_process_env, overrides_for(latents, split, 2 * n, **extra, **{"trainer.stop_after_steps": n + 2}))
    assert [p.name for p in CheckpointManager(split / "checkpoints").complete_dirs()] == [f"step_{n:08d}"]
    assert run_train(single_process_env, overrides_for(latents, split, 2 * n, **extra)) == 0
    assert losses(split) == losses(straight)  # metrics.jsonl is cut back to step N on resume
    (model_a, ema_a), (model_b, ema_b) = final_weights(straight), final_weights(split)
    assert model_a.keys() == model_b.keys() and ema_a.keys() == ema_b.keys()
    assert all(torch.equal(model_a[k], model_b[k]) for k in model_a)
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    assert int(ema_b["num_updates"]) == 2 * n


def test_cut_off_checkpoint_is_skipped_on_resume(tmp_path, latents, single_process_env):
    run_dir = tmp_path / "run"
    assert run_train(single_process_env, overrides_for(latents, run_dir, 4, **{"checkpoint.every_steps": 2})) == 0
    root = run_dir / "checkpoints"
    # A save cut off at step 6: its temporary folder has files but no COMPLETE marker and no final name.
    (root / f"{TMP_PREFIX}step_00000006" / "deepspeed").mkdir(parents=True)
    (root / "step_00000008").mkdir()  # and a folder without its marker
    assert CheckpointManager(root).latest().name == "step_00000004"
    assert run_train(single_process_env, overrides_for(latents, run_dir, 5, **{"checkpoint.every_steps": 2})) == 0
    assert [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]


def test_nan_batch_is_skipped_and_counted_then_too_many_stop(tmp_path, latents, single_process_env, monkeypatch):
    import jobs.train.loop as loop

    real_next, calls = next, {"n": 0}
    poisoned = {3}  # the 3rd micro-batch carries a NaN

    monkeypatch.setattr(loop, "next", lambda it: _poison(real_next(it), calls, poisoned), raising=False)
    run_dir = tmp_path / "one_nan"
    assert run_train(single_process_env, overrides_for(latents, run_dir, 5)) == 0
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]  # the NaN batch did not become a step
    assert all(np.isfinite(r["loss"]) for r in records)
    assert records[-1]["num_nonfinite"] == 1
    _, ema = final_weights(run_dir)
    assert all(torch.isfinite(v).all() for v in ema.values())

    calls["n"], poisoned = 0, set(range(3, 100))
    monkeypatch.setattr(loop, "next", lambda it: _poison(real_next(it), calls, poisoned), raising=False)
    run_dir = tmp_path / "many_nans"
    with pytest.raises(NonFiniteLossError, match="non-finite losses in a row"):
        run_train(single_process_env, overrides_for(latents, run_dir, 10, **{"trainer.max_consecutive_nonfinite": 3}))
    last_good = CheckpointManager(run_dir / "checkpoints").latest()
    assert last_good.name == "step_00000002"  # two good steps, then NaNs only
    model, _ = final_weights(run_dir)
    assert all(torch.isfinite(v).all() for v in model.values())


def _poison(batch: dict, calls: dict, poisoned: set) -> dict:
    calls["n"] += 1
    if calls["n"] in poisoned:
        batch["z"][0, 0, 0, 0] = float("nan")
    return batch


def test_frozen_text_encoder_in_bf16_stays_out_of_the_optimizer(tmp_path, latents, single_process_env):
    run_dir = tmp_path / "frozen"
    overrides = overrides_for(latents, run_dir, 2, **{"model.train_text_encoder": False, "trainer.precision": "bf16",
                                                      "trainer.deterministic": False})
    assert run_train(single_process_env, overrides) == 0
    model, ema = final_weights(run_dir)
    assert not any(k.startswith("conditioner.") for k in list(model) + list(ema))
    assert any(k.startswith("unet.") for k in ema) and all(np.isfinite(v) for v in losses(run_dir))


def test_sigusr1_checkpoints_and_exits_for_requeue(tmp_path, latents, single_process_env, monkeypatch):
    import jobs.train.loop as loop
    from jobs.checkpointing import PREEMPTED_EXIT_CODE

    calls = {"n": 0}

    def signalling_next(iterator):
        calls["n"] += 1
        if calls["n"] == 3:  # SLURM's --signal=B:USR1 arrives during step 3
            signal.raise_signal(signal.SIGUSR1)
        return next(iterator)

    monkeypatch.setattr(loop, "next", signalling_next, raising=False)
    run_dir = tmp_path / "preempted"
    assert run_train(single_process_env, overrides_for(latents, run_dir, 10)) == PREEMPTED_EXIT_CODE
    assert CheckpointManager(run_dir / "checkpoints").latest().name == "step_00000003"


# ---------------------------------------------------------------------------------------------- 2 ranks


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_two_ranks_train_under_zero_stage(tmp_path, latents, stage):
    """torchrun, 2 CPU ranks (gloo), the text transformer trained jointly in the ZeRO optimizer.
    6 steps straight, then a resume from its checkpoint at 3 in a copy of the run left as a stop
    after step 4 would leave it (the stop itself is tested on one rank and in test_launch): identical
    per-step losses and EMA (gathered whole under ZeRO-3), data position of both ranks restored."""
    def overrides(run_dir: Path) -> list[str]:
        return overrides_for(latents, run_dir, 6, **{"trainer": f"zero{stage}", "checkpoint.every_steps": 3,
                                                     "data.batch_size": 4, "logger.image_every": 6,
                                                     "trainer.num_samples": 2, "trainer.sample_steps": 2})
    straight, run_dir = tmp_path / "straight", tmp_path / "resumed"
    torchrun_train(overrides(straight), tmp_path / "hydra")
    _cut_back_to(straight, run_dir, checkpoint_step=3, last_logged_step=4)
    assert "resumed from" in torchrun_train(overrides(run_dir), tmp_path / "hydra").stdout
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[-1]["images_seen"] == 6 * 2 * 4
    assert losses(run_dir) == losses(straight)
    folder = CheckpointManager(run_dir / "checkpoints").latest()
    assert folder.name == "step_00000006"
    assert {p.name for p in folder.glob("rank_*.pt")} == {"rank_00000.pt", "rank_00001.pt"}
    ema, ema_straight = (load_file(str(CheckpointManager(d / "checkpoints").latest() / "ema.safetensors"))
                         for d in (run_dir, straight))
    assert int(ema["num_updates"]) == 6
    assert ema["conditioner.token_embedding.weight"].shape == (49408, 64)  # whole, also under ZeRO-3
    assert all(torch.equal(ema[k], ema_straight[k]) for k in ema)
    assert (run_dir / "images" / "samples_00000006.png").is_file()


def _cut_back_to(run_dir: Path, copy: Path, checkpoint_step: int, last_logged_step: int) -> None:
    """A copy of a finished run as one stopped after `last_logged_step` leaves it: the checkpoints up
    to `checkpoint_step` only, metrics.jsonl up to the stop, no images after it."""
    shutil.copytree(run_dir, copy)
    for folder in CheckpointManager(copy / "checkpoints").complete_dirs():
        if int(folder.name.removeprefix("step_")) > checkpoint_step:
            shutil.rmtree(folder)
    lines = (copy / "metrics.jsonl").read_text().splitlines(keepends=True)
    (copy / "metrics.jsonl").write_text("".join(x for x in lines if json.loads(x)["step"] <= last_logged_step))
    for image in (copy / "images").glob("*_*.png"):  # samples_00000006.png
        if int(image.stem.rsplit("_", 1)[1]) > last_logged_step:
            image.unlink()
    assert CheckpointManager(copy / "checkpoints").latest().name == f"step_{checkpoint_step:08d}"


# ---------------------------------------------------------------------------------------------- memory / speed options


def _loss_and_grads(models) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    cfg = models.preset.unet
    z_t, t_B = torch.randn(2, cfg.in_channels, 8, 8), torch.tensor([10, 500])
    tokens = torch.randint(1, 1000, (2, models.preset.conditioner.text.max_length))
    loss = models.module(z_t, t_B, tokens).square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in models.module.named_parameters() if p.grad is not None}


def test_activation_checkpointing_recomputes_blocks_and_keeps_loss_and_gradients(one_thread):
    """trainer.activation_checkpointing wraps every UNet block from outside the model: backward runs
    each block's forward again (that is the memory saving), and the maths is unchanged."""
    from jobs.train.setup import build_models
    from ldm.diffusion.unet import TimestepBlock

    runs = {}
    for on in (False, True):
        cfg = make_config(["experiment=demo", "data.path=x", "model.preset=debug-t2i",
                           f"trainer.activation_checkpointing={str(on).lower()}"])
        torch.manual_seed(0)
        models = build_models(cfg, torch.device("cpu"))
        blocks = [m for m in models.module.unet.modules() if isinstance(m, TimestepBlock)]
        convs = [m for block in blocks for m in block.modules() if isinstance(m, torch.nn.Conv2d)]
        calls = []
        for conv in convs:
            conv.register_forward_pre_hook(lambda module, args: calls.append(module))
        loss, grads = _loss_and_grads(models)
        runs[on] = (loss, grads, len(calls), len(convs))
    (loss_off, grads_off, calls_off, num_convs), (loss_on, grads_on, calls_on, _) = runs[False], runs[True]
    assert num_convs > 0 and calls_off == num_convs and calls_on == 2 * num_convs  # again in backward
    assert torch.equal(loss_on, loss_off) and grads_on.keys() == grads_off.keys()
    for name in grads_off:
        torch.testing.assert_close(grads_on[name], grads_off[name], rtol=1e-5, atol=1e-6, msg=name)


def test_compile_is_applied_to_the_unet_from_outside():
    from jobs.train.setup import build_models

    for on in (False, True):
        cfg = make_config(["experiment=demo", "data.path=x", f"trainer.compile={str(on).lower()}"])
        unet = build_models(cfg, torch.device("cpu")).module.unet
        assert (getattr(unet, "_compiled_call_impl", None) is not None) is on
