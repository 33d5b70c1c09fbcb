"""KL penalty controllers for PPO (the coefficient of the per-token KL in the reward).

`fixed` keeps `kl_coef`; `adaptive` is the proportional controller of Ziegler et al. 2019
("Fine-Tuning Language Models from Human Preferences", section 2.2):
    e_t = clip(KL_t / KL_target - 1, -0.2, 0.2),   beta_{t+1} = beta_t * (1 + K_beta * e_t),
with K_beta = (episodes in this batch) / horizon. Both are stored in checkpoints (`state_dict`).
"""

from __future__ import annotations


class FixedKLController:
    def __init__(self, kl_coef: float, target: float = 0.0, horizon: int = 1):
        self.value = kl_coef

    def update(self, current_kl: float, n_episodes: int) -> float:
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    def __init__(self, kl_coef: float, target: float, horizon: int):
        super().__init__(kl_coef)
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_episodes: int) -> float:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_episodes / self.horizon
        return self.value


KL_CONTROLLERS = {"fixed": FixedKLController, "adaptive": AdaptiveKLController}
