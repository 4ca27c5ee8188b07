"""Exponential moving average of the weights, used for sampling (the LDM code's LitEma).

    shadow <- decay_n * shadow + (1 - decay_n) * theta,   decay_n = min(decay, (1 + n) / (10 + n))

where n counts updates from 1; the warm-up term lets the average forget the random
initialisation quickly (2/11 at the first update) before settling at `decay`.
"""
from collections.abc import Iterable

import torch
from torch import Tensor, nn

NUM_UPDATES_KEY = "num_updates"


class EMA:
    """fp32 shadow copies of the trainable parameters, keyed by parameter name.

    A plain object rather than an nn.Module, so that the shadow weights never show up in
    model.parameters() (optimizer, DDP/ZeRO wrapping) or get cast by model.to(torch.bfloat16);
    the training loop saves `state_dict()` beside the model's. The shadows live on the device
    the parameters had at construction.
    """

    def __init__(self, named_parameters: Iterable[tuple[str, nn.Parameter]], decay: float = 0.9999,
                 warmup: bool = True):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay={decay}: set it in [0, 1] (LDM uses 0.9999)")
        self.params = {name: p for name, p in named_parameters if p.requires_grad}
        if not self.params:
            raise ValueError("no trainable parameters: pass model.named_parameters() of the model to average")
        if NUM_UPDATES_KEY in self.params:
            raise ValueError(f"a parameter is named {NUM_UPDATES_KEY!r}, reserved by state_dict(); rename it")
        self.shadow = {name: p.detach().float().clone() for name, p in self.params.items()}
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self._stored: dict[str, Tensor] | None = None

    def decay_at(self, num_updates: int) -> float:
        """Decay of the num_updates-th update (counted from 1), the LitEma warm-up rule."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + num_updates) / (10 + num_updates))

    @torch.no_grad()
    def update(self):
        """Move each shadow towards its live parameter: shadow -= (1 - decay_n) (shadow - theta)."""
        self.num_updates += 1
        weight = 1.0 - self.decay_at(self.num_updates)
        for name, p in self.params.items():
            self.shadow[name].lerp_(p.detach().float(), weight)

    def _matching_params(self, module: nn.Module) -> dict[str, nn.Parameter]:
        params = dict(module.named_parameters())
        missing = sorted(set(self.shadow) - set(params))
        if missing:
            raise ValueError(f"module lacks averaged parameters {missing[:3]}...: pass the unwrapped model "
                             "(no DDP 'module.' or torch.compile '_orig_mod.' prefix)")
        return {name: params[name] for name in self.shadow}

    @torch.no_grad()
    def copy_to(self, module: nn.Module):
        """Load the averaged weights into `module` (cast to its parameters' dtype)."""
        for name, p in self._matching_params(module).items():
            p.copy_(self.shadow[name])

    @torch.no_grad()
    def store(self, module: nn.Module):
        """Remember `module`'s current weights, to put back with restore() after sampling with EMA."""
        self._stored = {name: p.detach().clone() for name, p in self._matching_params(module).items()}

    @torch.no_grad()
    def restore(self, module: nn.Module):
        if self._stored is None:
            raise ValueError("restore() without store(): call ema.store(module) before ema.copy_to(module)")
        for name, p in self._matching_params(module).items():
            p.copy_(self._stored[name])
        self._stored = None

    def state_dict(self) -> dict[str, Tensor]:
        """Flat {parameter name: fp32 shadow} plus {"num_updates": int64 scalar}; safetensors-ready."""
        return {**self.shadow, NUM_UPDATES_KEY: torch.tensor(self.num_updates, dtype=torch.int64)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor]):
        expected = set(self.shadow) | {NUM_UPDATES_KEY}
        if set(state) != expected:
            raise ValueError(f"EMA state keys differ: missing {sorted(expected - set(state))[:3]}, "
                             f"unexpected {sorted(set(state) - expected)[:3]}; load an EMA of this model")
        for name, shadow in self.shadow.items():
            if state[name].shape != shadow.shape:
                raise ValueError(f"EMA state {name!r} has shape {tuple(state[name].shape)}, "
                                 f"the model {tuple(shadow.shape)}: load the EMA of the same model")
            shadow.copy_(state[name])
        self.num_updates = int(state[NUM_UPDATES_KEY])
