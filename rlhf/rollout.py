"""Rollout engines: sample responses for a batch of left-padded prompts.

An engine is an object with a lifecycle (`Engine`): built once per run from the policy (`build_engine`), told
to follow the policy after every update (`sync`), asked for a `Generation` per batch of prompts (`generate`),
closed at the end. `ENGINES` maps the names a recipe's `generate.engine` takes to them, so a faster engine
(vLLM, a CUDA-graph decoder) can be added without touching the stages. `stop_ids` are every id that ends a
response (`rlhf.tokenization.stop_token_ids`: EOS, the generation config's list, the chat template's end of turn
such as `<|im_end|>`). Every engine returns responses truncated after the first stop id and right-padded
with the pad token, with a mask that is 1 on real response tokens (the stop token included).

`synced=True` says that every process calls the engine together (PPO's rollouts and gold evaluation):
with sharded weights (FSDP) each forward gathers them from every process, so all processes must run the
same number of forwards, and a process whose rows have all ended keeps decoding until every one has.
"""

from __future__ import annotations

import copy

from dataclasses import dataclass
from functools import partial
from typing import Iterator, Sequence

import torch
import torch.distributed as dist

from rlhf.logprobs import prepare_logits


@dataclass
class Generation:
    sequences: torch.Tensor  # (B, P + A) prompt (left-padded) + response (right-padded)
    attention_mask: torch.Tensor  # (B, P + A)
    response_mask: torch.Tensor  # (B, A) 1 on response tokens up to and including the first stop token
    ended: torch.Tensor  # (B,) True where the response contains a stop token (EOS or end of turn)
    prompt_width: int  # P
    # (B, A) float32: the sampler's own log-prob of each response token (0 on padding), when the engine reports
    # them (vLLM); None for the engines that decode with the training module itself
    logprobs: torch.Tensor | None = None

    @property
    def responses(self) -> torch.Tensor:  # (B, A)
        return self.sequences[:, self.prompt_width:]


def decode_responses(tokenizer, gen: Generation) -> list[str]:
    """Each row's real response tokens as text. Pad positions are dropped, not decoded: masking them to
    id 0 instead would append id 0's character ('!' in many vocabularies) to every text."""
    return [tokenizer.decode(row[mask.bool()].tolist(), skip_special_tokens=True)
            for row, mask in zip(gen.responses, gen.response_mask)]


def processes() -> int:
    """Processes in the default torch.distributed group (1 when it is not initialized)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_stop(tokens: torch.Tensor, stop_ids: Sequence[int]) -> torch.Tensor:
    """Where `tokens` is one of `stop_ids` (any shape -> bool of the same shape)."""
    return torch.isin(tokens, torch.as_tensor(list(stop_ids), dtype=tokens.dtype, device=tokens.device))


def truncate_after_eos(responses: torch.Tensor, stop_ids: Sequence[int], pad_id: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep tokens up to and including the first stop token (any of `stop_ids`); pad the rest.
    (B, A) -> (responses, mask, ended)."""
    stops = is_stop(responses, stop_ids)
    ended = stops.any(-1)
    # position of the first stop token (A when there is none); tokens at or before it are real
    first = torch.where(ended, stops.float().argmax(-1), torch.full_like(ended, responses.shape[1], dtype=torch.long))
    positions = torch.arange(responses.shape[1], device=responses.device)
    mask = positions[None, :] <= first[:, None]
    return responses.masked_fill(~mask, pad_id), mask.long(), ended


