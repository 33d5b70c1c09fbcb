"""`eval` stage: compare several models on held-out prompts.

For each model (base, sft, ppo, dpo, ...): gold accuracy of sampled completions (the policy the RL
stages optimize) and of greedy ones, when prompts carry the task suite's answers; mean reward-model
score; KL to the reference (the sft model): the mean over prompts of sum_t [log pi(y_t) - log ref(y_t)]
on the model's own samples (an unbiased estimate of KL(pi || ref) per response); mean response length;
EOS rate (responses that end at one of the model's stop tokens: EOS, the chat template's end of turn); a few
sample completions. With `eval.judge`, every model is compared with the baseline model prompt by prompt under the
judge (win / tie / loss rates with bootstrap intervals, both sides' response length), on any prompt file, gold or
not. Writes `eval.json` and `eval.md`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from data_formats.chat import make_format
from data_formats.tasks import grade, has_gold
from rlhf.artifacts import RunFolder, check_parents
from rlhf.files import write_json_atomic
from rlhf.card import markdown_table, percent, win_rate_table
from rlhf.forward import response_logprobs
from rlhf.models import load_model
from rlhf.prepared import prepare_prompts
from rlhf.sections import PromptData
from rlhf.tokenization import load_tokenizer, stop_token_ids
from rlhf.recipes import EvalRecipe
from rlhf.context import RunContext
from rlhf.rollout import build_engine, decode_responses, generate_batches, row_keys
from rlhf.runtime import partial_state, seed_everything
from rlhf.scoring import load_scorer
from rlhf.stats import win_rates
from rlhf.vllm_engine import check_installed

EVAL_KEYS = {"train": "eval.prompts", "template": "eval.template"}  # the recipe keys prompt errors name


def evaluate_model(name: str, model, tokenizer, prompts: list[dict], cfg, device, scorer, reference, greedy: bool,
                   shown: int, seed: int = 0, judge=None, stop_ids: list[int] | None = None, fmt=None) -> dict:
    """All figures for one model on `prompts` ({'prompt_ids', 'meta', 'prompt', 'record'}): its responses end at
    any of `stop_ids` (default: the tokenizer's EOS and end of turn); `fmt`: the format the prompts are in. With a
    `judge`, also its score of every response ('judge_scores') and the responses themselves, in prompt order."""
    ctx = RunContext.build(tokenizer, device, stop_ids or None, fmt, cfg.temperature)
    keys = row_keys(seed, 0, range(len(prompts)), device)  # every model draws the same per-prompt noise
    with build_engine(model, ctx, cfg) as engine:  # one engine per model, closed before the next loads
        return _evaluate(name, engine, model, prompts, cfg, keys, scorer, reference, greedy, shown, judge)


def _evaluate(name, engine, model, prompts, cfg, keys, scorer, reference, greedy, shown, judge) -> dict:
    ctx = engine.ctx
    tokenizer, fmt, temperature, pad_id = ctx.tokenizer, ctx.fmt, ctx.temperature, ctx.pad_id
    ids = [p["prompt_ids"] for p in prompts]
    correct, scores, kls, lengths, ended, samples, responses, judged = [], [], [], [], [], [], [], []
    by_task: dict[str, list[bool]] = {}
    gold = [has_gold(p["meta"]) for p in prompts]
    for start, gen in generate_batches(engine, ids, cfg, keys):
        chunk = prompts[start:start + cfg.batch_size]
        texts = decode_responses(tokenizer, gen)
        responses += texts
        mask = gen.response_mask.float()
        lengths += mask.sum(-1).tolist()
        ended += gen.ended.tolist()
        for p, text in zip(chunk, texts):
            if has_gold(p["meta"]):
                correct.append(grade(p["meta"], text))
                by_task.setdefault(p["meta"]["task"], []).append(correct[-1])
            if len(samples) < shown:
                samples.append({"prompt": p["prompt"], "completion": text})
        if scorer is not None:
            scores += scorer.score_generation(gen, chunk, tokenizer, fmt).tolist()
        if judge is not None:
            judged += scores[-len(chunk):] if judge is scorer else \
                judge.score_generation(gen, chunk, tokenizer, fmt).tolist()
        if reference is not None:
            with torch.no_grad():
                # both under the distribution sampled from: the temperature, the pad token forbidden
                lp, _ = response_logprobs(model, gen.sequences, gen.attention_mask, gen.prompt_width, temperature,
                                          suppress_ids=(pad_id,))
                ref_lp, _ = response_logprobs(reference, gen.sequences, gen.attention_mask, gen.prompt_width,
                                              temperature, suppress_ids=(pad_id,))
            kls += ((lp - ref_lp) * mask).sum(-1).tolist()
    greedy_correct = []
    if greedy and any(gold):
        for start, gen in generate_batches(engine, ids, replace(cfg, temperature=0.0)):
            for p, text in zip(prompts[start:start + cfg.batch_size], decode_responses(tokenizer, gen)):
                if has_gold(p["meta"]):
                    greedy_correct.append(grade(p["meta"], text))
    mean = lambda xs: (sum(xs) / len(xs)) if xs else None  # noqa: E731
    return {"model": name, "prompts": len(prompts), "gold_prompts": sum(gold),
            "gold_accuracy": mean(correct), "gold_accuracy_greedy": mean(greedy_correct),
            "reward_score": mean(scores), "kl_to_reference": mean(kls), "response_length": mean(lengths),
            "eos_rate": mean(ended), "gold_accuracy_by_task": {k: mean(v) for k, v in sorted(by_task.items())},
            "judge_score": mean(judged), "samples": samples, "judge_scores": judged if judge is not None else None,
            "responses": responses}


def compare_with_baseline(results: list[dict], baseline: str, tie_margin: float, n_boot: int, seed: int) -> list[dict]:
    """Each model against `baseline` under the judge, prompt by prompt: both answered the same prompt, each with its
    own sample (the same per-prompt noise); win / tie / loss rates (`rlhf.stats.win_rates`), the mean response
    length in characters of both sides (a judge that favors length shows), and gold accuracy beside."""
    base = next(r for r in results if r["model"] == baseline)
    chars = lambda texts: sum(map(len, texts)) / len(texts) if texts else None  # noqa: E731
    rows = []
    for r in results:
        if r is base:
            continue
        same = [a == b for a, b in zip(r["responses"], base["responses"])]
        rows.append({"model": r["model"], "baseline": baseline,
                     **win_rates(r["judge_scores"], base["judge_scores"], tie_margin, n_boot, seed, same),
                     "length_chars": chars(r["responses"]), "baseline_length_chars": chars(base["responses"]),
                     "judge_score": r["judge_score"], "baseline_judge_score": base["judge_score"],
                     "gold_accuracy": r["gold_accuracy"], "baseline_gold_accuracy": base["gold_accuracy"]})
    return rows


def judge_summary(section, judged: list[dict]) -> dict:
    """The judge's part of eval.json and the manifest (empty without a judge)."""
    if not judged:
        return {}
    return {"judge": {"model": section.judge, "baseline": judged[0]["baseline"], "tie_margin": section.tie_margin,
                      "bootstrap": section.bootstrap, "comparisons": judged}}


def write_outputs(folder: Path, results: list[dict], summary: dict) -> None:
    """eval.json (every figure, the judge's scores per prompt) and eval.md (tables and sample completions)."""
    write_json_atomic(folder / "eval.json", {"results": results, **summary})
    lines = ["# Evaluation", "", markdown_table(results), ""]
    if summary:
        judge = summary["judge"]
        lines += [f"## Judged win rates against {judge['baseline']}", "",
                  f"Judge: `{judge['model']}`. Each model's response and the baseline's to the same prompt; a tie "
                  f"within {judge['tie_margin']:g} or when identical; 95% bootstrap intervals over prompts.", "",
                  win_rate_table(judge["comparisons"]), ""]
    for r in results:
        lines += [f"## {r['model']}: samples", ""]
        for sample in r["samples"]:
            lines += ["```", sample["prompt"] + sample["completion"], "```", ""]
    (folder / "eval.md").write_text("\n".join(lines))


def run(recipe: EvalRecipe) -> Path:
    state = partial_state()
    folder = RunFolder(recipe, state.is_main_process, state.wait_for_everyone)
    if folder.finished:
        return folder.final
    seed_everything(recipe.seed)
    check_parents(recipe)
    check_installed(recipe.generate.engine)
    section, device = recipe.eval, state.device
    load = dict(dtype=section.dtype, trust_remote_code=section.trust_remote_code)

    results, judged = [], []
    if state.is_main_process:  # evaluation is cheap next to training: one process does it
        scorer = load_scorer(section.reward_model, device, normalize=False, key="eval.reward_model",
                             trust_remote_code=section.trust_remote_code) if section.reward_model else None
        judge = None
        if section.judge:  # the reward model itself when it is the same one (its scores are then reused)
            judge = scorer if section.judge == section.reward_model else load_scorer(
                section.judge, device, normalize=False, key="eval.judge", trust_remote_code=section.trust_remote_code)
        reference = None
        if section.reference:
            reference = load_model(section.reference, "eval.reference", **load).to(device).eval()
        for name, spec in section.models.items():
            key = f"eval.models.{name}"
            tokenizer = load_tokenizer(spec, key, pad_token=section.pad_token,
                                       trust_remote_code=section.trust_remote_code, pad_key="eval.pad_token")
            data = PromptData(train=section.prompts, template=section.template, max_records=section.max_prompts,
                              max_prompt_len=section.max_prompt_len)
            prompts = list(prepare_prompts(data, tokenizer, recipe.seed, EVAL_KEYS)[0])  # tokenized once, cached
            model = load_model(spec, key, vocab=len(tokenizer), **load).to(device).eval()
            same_vocab = reference is not None and len(tokenizer) == reference.get_input_embeddings().weight.shape[0]
            ref = reference if same_vocab else None  # KL needs the same token ids
            # every model draws the same per-prompt noise (seeded decoder), so differences are the models'
            result = evaluate_model(name, model, tokenizer, prompts, recipe.generate, device, scorer, ref,
                                    section.greedy, section.samples_shown, recipe.seed, judge,
                                    stop_token_ids(tokenizer, spec),
                                    make_format(section.template, tokenizer, "eval.template"))
            results.append(result)
            folder.input(key, spec)
            print(f"eval {name}: gold {result['gold_accuracy']}, greedy {result['gold_accuracy_greedy']}, "
                  f"score {result['reward_score']}, kl {result['kl_to_reference']}, "
                  f"by task {result['gold_accuracy_by_task']}")
            del model
        folder.input("eval.prompts", section.prompts)
        folder.input("eval.judge", section.judge)
        if judge is not None:
            judged = compare_with_baseline(results, section.baseline or next(iter(section.models)),
                                           section.tie_margin, section.bootstrap, recipe.seed)
        for c in judged:  # the judge beside gold: do they agree?
            print(f"judge {c['model']} vs {c['baseline']}: win {percent(c['win'])} [{percent(c['win_ci'][0])}, "
                  f"{percent(c['win_ci'][1])}], tie {percent(c['tie'])}, loss {percent(c['loss'])}; length "
                  f"{c['length_chars']:.1f} vs {c['baseline_length_chars']:.1f} chars; gold "
                  f"{percent(c['gold_accuracy'])} vs {percent(c['baseline_gold_accuracy'])}")
        for r in results:
            del r["responses"]
        write_outputs(folder.partial, results, judge_summary(section, judged))
    metrics = {f"{r['model']}/{k}": v for r in results for k, v in r.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    metrics.update({f"{c['model']}/judge_{k}": c[k] for c in judged for k in ("win", "tie", "loss")})
    results = [{k: v for k, v in r.items() if k not in ("samples", "judge_scores")} for r in results]
    return folder.finish(metrics, extra={"results": results, **judge_summary(section, judged)})

