"""`rlhf check RECIPE [key=value ...]`: pre-flight for any stage's recipe, in seconds.

Validates the recipe and every data file the stage will read (training data, ppo gold prompts, the
pretraining corpus, eval prompts, export parity prompts; first error with file:line), loads the
tokenizers, checks pad != eos, that EOS (or the chat template's end-of-turn token) ends the trained
labels, that the reward head reads the last non-pad token, and prints two rendered examples showing
which tokens are trained (every assistant turn of a conversation), the token-length
distribution and how many records truncation drops or cuts (information: the stages train on cut
records). Exit 0 when ready, 2 when not (the CLI prints the error line).
"""

from __future__ import annotations

import sys

from data_formats.chat import CHAT, make_format
from data_formats.schemas import parse_alpaca, parse_preference, parse_prompt
from data_formats.tasks import has_gold
from rlhf.artifacts import check_parents, expect_run
from rlhf.data import (IGNORE_INDEX, encode_preferences, encode_prompts, encode_sft, length_stats, load_gold_prompts,
                       load_split, read_corpus, read_prompts)
from rlhf.batching import collate_pairs
from rlhf.errors import UserError
from rlhf.losses import last_token_index
from rlhf.models import model_dir
from rlhf.tokenization import load_tokenizer, stop_token_ids, tokenizer_for
from rlhf.recipes import REWARD_RUNS, load_recipe
from rlhf.registry import ADVANTAGE_ESTIMATORS, POLICY_LOSSES, PREFERENCE_LOSSES
from rlhf.rewards import check_records, load_reward_fn
from rlhf.tracking import check_installed
from rlhf.roles import check_reward_stats
from rlhf.scoring import describe_format, reads_ids, reward_format


class Style:
    """Trained tokens highlighted (ANSI on a terminal, [[...]] markers otherwise)."""

    def __init__(self, tty: bool):
        self.tty = tty

    def trained(self, text: str) -> str:
        return f"\033[1;32m{text}\033[0m" if self.tty else f"[[{text}]]"

    def ignored(self, text: str) -> str:
        return f"\033[2m{text}\033[0m" if self.tty else text


def render(tokenizer, ids: list[int], trained: list[bool], style: Style) -> str:
    """Decode token by token; consecutive trained tokens form one highlighted span."""
    out, span, span_trained = [], [], None
    for tok, flag in zip(ids, trained):
        if span and flag != span_trained:
            text = tokenizer.decode(span)
            out.append(style.trained(text) if span_trained else style.ignored(text))
            span = []
        span.append(tok)
        span_trained = flag
    if span:
        text = tokenizer.decode(span)
        out.append(style.trained(text) if span_trained else style.ignored(text))
    return "".join(out)


def _report(title: str, counts: dict, lengths: list[int]) -> None:
    print(f"{title}: {counts.get('train_records', 0)} train / {counts.get('eval_records', 0)} eval records, "
          f"{counts.get('invalid_skipped', 0)} invalid skipped, {counts.get('dropped_too_long', 0)} dropped as too "
          f"long, {counts.get('truncated', 0)} truncated")
    print(f"tokens per example: {length_stats(lengths)}")


SHOWN = 2  # rendered examples printed per check


def _show(texts: list[str], title: str = "---") -> None:
    for text in texts[:SHOWN]:
        print(title)
        print(text)


def end_of_response(fmt, tokenizer) -> tuple[int, str]:
    """(id, name) of the token that ends a trained response: EOS, or the chat template's end of turn."""
    if fmt.eos:
        return tokenizer.eos_token_id, "EOS"
    return tokenizer.convert_tokens_to_ids(fmt.end), f"the end-of-turn token {fmt.end!r}"


