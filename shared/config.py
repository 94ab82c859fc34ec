"""Hyper-parameters of local training: chosen by the coordinator, checked by every device."""

from __future__ import annotations

from dataclasses import dataclass

from attune.shared.errors import ConfigError


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one local round. Sent by the coordinator, checked by the device."""

    local_epochs: float = 1.0
    user_epochs: float = 1.0
    sample_rate: float = 0.2
    lr: float = 1.0
    user_lr: float = 1.0
    negatives: int = 4
    loss: str = "bce"
    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    private: bool = True
    joint_user: bool = True  # also train the user vector in the global phase
    lazy_noise: bool = True  # draw large item tables' noise lazily (same distribution, faster)
    update_clip: float = 0.0  # clip the whole update to this L2 norm (user-level DP); 0: off

    def __post_init__(self) -> None:
        if not 0.0 < self.sample_rate <= 1.0:
            raise ConfigError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if self.local_epochs < 0 or self.user_epochs < 0:
            raise ConfigError("local_epochs and user_epochs must be >= 0")
        if self.negatives < 1:
            raise ConfigError(f"negatives must be >= 1, got {self.negatives}")
        if self.loss not in ("bce", "bpr"):
            raise ConfigError(f"loss must be 'bce' or 'bpr', got {self.loss!r}")
        if self.update_clip < 0:
            raise ConfigError(f"update_clip must be >= 0, got {self.update_clip}")
        if self.private and (self.noise_multiplier <= 0 or self.max_grad_norm <= 0):
            raise ConfigError("private training needs noise_multiplier > 0 and max_grad_norm > 0")

    def steps(self, epochs: float) -> int:
        """Steps of Poisson sampling that cover ``epochs`` passes in expectation."""
        return round(epochs / self.sample_rate)

    @property
    def steps_per_round(self) -> int:
        return self.steps(self.user_epochs) + self.steps(self.local_epochs)
