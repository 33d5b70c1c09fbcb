"""The constants of one run, in one object: what every rollout, scoring and log-prob call of a run shares.

Built once at the start of a stage (`RunContext.build`) and passed to the rollout engines instead of threading
the tokenizer, stop ids, pad id, prompt format, temperature, suppressed ids, device and micro-batch size through
every call as positional parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RunContext:
    tokenizer: Any  # the policy's tokenizer (decodes responses, renders prompts for the reward model)
    stop_ids: tuple[int, ...]  # every id that ends a response: EOS, the generation config's, the end of turn
    pad_id: int  # pads prompts on the left and responses on the right; never sampled
    fmt: Any  # the prompts' format (`data_formats.chat.make_format`), for a reward model that reads another one
    temperature: float  # log-probs are taken under the distribution sampled from (greedy: 1.0)
    suppress_ids: tuple[int, ...]  # ids the sampler never draws (the pad token); log-probs forbid them too
    device: Any  # where the rollouts' tensors live
    micro_batch_size: int  # rows per forward of the no-grad passes

    @classmethod
    def build(cls, tokenizer, device, stop_ids=None, fmt=None, temperature: float = 1.0,
              micro_batch_size: int = 8) -> "RunContext":
        """A run's constants from its tokenizer: stop ids default to the tokenizer's
        (`rlhf.tokenization.stop_token_ids`), the pad token is the suppressed id."""
        from rlhf.tokenization import stop_token_ids

        stops = stop_token_ids(tokenizer) if stop_ids is None else stop_ids
        pad = tokenizer.pad_token_id
        return cls(tokenizer, tuple(stops), pad, fmt, temperature or 1.0, (pad,), device, micro_batch_size)