def check_sft(recipe, tokenizer, style: Style) -> None:
    data = recipe.data
    split = load_split(data, parse_alpaca, recipe.seed, tokenizer=tokenizer)
    examples, counts = encode_sft(split.train, tokenizer, data.max_len, data.train_on_prompt,
                                  max_prompt_len=data.max_prompt_len)
    _report("sft data", {**split.counts, **counts}, [len(e["input_ids"]) for e in examples])
    end, name = end_of_response(split.format, tokenizer)
    no_eos = sum(1 for e in examples if e["labels"][-1] != end)
    if no_eos == len(examples):
        raise_error(f"no example ends its trained labels with {name}: the model would never learn to stop",
                    "data.max_len")
    print(f"{name} ends the labels of {len(examples) - no_eos} of {len(examples)} examples (the rest were cut)")
    if split.format.chat and not split.format.eos:
        _turns_tokenize_as_one(split.train[:200], tokenizer)
    _show([render(tokenizer, e["input_ids"], [lab != IGNORE_INDEX for lab in e["labels"]], style)
           for e in examples])


def _turns_tokenize_as_one(records: list, tokenizer) -> None:
    """Training tokenizes a conversation turn by turn (the prompt as generation sees it); say whether that
    equals tokenizing the whole rendered text, as a chat client does (a tokenizer may merge across turns)."""
    examples, _ = encode_sft(records, tokenizer, 10 ** 9, train_on_prompt=True)
    texts = [r.prompt + r.response + "".join(turn.text for turn in r.rest) for r in records]
    whole = tokenizer(texts, add_special_tokens=False)["input_ids"]
    same = sum(e["input_ids"] == ids for e, ids in zip(examples, whole))
    print(f"turn-by-turn token ids equal those of the whole rendered conversation in {same} of {len(records)} "
          f"examples" + ("" if same == len(records) else " (the tokenizer merges text across turn boundaries; "
                                                          "training keeps the ids generation sees after each prompt)"))


def _whole(pair: dict, eos: int) -> bool:
    """Both responses still end in EOS (or the end-of-turn token), i.e. truncation cut neither."""
    return pair["chosen_ids"][-1] == eos and pair["rejected_ids"][-1] == eos


def check_pairs(recipe, tokenizer, style: Style, reward_head: bool) -> None:
    data = recipe.data
    split = load_split(data, lambda raw, fmt: parse_preference(raw, fmt, data.format), recipe.seed,
                       tokenizer=tokenizer)
    pairs, counts = encode_preferences(split.train, tokenizer, data.max_len, data.max_prompt_len)
    _report("preference data", {**split.counts, **counts},
            [len(p["prompt_ids"]) + max(len(p["chosen_ids"]), len(p["rejected_ids"])) for p in pairs])
    # the stage trains on truncated pairs too, so truncation is information here, not a failure; the
    # examples shown (and the reward-head check) use pairs that kept their EOS when there are any
    eos, _ = end_of_response(split.format, tokenizer)
    shown = [p for p in pairs if _whole(p, eos)][:SHOWN] or pairs[:SHOWN]
    batch = collate_pairs(shown, tokenizer.pad_token_id)
    last = last_token_index(batch["attention_mask"])
    for row in range(batch["input_ids"].shape[0]):
        ids = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
        print("--- chosen" if row < len(shown) else "--- rejected")
        print(render(tokenizer, ids, [lab != IGNORE_INDEX for lab in batch["labels"][row][:len(ids)].tolist()],
                     style))
        read = int(batch["input_ids"][row, last[row]])
        if reward_head and read != ids[-1]:
            raise_error(f"the reward head would read {tokenizer.decode([read])!r}, not the last token of the "
                        f"response {tokenizer.decode([ids[-1]])!r}", "data")
    if reward_head:
        cut = sum(1 for p in shown if not _whole(p, eos))
        end = repr(tokenizer.convert_ids_to_tokens(eos))
        what = end if not cut else \
            f"{end}, or the last kept token of a truncated response ({cut} of {len(shown)} shown)"
        print(f"reward head reads the last non-pad token of every row: {what} (checked on a padded batch of "
              f"{batch['input_ids'].shape[0]} rows)")


