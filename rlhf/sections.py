"""Recipe sections: one dataclass per section of a recipe file, each field with a one-line help.

The stage recipes that combine them, and the loading (YAML, overrides, derived values), are in
`rlhf.recipes`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union

from data_formats.tasks import FAMILIES, alphabet_problem
from rlhf.config import opt, req
from rlhf.errors import RecipeError
from rlhf.losses import LOSS_AGGREGATIONS
from rlhf.registry import ADVANTAGE_ESTIMATORS, POLICY_LOSSES, PREFERENCE_LOSSES

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
# accelerate's experiment trackers (`Accelerator(log_with=...)`), see rlhf.tracking
Tracker = Literal["tensorboard", "wandb", "mlflow", "trackio", "comet_ml", "aim", "clearml", "dvclive", "swanlab"]


# ---------------------------------------------------------------------------------------------
# shared sections


@dataclass(kw_only=True)
class ModelSection:
    name_or_path: str = req("starting checkpoint: a run folder of an earlier stage, a local HF folder or a hub id")
    revision: Optional[str] = opt(None, "hub revision (branch, tag or commit) when name_or_path is a hub id")
    dtype: Dtype = opt("float32", "dtype the weights are loaded in; trained LoRA weights, scalar heads and "
                                  "lora.modules_to_save always stay float32")
    trust_remote_code: bool = opt(False, "allow model code from the hub to run; off unless you trust the repo")
    pad_token: Optional[str] = opt(None, "pad token to add when the tokenizer has none or pads with EOS (null = an "
                                         "existing spare special token, else '<|pad|>')")
    chat_template: Optional[str] = opt(None, "install a chat template: 'chatml' (shipped) or a .jinja file; null = "
                                             "the tokenizer's own (base models have none)")
    attn_implementation: Optional[str] = opt(None, "'sdpa', 'eager' or 'flash_attention_2'; null = default")
    gradient_checkpointing: bool = opt(False, "recompute activations in the backward pass to save memory")


@dataclass(kw_only=True)
class LoraSection:
    r: int = opt(8, "LoRA rank", gt=0)
    alpha: float = opt(16.0, "LoRA scaling numerator (scale = alpha / r)", gt=0)
    dropout: float = opt(0.05, "dropout on the LoRA input (PPO turns dropout off in every role)", ge=0, lt=1)
    target_modules: Union[str, list[str]] = opt("all-linear", "module names to adapt, or 'all-linear'")
    modules_to_save: list[str] = opt([], "extra modules trained in full and saved with the adapter")
    trainable_tokens: Union[Literal["auto"], list[str]] = opt(
        "auto", "tokens whose embedding rows (and output rows) are trained beside LoRA, saved in the adapter: "
                "'auto' = the tokens this run adds to the vocabulary (the ChatML turn tokens model.chat_template "
                "installs), or a list of token strings ([] = none)")
    quantization: Literal["none", "4bit"] = opt("none", "'4bit' = QLoRA: frozen base in NF4 via bitsandbytes (GPU)")


@dataclass(kw_only=True)
class TrainSection:
    epochs: float = opt(1.0, "passes over the training data (PPO: over the prompts)", gt=0)
    max_steps: Optional[int] = opt(None, "stop after this many optimizer steps (PPO: iterations)", gt=0)
    batch_size: int = opt(32, "examples per optimizer step over all processes (PPO: per minibatch)", gt=0)
    micro_batch_size: int = opt(8, "examples per forward/backward on one device", gt=0)
    lr: float = opt(2e-4, "peak learning rate", gt=0)
    weight_decay: float = opt(0.0, "AdamW decoupled weight decay", ge=0)
    adam_betas: list[float] = opt([0.9, 0.999], "AdamW betas")
    adam_eps: float = opt(1e-8, "AdamW epsilon", gt=0)
    scheduler: Literal["cosine", "linear", "constant"] = opt("cosine", "LR schedule after warmup")
    warmup_ratio: float = opt(0.03, "fraction of steps spent warming up linearly", ge=0, lt=1)
    max_grad_norm: Optional[float] = opt(1.0, "clip the global gradient norm (null = no clipping)", gt=0)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = opt("auto", "autocast; auto = bf16 on a GPU that has it")
    eval_every: int = opt(0, "evaluate on the held-out split every N steps (0 = at the end only)", ge=0)
    log_every: int = opt(1, "write metrics every N steps", gt=0)
    save_every: int = opt(0, "write a resumable checkpoint every N steps (0 = never)", ge=0)
    keep_checkpoints: int = opt(2, "how many recent checkpoints to keep", gt=0)
    on_nonfinite: Literal["skip", "stop"] = opt("skip", "non-finite loss/gradient: skip the step or stop the run")
    max_nonfinite: int = opt(20, "stop once this many steps have been skipped as non-finite", ge=0)
    report_to: list[Tracker] = opt(["tensorboard"], "experiment trackers (accelerate's) that receive every metric "
                                                    "line; metrics.jsonl is always written. wandb, mlflow, trackio: "
                                                    "pip install 'rlhf[tracking]'")
    tracker_project: Optional[str] = opt(None, "W&B / trackio project, MLflow experiment; null = the name of the "
                                               "folder holding the run folder (runs/tiny/sft -> tiny)")

    def validate(self) -> None:
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise RecipeError(f"expected two numbers in [0, 1), got {self.adam_betas}", key="adam_betas")
        if len(set(self.report_to)) < len(self.report_to):
            raise RecipeError(f"names a tracker twice: {self.report_to}", key="report_to")
        project = self.tracker_project
        if project is not None and (project.strip() in ("", ".", "..") or any(c in project for c in "/\\\0")
                                    or len(project) > 200):
            # TensorBoard writes into tb/<project>/ inside the run: a path here would write outside it
            raise RecipeError(f"expected a plain name (no '/', '\\', '..', at most 200 characters), got "
                              f"{project[:60]!r}", key="tracker_project")


@dataclass(kw_only=True)
class GenerateSection:
    max_new_tokens: int = opt(64, "tokens generated per response at most", gt=0)
    temperature: float = opt(1.0, "sampling temperature (0 = greedy); logprobs use the same temperature", ge=0)
    top_k: int = opt(0, "keep the k most likely tokens (0 = off)", ge=0)
    top_p: float = opt(1.0, "nucleus sampling mass (1 = off)", gt=0, le=1)
    batch_size: int = opt(32, "prompts per generate call", gt=0)
    engine: Literal["seeded", "hf", "hf_static", "vllm"] = opt(
        "seeded", "rollout engine: seeded = our KV-cached decoder, samples independent of batching and process count; "
                  "hf = transformers generate; hf_static = generate with a static (compilable) KV cache; vllm = a "
                  "colocated vLLM engine synced to the policy after every update (make setup-vllm)")
    vllm_memory: float = opt(0.3, "vllm on a GPU: the engine's share of the device memory (gpu_memory_utilization)",
                             gt=0, lt=1)

    def validate(self) -> None:
        # vLLM decodes greedily below its sampling epsilon (1e-5) where the other engines sample
        if self.engine == "vllm" and 0 < self.temperature < 1e-5:
            raise RecipeError(f"vLLM decodes greedily at temperature {self.temperature:g} (< 1e-5) where the other "
                              "engines sample; use 0 (greedy) or a larger temperature", key="temperature")


CACHE_DIR_HELP = "where tokenized data is cached (null = $RLHF_DATA_CACHE, else ~/.cache/rlhf/data)"
NUM_PROC_HELP = "processes that tokenize the data when it is not cached yet (the same result as 1)"


@dataclass(kw_only=True)
class DataSection:
    train: str = req("training data: a .json/.jsonl/.parquet file, a folder of them, or a hub dataset id")
    eval: Optional[str] = opt(None, "held-out data in the same forms; null = split eval_fraction off train")
    eval_fraction: float = opt(0.0, "fraction of train held out when `eval` is null", ge=0, lt=1)
    split: str = opt("train", "split of `train` for hub datasets")
    eval_split: Optional[str] = opt(None, "split of `eval` for hub datasets (null = `split`)")
    template: str = opt("alpaca", "'chat' = the tokenizer's chat template (multi-turn; every assistant turn "
                                  "trained), or a text template: a name in data_formats/templates or a .json file")
    skip_invalid: bool = opt(False, "skip (and count) invalid records instead of stopping at the first")
    max_records: Optional[int] = opt(None, "use only the first N training records", gt=0)
    cache_dir: Optional[str] = opt(None, CACHE_DIR_HELP)
    num_proc: int = opt(1, NUM_PROC_HELP, gt=0)


@dataclass(kw_only=True)
class SFTData(DataSection):
    max_len: int = opt(512, "tokens per prompt+response; the response tail is cut to fit, and an example whose "
                            "(cut) prompt alone fills it is dropped (counted as dropped_too_long)", gt=1)
    max_prompt_len: Optional[int] = opt(None, "cut longer prompts from the left (keeping BOS and the end, next to the "
                                              "response) before max_len applies; null = never cut prompts", gt=0)
    train_on_prompt: bool = opt(False, "compute the loss on prompt tokens too")
    packing: bool = opt(False, "pack several examples per row without cross-attention (rows of about twice "
                                   "the longest example of the micro-batch: little padding)")

    def validate(self) -> None:
        _check_prompt_room(self.max_prompt_len, self.max_len)


@dataclass(kw_only=True)
class PreferenceData(DataSection):
    format: Literal["auto", "pairwise", "hh"] = opt("auto", "'hh' = Anthropic HH-RLHF transcripts; auto detects them, "
                                                            "string pairs and conversations")
    max_len: int = opt(512, "tokens per prompt+response; responses are cut at the end to fit (a pair left with "
                            "no response, or chosen == rejected, is dropped and counted)", gt=1)
    max_prompt_len: int = opt(256, "cut longer prompts from the left (keeping BOS and the end) to this many tokens; "
                                   "must be less than max_len", gt=0)
    packing: bool = opt(False, "pack a micro-batch's chosen and rejected sequences into as few rows as fit, without "
                               "padding or cross-attention (padding-free)")

    def validate(self) -> None:
        _check_prompt_room(self.max_prompt_len, self.max_len)


def _check_prompt_room(max_prompt_len: int | None, max_len: int) -> None:
    # a prompt of max_prompt_len tokens must leave room for at least one response token (EOS)
    if max_prompt_len is not None and max_prompt_len >= max_len:
        raise RecipeError(f"must be less than max_len ({max_len}) so that a response fits after the prompt, "
                          f"got {max_prompt_len}", key="max_prompt_len")


@dataclass(kw_only=True)
class PromptData(DataSection):
    max_prompt_len: int = opt(256, "prompt tokens kept (left-truncated)", gt=0)


# ---------------------------------------------------------------------------------------------
# stage-specific sections


@dataclass(kw_only=True)
class ArchSection:
    hidden_size: int = opt(256, "model width", gt=0)
    intermediate_size: int = opt(688, "MLP width", gt=0)
    num_layers: int = opt(4, "transformer blocks", gt=0)
    num_heads: int = opt(4, "attention heads", gt=0)
    num_kv_heads: Optional[int] = opt(None, "key/value heads (grouped-query attention); null = num_heads", gt=0)
    max_position_embeddings: int = opt(512, "longest sequence the model handles", gt=0)
    rope_theta: float = opt(10000.0, "RoPE base", gt=0)
    tie_word_embeddings: bool = opt(True, "share input and output embeddings")

    def validate(self) -> None:
        if self.hidden_size % self.num_heads:
            raise RecipeError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}",
                              key="num_heads")
        if self.num_kv_heads and self.num_heads % self.num_kv_heads:
            raise RecipeError("num_heads must be a multiple of num_kv_heads", key="num_kv_heads")


@dataclass(kw_only=True)
class TokenizerSection:
    vocab_size: int = opt(2048, "byte-level BPE vocabulary size (special tokens included)", ge=300)
    min_frequency: int = opt(2, "merges need at least this many occurrences", gt=0)
    existing: Optional[str] = opt(None, "use this tokenizer (run folder, model folder or hub id) instead of "
                                        "training one")
    pad_token: Optional[str] = opt(None, "pad token to add when the existing tokenizer has none or pads with EOS")
    chat_template: Optional[str] = opt(None, "chat template to install (a shipped name such as chatml, or a .jinja "
                                             "file); the special tokens it declares are whole tokens of the new "
                                             "vocabulary, so a corpus that writes them (tasks.corpus_template) "
                                             "teaches the model its turns")


@dataclass(kw_only=True)
class CorpusData:
    train: list[str] = req("text corpus: .txt files (one document per blank-line block) or .jsonl with 'text'")
    eval_fraction: float = opt(0.02, "fraction of documents held out for perplexity", ge=0, lt=1)
    max_len: int = opt(256, "tokens per training row (documents are concatenated and cut)", gt=1)
    cache_dir: Optional[str] = opt(None, CACHE_DIR_HELP)
    num_proc: int = opt(1, NUM_PROC_HELP, gt=0)


@dataclass(kw_only=True)
class RMSection:
    center_coef: float = opt(0.0, "reward centering: + coef * mean((r_c + r_r)^2)", ge=0)
    norm_split: Literal["eval", "train"] = opt("eval", "completions whose scores fit the stored mean/std")


@dataclass(kw_only=True)
class PPOSection:
    RENAMED = {"kl_target": "kl_budget", "target_kl": "early_stop_kl"}  # old keys: one-line errors naming the new

    reward_model: Optional[str] = opt(None, "an `rm` run folder (or HF sequence-classification model) scoring "
                                            "prompt+response; reward_model, reward_fn or both")
    reward_fn: Optional[str] = opt(None, "a reward function: 'gold' (the task suite's scorer: 1 right, 0 wrong) or "
                                         "'package.module:function' (prompts, completions, records) -> floats")
    reward_weights: dict[str, float] = opt({"reward_model": 1.0, "reward_fn": 1.0},
                                           "weights of the reward model's (normalized) and the reward function's "
                                           "scores in the sum, when both are given")
    advantage_estimator: Literal[tuple(ADVANTAGE_ESTIMATORS)] = opt("gae", ADVANTAGE_ESTIMATORS.help())
    samples_per_prompt: int = opt(1, "responses sampled per prompt (k; a group for grpo / rloo)", gt=0)
    scale_by_std: bool = opt(True, "grpo: divide by the group's std (false = Dr. GRPO, mean removed only)")
    kl_in: Literal["reward", "loss"] = opt("reward", "the KL to the reference as a per-token reward penalty, or as "
                                                     "a loss term (k3 estimator, weighted by kl_coef, as GRPO)")
    loss_agg: Literal[tuple(LOSS_AGGREGATIONS)] = opt(
        "token", "how the policy/value/KL losses are normalised over the whole minibatch: " +
                 "; ".join(f"{name} = {text}" for name, text in LOSS_AGGREGATIONS.items()))
    rollout_batch_size: int = opt(64, "prompts sampled per iteration over all processes (x samples_per_prompt "
                                      "responses)", gt=0)
    ppo_epochs: int = opt(4, "passes (K) over each rollout batch", gt=0)
    gamma: float = opt(1.0, "discount", ge=0, le=1)
    gae_lambda: float = opt(0.95, "GAE lambda", ge=0, le=1)
    ratio_level: Literal[tuple(POLICY_LOSSES)] = opt("token", POLICY_LOSSES.help())
    clip_range: float = opt(0.2, "policy ratio clip epsilon", gt=0)
    clip_range_low: Optional[float] = opt(None, "lower clip epsilon: ratios below 1 - this are clipped (null = "
                                                "clip_range)", gt=0, lt=1)
    clip_range_high: Optional[float] = opt(None, "upper clip epsilon: ratios above 1 + this are clipped (null = "
                                                 "clip_range; larger than the lower one = DAPO's clip-higher)", gt=0)
    dynamic_sampling: bool = opt(False, "DAPO: drop the groups whose k scores are all equal (no signal) and sample "
                                        "more prompts until the batch is full (needs samples_per_prompt >= 2)")
    max_sampling_rounds: int = opt(3, "dynamic_sampling: extra rollout rounds at most per iteration; a batch still "
                                      "short after them is filled with dropped groups", ge=0)
    overlong_buffer: int = opt(0, "DAPO's overlong shaping: the last N tokens before generate.max_new_tokens over "
                                  "which a linear penalty grows to overlong_penalty (0 = off)", ge=0)
    overlong_penalty: float = opt(1.0, "the score penalty of a response that reaches generate.max_new_tokens "
                                       "(with overlong_buffer)", ge=0)
    clip_range_value: float = opt(0.2, "value clip epsilon around the rollout values", gt=0)
    vf_coef: float = opt(0.1, "value loss weight in the total loss", ge=0)
    entropy_coef: float = opt(0.0, "entropy bonus weight", ge=0)
    kl_coef: float = opt(0.05, "initial per-token KL penalty weight", ge=0)
    kl_estimator: Literal["k1", "k3"] = opt("k1", "per-token KL estimator in the reward")
    kl_control: Literal["fixed", "adaptive"] = opt("fixed", "keep kl_coef fixed or adapt it towards kl_budget")
    kl_budget: float = opt(6.0, "KL per response (nats) the run may spend: the adaptive controller's target, and "
                                "the over-optimization monitor warns above it", gt=0)
    kl_horizon: int = opt(10000, "adaptive control: horizon in episodes", gt=0)
    early_stop_kl: Optional[float] = opt(None, "stop an iteration's K update epochs early when the minibatch approx "
                                               "KL (policy vs. rollout policy) exceeds this", gt=0)
    whiten_advantages: bool = opt(True, "gae: whiten advantages over the (global) batch (reinforce_pp always "
                                        "whitens; grpo / rloo normalize within each group)")
    normalize_reward: bool = opt(True, "normalize reward-model scores to mean 0, std 1 (statistics: reward_stats)")
    reward_stats: Literal["rm_data", "policy"] = opt(
        "rm_data", "where the normalizing mean/std come from: rm_data = stored by the rm stage (its held-out "
                   "completions); policy = measured on the starting policy's own samples before the first update")
    reward_stats_prompts: Optional[int] = opt(None, "reward_stats: policy: prompts sampled to measure them "
                                                    "(null = the first rollout batch)", gt=1)
    reward_clip: Optional[float] = opt(10.0, "clip (normalized) scores to +-this", gt=0)
    missing_eos_penalty: Optional[float] = opt(1.0, "subtracted from the score of responses without EOS", ge=0)
    critic_init: Literal["reward", "actor"] = opt("reward", "gae: critic backbone, the reward model or the SFT model")
    critic_lr: Optional[float] = opt(None, "critic learning rate (null = train.lr)", gt=0)
    max_log_ratio: float = opt(20.0, "clamp |logp - old_logp| before exp (counted in policy/ratio_clamped)", gt=0)
    rollout_correction: Literal["none", "tis"] = opt(
        "none", "tis = truncated importance sampling: each token's policy loss weighted by min(exp(old - rollout "
                "logprob), rollout_correction_cap), for an engine whose sampler differs from the trainer (vllm)")
    rollout_correction_cap: float = opt(2.0, "rollout_correction: tis: the largest weight", gt=0)
    gold_prompts: Optional[str] = opt(None, "prompts with gold answers (task suite) for the over-optimization monitor")
    gold_every: int = opt(0, "evaluate gold accuracy every N iterations (0 = off)", ge=0)
    gold_count: int = opt(64, "gold prompts per evaluation", gt=0)

    def clip_bounds(self) -> tuple[float, float]:
        """(ε_low, ε_high): the policy ratio is clipped to [1 - ε_low, 1 + ε_high]."""
        return (self.clip_range if self.clip_range_low is None else self.clip_range_low,
                self.clip_range if self.clip_range_high is None else self.clip_range_high)

    def needs_critic(self) -> bool:
        """Whether the estimator learns a value function (gae); the others take their baseline from the samples."""
        return ADVANTAGE_ESTIMATORS[self.advantage_estimator].needs_critic

    def validate(self) -> None:
        if not self.reward_model and not self.reward_fn:
            raise RecipeError("give ppo.reward_model, ppo.reward_fn or both", key="reward_model")
        if ADVANTAGE_ESTIMATORS[self.advantage_estimator].needs_groups and self.samples_per_prompt < 2:
            raise RecipeError(f"{self.advantage_estimator} compares the responses of one prompt: needs at least 2, "
                              f"got {self.samples_per_prompt}", key="samples_per_prompt")
        if self.needs_critic() and self.critic_init == "reward" and not self.reward_model:
            raise RecipeError("there is no reward model to start the critic from; use critic_init: actor",
                              key="critic_init")
        if self.clip_bounds()[0] > self.clip_bounds()[1]:
            raise RecipeError(f"clip_range_low ({self.clip_bounds()[0]:g}) is above clip_range_high "
                              f"({self.clip_bounds()[1]:g})", key="clip_range_low")
        if self.dynamic_sampling and self.samples_per_prompt < 2:
            raise RecipeError("dynamic_sampling drops the groups whose k scores are all equal: needs "
                              f"samples_per_prompt >= 2, got {self.samples_per_prompt}", key="dynamic_sampling")
        unknown = sorted(set(self.reward_weights) - {"reward_model", "reward_fn"})
        if unknown:
            raise RecipeError(f"expected keys reward_model and reward_fn, got {unknown[0]!r}", key="reward_weights")


@dataclass(kw_only=True)
class DPOSection:
    beta: float = opt(0.1, "KL strength beta", gt=0)
    loss_type: Literal[tuple(PREFERENCE_LOSSES)] = opt("sigmoid", PREFERENCE_LOSSES.help())
    label_smoothing: float = opt(0.0, "conservative DPO (and simpo): assumed label-flip probability", ge=0,
                                 lt=0.5)
    simpo_gamma: float = opt(0.5, "simpo: the target margin gamma between the chosen and rejected responses' "
                                  "beta-scaled per-token log-likelihoods", ge=0)
    sft_coef: float = opt(0.0, "weight of an SFT (NLL per token) term on chosen responses", ge=0)
    precompute_ref: bool = opt(False, "compute reference logps once before training (one model in memory)")
    disable_dropout: bool = opt(True, "dropout off in the policy (model and LoRA), as in the reference: the "
                                      "log-ratios compare the same deterministic functions")
    reference: Optional[str] = opt(None, "reference model; null = the policy's starting model")

    def validate(self) -> None:
        # IPO regresses the margin onto 1/(2 beta) (Azar et al. 2023): there is no label to flip
        entry = PREFERENCE_LOSSES[self.loss_type]
        if entry.reference_free and self.reference is not None:
            raise RecipeError(f"loss_type {self.loss_type!r} is reference-free: it uses no reference model; remove "
                              "dpo.reference", key="reference")
        if entry.reference_free and self.precompute_ref:
            raise RecipeError(f"loss_type {self.loss_type!r} is reference-free: there are no reference log-probs to "
                              "precompute", key="precompute_ref")
        if self.loss_type in ("ipo", "orpo") and self.label_smoothing > 0:
            raise RecipeError(f"applies to loss_type 'sigmoid' only (conservative DPO); set it to 0 for "
                              f"{self.loss_type!r}", key="label_smoothing")


@dataclass(kw_only=True)
class EvalSection:
    models: dict[str, str] = req("name -> run folder / HF folder / hub id of each policy to evaluate")
    prompts: str = req("held-out prompts (prompt-only or Alpaca records; 'answer'+'task' enable gold scoring)")
    template: str = opt("alpaca", "'chat' = each model's own chat template, or a text template for Alpaca-style "
                                  "and single-turn records")
    reward_model: Optional[str] = opt(None, "rm run folder: report the mean reward-model score")
    reference: Optional[str] = opt(None, "model the KL is measured against (usually the SFT run)")
    judge: Optional[str] = opt(None, "rm run folder or HF sequence-classification model judging each model's response "
                                     "against the baseline's on the same prompt (win / tie / loss rates); the "
                                     "training RM as judge measures the proxy, not quality")
    baseline: Optional[str] = opt(None, "name in `models` the others are judged against; null = the first listed")
    tie_margin: float = opt(0.0, "judge score differences within +-this are ties (identical responses always tie)",
                            ge=0)
    bootstrap: int = opt(1000, "bootstrap resamples of the prompts for the 95% intervals of the win rates", gt=0)
    max_prompts: int = opt(256, "prompts evaluated at most", gt=0)
    max_prompt_len: int = opt(256, "prompt tokens kept", gt=0)
    samples_shown: int = opt(4, "sample completions per model in the report", ge=0)
    greedy: bool = opt(True, "also report greedy-decoding gold accuracy")
    pad_token: Optional[str] = opt(None, "pad token to add to a model whose tokenizer has none or pads with EOS")
    dtype: Dtype = opt("float32", "dtype models are loaded in")
    trust_remote_code: bool = opt(False, "allow model code from the hub to run")

    def validate(self) -> None:
        if self.baseline is not None and self.baseline not in self.models:
            raise RecipeError(f"expected one of the names in eval.models ({', '.join(self.models)}), got "
                              f"{self.baseline!r}", key="baseline")


@dataclass(kw_only=True)
class ExportSection:
    dtype: Literal["float32", "bfloat16", "float16"] = opt("bfloat16", "dtype of the exported weights")
    max_shard_size: str = opt("5GB", "largest safetensors shard")
    parity_prompts: Optional[str] = opt(None, "prompts for the parity check (null = built-in ones)")
    parity_count: int = opt(4, "prompts in the parity check", gt=0)
    parity_new_tokens: int = opt(16, "greedy tokens compared in the parity check", gt=0)
    push_to_hub: bool = opt(False, "upload the exported folder with huggingface_hub")
    hub_repo_id: Optional[str] = opt(None, "target repo, e.g. user/model-name")
    private: bool = opt(True, "create the hub repo as private")
    revision: Optional[str] = opt(None, "hub branch to push to (null = main)")
    commit_message: str = opt("Upload model exported by rlhf", "hub commit message")
    intended_use: str = opt("Research on RLHF post-training; not evaluated for safety or deployment.",
                            "model card: intended use")
    trust_remote_code: bool = opt(False, "allow model code from the hub to run")

    def validate(self) -> None:
        if self.push_to_hub and not self.hub_repo_id:
            raise RecipeError("push_to_hub is true but no hub_repo_id is set", key="hub_repo_id")


@dataclass(kw_only=True)
class TaskSuiteSection:
    families: list[str] = opt(["reverse", "sort", "upper", "max"], "task families to generate")
    min_items: int = opt(3, "shortest list in a task", gt=0)
    max_items: int = opt(5, "longest list in a task", gt=0)
    alphabet: str = opt("abcdefghij", "letters used in lists: at least 2 distinct lowercase ASCII letters")
    sft_records: int = opt(2000, "Alpaca SFT training records", gt=0)
    sft_noise: float = opt(0.3, "fraction of SFT answers replaced by a plausible wrong one", ge=0, lt=1)
    preference_records: int = opt(2000, "pairwise preference records (chosen correct, rejected wrong)", gt=0)
    prompt_records: int = opt(1000, "prompt-only records for PPO rollouts", gt=0)
    eval_records: int = opt(200, "held-out records for each eval split", gt=0)
    corpus_documents: int = opt(20000, "pretraining corpus documents", gt=0)
    format: Literal["alpaca", "messages"] = opt("alpaca", "record files as Alpaca fields, or as conversations "
                                                          "(messages; chosen/rejected turns) for data.template: chat")
    corpus_template: Optional[str] = opt(None, "chat template (chatml or a .jinja file) whose prompt the corpus "
                                               "writes before the answer of the instances it states in the prompt's "
                                               "form (then corpus.jsonl, since the user turn holds a blank line; "
                                               "pretrain with tokenizer.chat_template set to the same); null = the "
                                               "plain prompt form, corpus.txt")

    def validate(self) -> None:
        if self.max_items < self.min_items:
            raise RecipeError("max_items must be at least min_items", key="max_items")
        unknown = [f for f in self.families if f not in FAMILIES]
        if unknown or not self.families:
            raise RecipeError(f"expected names from {', '.join(FAMILIES)}, got {self.families}", key="families")
        problem = alphabet_problem(self.alphabet)
        if problem:
            raise RecipeError(problem, key="alphabet")