def hf_generate(model, input_ids, attention_mask, cfg, stop_ids: Sequence[int], pad_id: int,
                keys: torch.Tensor | None = None, synced: bool = False, static_cache: bool = False) -> Generation:
    """transformers' `generate` (KV cache; a static, compilable cache on GPU when asked), stopping a row at any
    of `stop_ids`. Its sampling draws from torch's global generator: samples depend on batching and process
    count (`keys` unused)."""
    sample = cfg.temperature > 0
    kwargs = dict(max_new_tokens=cfg.max_new_tokens, do_sample=sample, eos_token_id=list(stop_ids),
                  pad_token_id=pad_id, suppress_tokens=[pad_id], use_cache=True,
                  synced_gpus=synced and processes() > 1)
    if sample:  # top_k 0 / top_p 1 switch filtering off, also over a generation_config that sets them
        kwargs.update(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
    if static_cache:
        kwargs["cache_implementation"] = "static"
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    width = input_ids.shape[1]
    responses, mask, ended = truncate_after_eos(out[:, width:], stop_ids, pad_id)
    if responses.shape[1] == 0:  # nothing generated at all (max_new_tokens reached instantly)
        responses = torch.full((input_ids.shape[0], 1), pad_id, device=input_ids.device)
        mask = torch.zeros_like(responses)
    sequences = torch.cat([input_ids, responses], dim=1)
    return Generation(sequences, torch.cat([attention_mask, mask], dim=1), mask, ended, width)


# --- a seeded decoder: every row's randomness depends only on its key, not on batch or process layout ----

_M31 = (1 << 31) - 1


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 31-bit integer hash (xorshift-multiply rounds; products stay below 2^62, so int64 never overflows)."""
    for mult in (0x45D9F3B, 0x2C1B3C6D, 0x297A2D39):
        x = ((x ^ (x >> 16)) * mult) & _M31
    return x ^ (x >> 15)


def row_keys(seed: int, step: int, indices: list[int] | torch.Tensor, device=None) -> torch.Tensor:
    """One random key per example from (seed, step, example index)."""
    idx = torch.as_tensor(indices, dtype=torch.long, device=device)
    return _mix((idx * 0x3C6EF35 + _mix(torch.tensor(seed * 0x9E3779B + step, device=device) & _M31)) & _M31)


def gumbel_noise(keys: torch.Tensor, step: int, vocab: int) -> torch.Tensor:
    """(B,) keys -> (B, V) Gumbel(0, 1) noise, a pure function of (key, step, token id)."""
    ids = torch.arange(vocab, device=keys.device)
    x = _mix((keys[:, None] * 0x5851F42 + ids[None, :] * 0x14057B7 + _mix(torch.tensor(step + 1, device=keys.device)))
             & _M31)
    u = (x.double() + 0.5) / float(1 << 31)
    return -torch.log(-torch.log(u)).float()


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k then nucleus (top-p) filtering: removed tokens get -inf. (B, V) -> (B, V)"""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove = cumulative - sorted_logits.softmax(-1) > top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    return logits


def seeded_generate(model, input_ids, attention_mask, cfg, stop_ids: Sequence[int], pad_id: int,
                    keys: torch.Tensor | None = None, synced: bool = False) -> Generation:
    """Our own KV-cached decoder with Gumbel-max sampling from hashed noise; a row ends at any of `stop_ids`.

    Each row's sample is a function of its key (and the model), so a rollout is the same whatever the
    batch size, chunking or number of processes: 1-process and N-process PPO runs see the same samples.
    Finished rows are checked on the host only every 8 tokens (with `synced`, over all processes there).
    """
    from transformers import DynamicCache

    from rlhf.models import position_ids_from_mask

    batch = input_ids.shape[0]
    if keys is None:
        keys = row_keys(0, 0, range(batch), input_ids.device)
    mask = attention_mask.clone()
    positions = position_ids_from_mask(mask)
    cache = DynamicCache()
    done = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    tokens = []
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                    use_cache=True, logits_to_keep=1)
        for step in range(cfg.max_new_tokens):
            # the distribution the update scores tokens under too (response_logprobs with suppress_ids)
            logits = prepare_logits(out.logits[:, -1, :], cfg.temperature or 1.0, suppress_ids=(pad_id,))
            if cfg.temperature > 0:
                logits = filter_logits(logits, cfg.top_k, cfg.top_p)
                nxt = (logits + gumbel_noise(keys, step, logits.shape[-1])).argmax(-1)
            else:
                nxt = logits.argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            tokens.append(nxt)
            stopped = is_stop(nxt, stop_ids)
            done = done | stopped
            if step + 1 == cfg.max_new_tokens or (step % 8 == 7 and _all_done(done, synced)):
                break
            mask = torch.cat([mask, (~done | stopped).long()[:, None]], dim=1)
            positions = positions[:, -1:] + 1
            out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=positions, past_key_values=cache,
                        use_cache=True)
    responses, rmask, ended = truncate_after_eos(torch.stack(tokens, 1), stop_ids, pad_id)
    sequences = torch.cat([input_ids, responses], dim=1)
    return Generation(sequences, torch.cat([attention_mask, rmask], dim=1), rmask, ended, input_ids.shape[1])


