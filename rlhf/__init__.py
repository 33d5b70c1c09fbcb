"""rlhf: an RLHF post-training pipeline (pretrain, SFT with LoRA, reward model, PPO, DPO, export).

The math lives in `rlhf.losses` (pure functions of tensors); stages are in the top-level `stages`
package, one `run(recipe) -> Path` each; record formats and the task suite in `data_formats`.
"""

__version__ = "0.1.0"
