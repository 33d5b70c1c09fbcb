"""The reward model as a scorer: one function used by PPO, eval and tests.

    scorer = load_scorer("runs/tiny/rm")
    scorer(["prompt + response", ...])          # -> (B,) float32 scores
    scorer.score_ids(input_ids, attention_mask)  # token ids in the reward model's vocabulary

The score is the scalar head read at the last non-pad token of prompt+response (left or right
padding, position ids counted from the first real token, so padding never changes a score).
With `normalize=True` the rm stage's stored mean/std are applied: (score - mean) / std.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rlhf.artifacts import expect_run
from rlhf.data import pad
from rlhf.losses import last_token_index
from rlhf.models import STATS_FILE, ScalarHead, load_model, load_tokenizer, model_dir, position_ids_from_mask
from rlhf.recipes import REWARD_RUNS
from rlhf.rollout import Generation, decode_responses



def rewards_at_last_token(scalar: ScalarHead, input_ids, attention_mask) -> torch.Tensor:
    """(B, T) ids -> (B,) head value at each row's last real token."""
    values = scalar(input_ids, attention_mask, position_ids_from_mask(attention_mask))  # (B, T)
    return values.gather(1, last_token_index(attention_mask)[:, None]).squeeze(1)


class RewardScorer:
    def __init__(self, spec: str, device="cpu", dtype: str = "float32", normalize: bool = False,
                 key: str = "reward_model", trust_remote_code: bool = False):
        expect_run(spec, set(REWARD_RUNS), key)
        self.tokenizer = load_tokenizer(spec, key, trust_remote_code=trust_remote_code)
        model = load_model(spec, key, task="seq_cls", dtype=dtype, trust_remote_code=trust_remote_code,
                           vocab=len(self.tokenizer))
        model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model = ScalarHead(model).to(device).eval().requires_grad_(False)
        self.device = device
        self.stored_stats = read_reward_stats(spec)  # what the rm stage fitted (None for other models)
        self.stats = self.stored_stats if normalize else None  # in use: scores are (score - mean) / std

    def use_stats(self, stats: dict | None) -> None:
        """Normalize scores with these mean/std from now on (None: raw scores)."""
        self.stats = stats

    def same_vocab(self, tokenizer) -> bool:
        """Whether the reward model reads `tokenizer`'s token ids as they are."""
        return self.tokenizer.get_vocab() == tokenizer.get_vocab()

    def score_generation(self, gen: Generation, prompts: list[str], tokenizer) -> torch.Tensor:
        """(B,) scores of generated rows: from the token ids when the vocabularies match, otherwise through text
        (`prompts` + each row's real response tokens decoded, EOS only where the response ended)."""
        if self.same_vocab(tokenizer):
            return self.score_ids(gen.sequences, gen.attention_mask)
        texts = [p + c for p, c in zip(prompts, decode_responses(tokenizer, gen))]
        return self(texts, ended=gen.ended.tolist()).to(gen.sequences.device)

    def score_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            scores = rewards_at_last_token(self.model, input_ids.to(self.device), attention_mask.to(self.device))
        if self.stats is not None:
            scores = (scores - self.stats["mean"]) / self.stats["std"]
        return scores

    def __call__(self, texts: list[str], batch_size: int = 16, ended: list[bool] | None = None) -> torch.Tensor:
        """Scores of prompt+response texts. Decoded text has lost the response's EOS, so EOS is appended
        where the response ended: to every text, or where `ended` (one flag per text) says so. A response
        cut at max_new_tokens is scored without it, as `score_ids` sees it in the token ids."""
        eos = self.tokenizer.eos_token_id
        out = []
        for i in range(0, len(texts), batch_size):
            ids = self.tokenizer(texts[i:i + batch_size], add_special_tokens=True)["input_ids"]
            flags = [True] * len(ids) if ended is None else [bool(e) for e in ended[i:i + batch_size]]
            ids = [x + [eos] if end and (not x or x[-1] != eos) else x for x, end in zip(ids, flags)]
            input_ids = pad(ids, self.tokenizer.pad_token_id)
            mask = pad([[1] * len(x) for x in ids], 0)
            out.append(self.score_ids(input_ids, mask).cpu())
        return torch.cat(out) if out else torch.zeros(0)


def load_scorer(spec: str, device="cpu", **kw) -> RewardScorer:
    return RewardScorer(spec, device, **kw)


def read_reward_stats(spec: str) -> dict | None:
    """mean/std stored by the rm stage (in the run folder and next to the weights)."""
    for place in (Path(spec), Path(model_dir(spec, "reward_model")[0])):
        f = place / STATS_FILE
        if f.is_file():
            return json.loads(f.read_text())
    return None