def check_prompts(recipe, tokenizer) -> None:
    split = load_split(recipe.data, parse_prompt, recipe.seed, tokenizer=tokenizer)
    prompts, counts = encode_prompts(split.train, tokenizer, recipe.data.max_prompt_len)
    _report("prompts", {**split.counts, **counts}, [len(p["prompt_ids"]) for p in prompts])
    if recipe.ppo.reward_fn:  # importable, and (gold) every prompt carries an answer to grade
        load_reward_fn(recipe.ppo.reward_fn)
        check_records(recipe.ppo.reward_fn, [p["meta"] for p in prompts])
        print(f"reward function: {recipe.ppo.reward_fn}")
    _show([p["prompt"] for p in prompts])


def check_reward_model(recipe, tokenizer) -> None:
    """The reward model's statistics (`ppo.reward_stats: rm_data`) and how it will read the rollouts: their token
    ids, or the text rendered again in its own format."""
    spec, key = recipe.ppo.reward_model, "ppo.reward_model"
    model_dir(spec, key)
    check_reward_stats(recipe.ppo)
    rm_tokenizer = load_tokenizer(spec, key)
    rm_format = reward_format(expect_run(spec, set(REWARD_RUNS), key), rm_tokenizer, key)
    fmt = make_format(recipe.data.template, tokenizer)
    if reads_ids(rm_tokenizer, rm_format, tokenizer, fmt):
        print("reward model: reads the policy's token ids (the same vocabulary and format)")
    else:
        print(f"reward model: scores through text, each prompt rendered in {describe_format(rm_format)} and the "
              f"decoded response followed by its own end token where it ended")


def check_gold(recipe, tokenizer) -> None:
    """The over-optimization monitor's prompts, read as the ppo stage reads them."""
    ppo = recipe.ppo
    if not ppo.gold_prompts:
        return
    if not ppo.gold_every:
        print("ppo.gold_prompts is set but ppo.gold_every is 0: the gold monitor is off")
        return
    gold = load_gold_prompts(ppo.gold_prompts, recipe.data.template, tokenizer, recipe.data.max_prompt_len,
                             ppo.gold_count, recipe.seed)
    print(f"gold prompts: {len(gold)} with gold answers, graded every {ppo.gold_every} iterations")


def check_corpus(recipe) -> None:
    docs = read_corpus(recipe.data.train)
    print(f"corpus: {len(docs)} documents from {len(recipe.data.train)} file(s)")
    if recipe.tokenizer.existing:
        tok = load_tokenizer(recipe.tokenizer.existing, "tokenizer.existing", pad_token=recipe.tokenizer.pad_token)
        _print_tokenizer(tok)
    _show([doc if len(doc) <= 400 else doc[:400] + " ..." for doc in docs])


def check_eval(recipe) -> None:
    section = recipe.eval
    for key, spec in (("eval.reward_model", section.reward_model), ("eval.reference", section.reference),
                      ("eval.judge", section.judge)):
        if spec:
            model_dir(spec, key)
    for name, spec in section.models.items():  # each model's prompts are rendered with its own tokenizer
        tokenizer = load_tokenizer(spec, f"eval.models.{name}", pad_token=section.pad_token,
                                   trust_remote_code=section.trust_remote_code, pad_key="eval.pad_token")
        _print_tokenizer(tokenizer, name)
        records = read_prompts(section.prompts, "eval.prompts", recipe.seed, section.template, "eval.template",
                               section.max_prompts, tokenizer)
    gold = sum(1 for r in records if has_gold(r.meta))
    print(f"eval prompts: {len(records)} ({gold} with gold answers), models: {', '.join(section.models)}")
    _show([r.prompt for r in records])


