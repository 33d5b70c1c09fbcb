"""The reward model as a scorer: one function used by PPO, eval and tests.

    scorer = load_scorer("runs/tiny/rm")
    scorer.score_generation(gen, prompts, tokenizer, fmt)  # rollouts of a policy -> (B,) float32 scores
    scorer.score_responses(prompts, completions, ended)    # decoded responses, rendered in the RM's format
    scorer(["prompt + response", ...])                      # raw texts
    scorer.score_ids(input_ids, attention_mask)             # token ids in the reward model's vocabulary

The score is the scalar head read at the last non-pad token of prompt+response (left or right
padding, position ids counted from the first real token, so padding never changes a score).
With `normalize=True` the rm stage's stored mean/std are applied: (score - mean) / std.

A reward model reads the format it was trained with (`format`: the rm run's `data.template`; for a hub or
exported model, its tokenizer's chat template). Rollouts are scored from their token ids when the policy
writes exactly that (same vocabulary, same format); otherwise each prompt record is rendered again in the
reward model's format, followed by the decoded response and, where the response ended, the reward model's
own end of turn (or EOS), tokenized as the rm stage tokenized its pairs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from data_formats.chat import TextFormat, declared_text_template, make_format
from data_formats.readers import Raw
from data_formats.schemas import parse_prompt
from rlhf.artifacts import expect_run
from rlhf.batching import pad
from rlhf.losses import last_token_index
from rlhf.errors import UserError
from rlhf.models import STATS_FILE, ScalarHead, load_model, model_dir, model_file, model_info, position_ids_from_mask
from rlhf.tokenization import load_tokenizer
from rlhf.recipes import REWARD_RUNS
from rlhf.rollout import Generation, decode_responses


def rewards_at_last_token(scalar: ScalarHead, input_ids, attention_mask) -> torch.Tensor:
    """(B, T) ids -> (B,) head value at each row's last real token."""
    values = scalar(input_ids, attention_mask, position_ids_from_mask(attention_mask))  # (B, T)
    return values.gather(1, last_token_index(attention_mask)[:, None]).squeeze(1)


def reads_ids(rm_tokenizer, rm_format, tokenizer, fmt) -> bool:
    """Whether a reward model (`rm_tokenizer`, `rm_format`) reads the token ids of prompts rendered by `fmt` and
    tokenized by `tokenizer` exactly as it was trained: the same vocabulary and the same format (a model with no
    format of its own reads whatever the policy writes)."""
    if rm_tokenizer.get_vocab() != tokenizer.get_vocab():
        return False
    return rm_format is None or (fmt is not None and fmt.signature == rm_format.signature)


def describe_format(fmt) -> str:
    """A format in words, for messages."""
    if fmt is None:
        return "no format of its own: the policy's prompt text"
    return "its chat template" if fmt.chat else f"the text template '{fmt.template.name}'"


def reward_format(manifest: dict | None, tokenizer, key: str):
    """The format a reward model reads: its rm run's `data.template`; for a hub or exported model, the text template
    its chat template declares (one exported by this pipeline) or the chat template itself; None when it has
    neither (it reads text as the policy renders it)."""
    if manifest is not None:
        return make_format(manifest.get("recipe", {}).get("data", {}).get("template", "alpaca"), tokenizer, key)
    text = declared_text_template(tokenizer.chat_template)
    if text is not None:
        return TextFormat(text, key)
    return make_format("chat", tokenizer, key) if tokenizer.chat_template else None