def _all_done(done: torch.Tensor, synced: bool) -> bool:
    """Whether every row has ended (with `synced`: on every process; MIN over processes of 0/1)."""
    finished = done.all()
    if synced and processes() > 1:
        finished = finished.to(torch.int32)
        dist.all_reduce(finished, op=dist.ReduceOp.MIN)
    return bool(finished)


class Engine:
    """A rollout engine with a lifecycle: built once per run from the policy (`build_engine`), `sync(policy)` after
    every update and before the next rollout, `generate` for each batch of prompts, `close` at the end (also as a
    context manager). `ctx` (`rlhf.context.RunContext`) holds the run's stop ids, pad id, device and tokenizer;
    `cfg` is the recipe's `generate` section (a call may pass another, e.g. greedy)."""

    name = "engine"

    def __init__(self, policy, ctx, cfg):
        self.policy, self.ctx, self.cfg = policy, ctx, cfg

    def sync(self, policy) -> dict[str, float]:
        """Make the engine sample from `policy`'s current weights; returns timing/size figures (may be empty)."""
        self.policy = policy
        return {}

    def generate(self, input_ids, attention_mask, cfg=None, keys: torch.Tensor | None = None,
                 synced: bool = False) -> Generation:
        """Sample (or greedily decode, temperature 0) responses for left-padded prompts. Prompts too long for the
        model's positions are cut from the left first (`data.fit_to_positions`)."""
        from rlhf.data import fit_to_positions, model_positions

        cfg = cfg or self.cfg
        positions = model_positions(self.policy)
        if positions is not None:  # never past the model's positions: room after the batch, at least half of them
            new_tokens = min(cfg.max_new_tokens, max(positions - input_ids.shape[1], positions // 2, 1))
            if new_tokens != cfg.max_new_tokens:
                cfg = copy.copy(cfg)
                cfg.max_new_tokens = new_tokens
        input_ids, attention_mask = fit_to_positions(self.policy, input_ids, attention_mask, cfg.max_new_tokens,
                                                     self.ctx.pad_id)
        return self._decode(input_ids, attention_mask, cfg, keys, synced)

    def _decode(self, input_ids, attention_mask, cfg, keys, synced) -> Generation:
        raise NotImplementedError

    def idle(self) -> None:
        """Called when a rollout phase ends: an engine holding device memory may release it until the next `sync`."""

    def close(self) -> None:
        self.policy = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ModuleEngine(Engine):
    """An engine that decodes with the training module itself (`decode`: `seeded_generate` or `hf_generate`): it
    reads the live weights, so `sync` only points it at the policy."""

    def __init__(self, policy, ctx, cfg, decode=seeded_generate, name: str = "seeded"):
        super().__init__(policy, ctx, cfg)
        self.decode, self.name = decode, name

    def _decode(self, input_ids, attention_mask, cfg, keys, synced) -> Generation:
        was_training = self.policy.training
        self.policy.eval()
        try:
            return self.decode(self.policy, input_ids, attention_mask, cfg, self.ctx.stop_ids, self.ctx.pad_id,
                               keys=keys, synced=synced)
        finally:
            self.policy.train(was_training)


def _vllm_engine(policy, ctx, cfg) -> Engine:
    from rlhf.vllm_engine import VLLMEngine  # imported only when a recipe names it (vLLM is an optional extra)

    return VLLMEngine(policy, ctx, cfg)


# recipe name (`generate.engine`) -> engine class (policy, ctx, cfg) -> Engine
ENGINES = {"seeded": partial(ModuleEngine, decode=seeded_generate, name="seeded"),
           "hf": partial(ModuleEngine, decode=hf_generate, name="hf"),
           "hf_static": partial(ModuleEngine, decode=partial(hf_generate, static_cache=True), name="hf_static"),
           "vllm": _vllm_engine}


def build_engine(policy, ctx, cfg, engine: str | None = None) -> Engine:
    """The named engine (default: `cfg.engine`) for `policy`, built once per run."""
    return ENGINES[engine or getattr(cfg, "engine", "seeded")](policy, ctx, cfg)


def module_engine(model, stop_ids: Sequence[int], pad_id: int, cfg, engine: str | None = None,
                  tokenizer=None, device=None) -> Engine:
    """An engine over `model` from loose constants (tests, SFT samples), built for a few calls: close it after."""
    from rlhf.context import RunContext

    device = device if device is not None else next(model.parameters()).device
    ctx = RunContext(tokenizer, tuple(stop_ids), pad_id, None, cfg.temperature or 1.0, (pad_id,), device, 8)
    return build_engine(model, ctx, cfg, engine)


def generate(model, input_ids, attention_mask, cfg, stop_ids: Sequence[int], pad_id: int, engine: str | None = None,
             keys: torch.Tensor | None = None, synced: bool = False) -> Generation:
    """One batch from `model` with the named module engine (default: `cfg.engine`), built for this call."""
    with module_engine(model, stop_ids, pad_id, cfg, engine, device=input_ids.device) as run:
        return run.generate(input_ids, attention_mask, cfg, keys, synced)


def generate_batches(engine: Engine, prompt_ids: list[list[int]], cfg, keys: torch.Tensor | None = None,
                     synced: bool = False, min_batches: int = 0) -> Iterator[tuple[int, Generation]]:
    """Generate for `prompt_ids`, `cfg.batch_size` prompts (left-padded) at a time: yields (index of the batch's
    first prompt, Generation). `keys` (one per prompt, see `row_keys`) make each row's sample independent of
    the batching. `min_batches`: generate calls to make at least; a call beyond the prompts decodes a one-token
    placeholder whose row is not a prompt's (synced processes with fewer prompts join the forwards)."""
    from rlhf.batching import collate_prompts

    size, pad_id, device = cfg.batch_size, engine.ctx.pad_id, engine.ctx.device
    for start in range(0, max(min_batches * size, len(prompt_ids)), size):
        chunk = prompt_ids[start:start + size] or [[engine.ctx.stop_ids[0]]]
        batch = collate_prompts([{"prompt_ids": p} for p in chunk], pad_id)
        chunk_keys = keys[start:start + size] if keys is not None and start < len(keys) else None
        yield start, engine.generate(batch["input_ids"].to(device), batch["attention_mask"].to(device), cfg,
                                     chunk_keys, synced)


def complete(model, tokenizer, prompt_ids: list[list[int]], cfg, device, engine: str | None = None,
             seed: int = 0, step: int = 0, first: int = 0, batches: int = 0,
             synced: bool = False, stop_ids: Sequence[int] | None = None) -> list[dict]:
    """Decode completions for prompts: [{'completion', 'ended', 'tokens'}], each ending at the first of
    `stop_ids` (default: the tokenizer's, `rlhf.tokenization.stop_token_ids(tokenizer)`: EOS and its chat template's
    end of turn; pass the model's own list, read from its folder, when there is one).

    `model`: an `Engine` (its own stop ids then) or a module (decoded by the module engine `engine`, default
    `cfg.engine`). `first`: index of prompt_ids[0] in a longer list sharded over processes (the seeded noise is
    keyed by it, so a shard decodes as the whole list would). `batches`: generate calls to make at least (see
    `generate_batches`).
    """
    from rlhf.tokenization import stop_token_ids

    if not isinstance(model, Engine):
        stop_ids = stop_token_ids(tokenizer) if stop_ids is None else stop_ids
        with module_engine(model, stop_ids, tokenizer.pad_token_id, cfg, engine, tokenizer, device) as built:
            return complete(built, tokenizer, prompt_ids, cfg, device, seed=seed, step=step, first=first,
                            batches=batches, synced=synced)
    keys = row_keys(seed, step, range(first, first + len(prompt_ids)), device)
    out = []
    for start, gen in generate_batches(model, prompt_ids, cfg, keys, synced, batches):
        real = prompt_ids[start:start + cfg.batch_size]
        for _, text, mask, ended in zip(real, decode_responses(tokenizer, gen), gen.response_mask, gen.ended):
            out.append({"completion": text, "ended": bool(ended), "tokens": int(mask.sum())})
    return out


def write_samples(path, rows: list[dict]) -> None:
    """A Markdown table prompt -> completion (the prompt's last 300 characters)."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", "<br>")

    lines = ["| prompt | completion | EOS |", "| --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {cell(r['prompt'][-300:])} | {cell(r['completion'])} | {'yes' if r['ended'] else 'no'} |")
    path.write_text("\n".join(lines) + "\n")


def concat(gens: list[Generation], pad_id: int) -> Generation:
    """Join generations of different widths: prompts re-padded on the left, responses on the right."""
    if len(gens) == 1:
        return gens[0]
    p = max(g.prompt_width for g in gens)
    a = max(g.responses.shape[1] for g in gens)

    def lpad(x, width, value):
        return torch.nn.functional.pad(x, (width - x.shape[1], 0), value=value)

    def rpad(x, width, value):
        return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)

    seqs, masks, rmasks, logprobs = [], [], [], []
    for g in gens:
        if g.logprobs is not None:
            logprobs.append(rpad(g.logprobs, a, 0.0))
        prompt, prompt_mask = g.sequences[:, :g.prompt_width], g.attention_mask[:, :g.prompt_width]
        seqs.append(torch.cat([lpad(prompt, p, pad_id), rpad(g.responses, a, pad_id)], 1))
        masks.append(torch.cat([lpad(prompt_mask, p, 0), rpad(g.response_mask, a, 0)], 1))
        rmasks.append(rpad(g.response_mask, a, 0))
    return Generation(torch.cat(seqs), torch.cat(masks), torch.cat(rmasks), torch.cat([g.ended for g in gens]), p,
                      torch.cat(logprobs) if len(logprobs) == len(gens) else None)


def sample(engine: Engine, examples: list[dict], cfg, keys: torch.Tensor | None = None,
           synced: bool = False) -> Generation:
    """Rollouts for prompt examples ({'prompt_ids'}) as one Generation (see `generate_batches`)."""
    gens = generate_batches(engine, [e["prompt_ids"] for e in examples], cfg, keys, synced)
    return concat([gen for _, gen in gens], engine.ctx.pad_id)


def sampler_mismatch(accelerator, gen: Generation, old_logprobs: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """|sampler − trainer| log-prob of every response token, over all processes: `rollout/logprob_diff_max` and
    `rollout/logprob_diff_mean` (empty for engines that report no log-probs: they sample from the trained module)."""
    if gen.logprobs is None:
        return {}
    from rlhf.runtime import global_sums

    diff = (gen.logprobs - old_logprobs).abs() * mask
    sums = global_sums(accelerator, {"sum": diff.sum(), "n": mask.sum()})
    top = accelerator.gather(diff.max().reshape(1) if diff.numel() else torch.zeros(1, device=diff.device)).max()
    return {"rollout/logprob_diff_max": float(top), "rollout/logprob_diff_mean": sums["sum"] / max(sums["n"], 1.0)}