def check_export(recipe) -> None:
    export = recipe.export
    model_dir(recipe.source, "source")
    tokenizer = load_tokenizer(recipe.source, "source", trust_remote_code=export.trust_remote_code, pad_key="source")
    _print_tokenizer(tokenizer)
    if not export.parity_prompts:
        print("parity prompts: built-in")
        return
    template = CHAT if tokenizer.chat_template else "alpaca"  # as the export stage renders them
    records = read_prompts(export.parity_prompts, "export.parity_prompts", recipe.seed, template,
                           "export.parity_prompts", tokenizer=tokenizer)
    print(f"parity prompts: {len(records)} (the first {min(export.parity_count, len(records))} are used)")
    _show([r.prompt for r in records])


def _print_tokenizer(tokenizer, name: str = "") -> None:
    template = "a chat template" if tokenizer.chat_template else "no chat template"
    print(f"tokenizer{' of ' + name if name else ''}: {len(tokenizer)} tokens, pad {tokenizer.pad_token!r} "
          f"({tokenizer.pad_token_id}) != eos {tokenizer.eos_token!r} ({tokenizer.eos_token_id}), {template}, stop "
          f"tokens {tokenizer.convert_ids_to_tokens(stop_token_ids(tokenizer, tokenizer.name_or_path))}")


def algorithm_line(recipe) -> str:
    """What the recipe's registered algorithm is and needs (`rlhf.registry`), e.g. for a ppo recipe
    'algorithm: grpo (critic-free, each response against its group's mean ...), groups of 4, token ratios'."""
    if recipe.stage == "dpo":
        entry = PREFERENCE_LOSSES[recipe.dpo.loss_type]
        needs = ["no reference model" if entry.reference_free else "a reference model",
                 "length-normalised log-probs" if entry.length_normalized else "summed log-probs",
                 "chosen/rejected pairs" if entry.paired else "labelled completions"]
        return f"algorithm: dpo.loss_type {recipe.dpo.loss_type} ({entry.help}); needs {', '.join(needs)}"
    ppo = recipe.ppo
    entry = ADVANTAGE_ESTIMATORS[ppo.advantage_estimator]
    needs = ["a critic" if entry.needs_critic else "no critic"]
    if entry.needs_groups:
        needs.append(f"groups of {ppo.samples_per_prompt} samples per prompt")
    return (f"algorithm: ppo.advantage_estimator {ppo.advantage_estimator} ({entry.help}); needs {', '.join(needs)}; "
            f"ppo.ratio_level {ppo.ratio_level} ({POLICY_LOSSES[ppo.ratio_level].help})")


def raise_error(message: str, key: str):
    raise UserError(message, None, key)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: rlhf check RECIPE.yaml [dotted.key=value ...]")
        return 0 if argv else 2
    recipe = load_recipe(argv[0], None, argv[1:])
    style = Style(sys.stdout.isatty())
    stage = recipe.stage
    print(f"recipe {argv[0]}: stage {stage}, valid")
    if stage in ("ppo", "dpo"):
        print(algorithm_line(recipe))
    check_parents(recipe)  # every run folder it names is of a stage that may feed this one
    if hasattr(recipe, "train"):
        check_installed(recipe.train.report_to)  # the packages of the experiment trackers
    if stage in ("sft", "rm", "dpo", "ppo"):
        model_dir(recipe.model.name_or_path, "model.name_or_path")
        tokenizer = tokenizer_for(recipe.model)
        _print_tokenizer(tokenizer)
        if stage == "sft":
            check_sft(recipe, tokenizer, style)
        elif stage in ("rm", "dpo"):
            check_pairs(recipe, tokenizer, style, reward_head=stage == "rm")
        else:
            if recipe.ppo.reward_model:
                check_reward_model(recipe, tokenizer)
            check_prompts(recipe, tokenizer)
            check_gold(recipe, tokenizer)
    elif stage == "pretrain":
        check_corpus(recipe)
    elif stage == "eval":
        check_eval(recipe)
    elif stage == "export":
        check_export(recipe)
    print("ready")
    return 0