class RewardScorer:
    def __init__(self, spec: str, device="cpu", dtype: str = "float32", normalize: bool = False,
                 key: str = "reward_model", trust_remote_code: bool = False):
        manifest = expect_run(spec, set(REWARD_RUNS), key)
        if manifest is None and model_info(spec, key).get("task") != "seq_cls":
            # a causal LM would get a new zero-initialised score head: every score 0, every comparison a tie
            raise UserError(f"{spec} is a causal language model, not a reward model (no trained score head): name an "
                            f"rm run or a ...ForSequenceClassification model", None, key)
        self.tokenizer = load_tokenizer(spec, key, trust_remote_code=trust_remote_code)
        self.format = reward_format(manifest, self.tokenizer, key)
        # the token a finished response ends with here: the format's end of turn ('<|im_end|>'), else EOS
        end = getattr(self.format, "end", None)
        self.end_id = self.tokenizer.convert_tokens_to_ids(end) if end else self.tokenizer.eos_token_id
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

    def reads_ids_of(self, tokenizer, fmt) -> bool:
        """Whether prompts rendered by `fmt` and tokenized by `tokenizer` are token for token what this reward
        model was trained on (`reads_ids`)."""
        return reads_ids(self.tokenizer, self.format, tokenizer, fmt)

    def score_generation(self, gen: Generation, prompts: list[dict], tokenizer, fmt) -> torch.Tensor:
        """(B,) scores of a policy's rollouts: from the token ids when it writes what the reward model reads
        (`reads_ids_of`), otherwise through text (`score_responses`). `prompts`: the rows' encoded prompts
        ({'prompt', 'record'}, `rlhf.data.encode_prompts`); `tokenizer`, `fmt`: the policy's."""
        if self.reads_ids_of(tokenizer, fmt):
            return self.score_ids(gen.sequences, gen.attention_mask)
        scores = self.score_responses(prompts, decode_responses(tokenizer, gen), gen.ended.tolist())
        return scores.to(gen.sequences.device)

    def score_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            scores = rewards_at_last_token(self.model, input_ids.to(self.device), attention_mask.to(self.device))
        if self.stats is not None:
            scores = (scores - self.stats["mean"]) / self.stats["std"]
        return scores

    def score_responses(self, prompts: list[dict], completions: list[str], ended: list[bool],
                        batch_size: int = 16) -> torch.Tensor:
        """Scores of decoded responses to encoded prompts ({'prompt', 'record'}), each rendered as the reward
        model was trained (`encode`)."""
        return self._score([self.encode(p, c, e) for p, c, e in zip(prompts, completions, ended)], batch_size)

    def encode(self, prompt: dict, completion: str, ended: bool) -> list[int]:
        """The ids the reward model reads for one response: the prompt record rendered in its format (a chat
        template, or a text template with the tokenizer's BOS), then the response, then, where it ended, the
        format's end of turn (a chat reply rendered by the template) or EOS; prompt and response tokenized
        apart, as `rlhf.data.encode_preferences` does. With no format: the policy's prompt text + response."""
        fmt, rec = self.format, prompt["record"]
        if fmt is None or not rec.record:  # nothing to re-render: the text as the policy wrote it
            return self.text_ids(prompt["prompt"] + completion, ended)
        mine = parse_prompt(Raw(rec.where, rec.record), fmt)
        reply = fmt.reply(mine.messages, completion, rec.where) if ended and fmt.chat and not fmt.eos else completion
        ids = self.tokenizer(mine.prompt, add_special_tokens=mine.special_tokens)["input_ids"]
        ids += self.tokenizer(reply, add_special_tokens=False)["input_ids"]
        return ids + [self.tokenizer.eos_token_id] * (ended and fmt.eos)

    def text_ids(self, text: str, ended: bool) -> list[int]:
        """A raw text's ids: the tokenizer's special tokens (BOS) unless the text already begins with them (a
        chat template wrote them), and the end token (`end_id`) if the response ended."""
        bos = self.tokenizer.bos_token
        ids = self.tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]
        return ids + [self.end_id] if ended and (not ids or ids[-1] != self.end_id) else ids

    def __call__(self, texts: list[str], batch_size: int = 16, ended: list[bool] | None = None) -> torch.Tensor:
        """Scores of prompt+response texts. Decoded text has lost the response's end token, so it is appended
        where the response ended: to every text, or where `ended` (one flag per text) says so. A response cut
        at max_new_tokens is scored without it, as `score_ids` sees it in the token ids."""
        flags = [True] * len(texts) if ended is None else [bool(e) for e in ended]
        return self._score([self.text_ids(t, e) for t, e in zip(texts, flags)], batch_size)

    def _score(self, ids: list[list[int]], batch_size: int) -> torch.Tensor:
        out = []
        for i in range(0, len(ids), batch_size):
            chunk = ids[i:i + batch_size]
            input_ids = pad(chunk, self.tokenizer.pad_token_id)
            mask = pad([[1] * len(x) for x in chunk], 0)
            out.append(self.score_ids(input_ids, mask).cpu())
        return torch.cat(out) if out else torch.zeros(0)


def load_scorer(spec: str, device="cpu", **kw) -> RewardScorer:
    return RewardScorer(spec, device, **kw)


def read_reward_stats(spec: str) -> dict | None:
    """mean/std stored by the rm stage: in the run folder, next to the weights (kept by `export`, so also in an
    exported model's folder or hub repo); None when there are none."""
    if Path(spec, STATS_FILE).is_file():
        return json.loads(Path(spec, STATS_FILE).read_text())
    f = model_file(model_dir(spec, "reward_model")[0], STATS_FILE)
    return json.loads(f.read_text()) if f is not None else None
