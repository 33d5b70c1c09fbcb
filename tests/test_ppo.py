"""PPO: the roles' setup (train mode, checkpointing, dropout), logprob/value alignment, the reference at
the start, early stopping on early_stop_kl, the over-optimization monitor, full fine-tuning and an actor-
initialized critic, recipe refusals, the reward model's view of decoded text, multi-process generation
and gold evaluation, and the RNG state of checkpoints."""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedTokenizerFast

from rlhf import checkpoint
from rlhf.cli import main
from rlhf.forward import response_logprobs
from rlhf.lora import apply_lora
from rlhf.models import ScalarHead, disable_dropout, hf_model
from rlhf.tokenization import load_tokenizer
from rlhf.monitor import OverOptimizationMonitor
from rlhf.ppo import critic_values, filtered_sampling_warning
from rlhf.roles import fold_normalization, load_roles
from rlhf.recipes import load_recipe
from rlhf.sections import GenerateSection, LoraSection, PromptData
from rlhf.rollout import Generation, decode_responses
from tests.chain import cli_args, recipe, run_stage


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def tiny_llama(**overrides) -> LlamaConfig:
    return LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=2, max_position_embeddings=64, **overrides)


# --- the roles --------------------------------------------------------------------------------------------


def decoder_layers(model) -> list[torch.nn.Module]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in hf_model(model).modules() if isinstance(m, GradientCheckpointingLayer)]


@pytest.mark.parametrize("lora", ["lora", "full"])
def test_actor_and_critic_train_in_train_mode_with_checkpointing(chain, lora):
    r = recipe("ppo", chain["root"], "model.gradient_checkpointing=true", *(["lora=null"] if lora == "full" else []))
    roles = load_roles(r, load_tokenizer(r.model.name_or_path, pad_token=r.model.pad_token), "cpu")
    for model in (roles.actor, roles.critic.model):
        layers = decoder_layers(model)
        assert layers and all(layer.training and layer.gradient_checkpointing for layer in layers)
    assert not roles.scorer.model.training and (roles.reference is None) == (lora == "lora")
    if roles.reference is not None:
        assert not roles.reference.training
    # checkpointing really happens: the backward pass runs the layers again (up to the last saved tensor)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    mask = torch.ones_like(ids)
    for model, loss in ((roles.actor, lambda: response_logprobs(roles.actor, ids, mask, 3)[0].sum()),
                        (roles.critic.model, lambda: critic_values(roles.critic, ids, mask, 3).sum())):
        calls = []
        hook = decoder_layers(model)[0].self_attn.register_forward_pre_hook(lambda *_: calls.append(1))  # noqa: B023 (called in this iteration)
        loss().backward()
        hook.remove()
        assert len(calls) == 2


def test_disable_dropout_also_zeroes_functional_attention_dropout():
    torch.manual_seed(0)
    model = apply_lora(LlamaForCausalLM(tiny_llama(attention_dropout=0.5)), LoraSection(r=4, alpha=8.0, dropout=0.3))
    model.train()
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)  # dropout is on
        disable_dropout(model)
        assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
    assert hf_model(model).config.attention_dropout == 0.0  # the config under peft's wrapper too


# --- the critic starts on the reward's (normalized) scale ---------------------------------------------------


@pytest.mark.parametrize("lora", ["lora", "full"])
def test_the_critic_starts_on_the_normalized_reward_scale(chain, tmp_path, lora):
    """critic(x) = (RM(x) - mean) / std at the token the RM reads, before any update; the saved critic loads with
    plain transformers, and its output minus the stored mean (as for a reward model) gives the same values."""
    from accelerate import Accelerator
    from transformers import AutoModelForSequenceClassification

    from rlhf.batching import pad
    from rlhf.saving import save_model
    from rlhf.scoring import rewards_at_last_token

    r = recipe("ppo", chain["root"], *(["lora=null"] if lora == "full" else []))
    tokenizer = load_tokenizer(r.model.name_or_path)
    roles = load_roles(r, tokenizer, "cpu")
    stats = roles.scorer.stored_stats
    texts = ["Reverse the list.\na b c\nc b a", "Sort the list in alphabetical order.\nd a\na d", "Reverse"]
    rows = [ids + [tokenizer.eos_token_id] for ids in tokenizer(texts)["input_ids"]]
    ids, mask = pad(rows, tokenizer.pad_token_id, left=True), pad([[1] * len(x) for x in rows], 0, left=True)
    with torch.no_grad():
        roles.scorer.use_stats(stats)
        expected = roles.scorer.score_ids(ids, mask)
        # a plain copy of the reward model starts in raw reward units: off by an affine map
        assert not torch.allclose(rewards_at_last_token(roles.critic, ids, mask), expected, atol=1e-2)
        fold_normalization(roles.critic, stats["mean"], stats["std"])
        assert torch.allclose(rewards_at_last_token(roles.critic, ids, mask), expected, atol=1e-4)
        if lora == "full":  # (a LoRA critic saves an adapter on the reward model; export merges it)
            save_model(Accelerator(cpu=True), roles.critic, tokenizer, tmp_path / "critic")
            plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "critic").eval()
            offset = json.loads((tmp_path / "critic" / "reward_stats.json").read_text())["mean"]
            assert torch.allclose(rewards_at_last_token(ScalarHead(plain), ids, mask) - offset, expected, atol=1e-4)


def test_reward_stats_measured_on_the_starting_policy_center_its_scores(chain, tmp_path):
    run = run_stage("ppo", chain["root"], "train.max_steps=1", "ppo.gold_every=0", "ppo.reward_stats=policy",
                    f"output_dir={tmp_path}/run")
    stats = json.loads((run / "manifest.json").read_text())["reward_stats"]
    assert stats["fitted_on"] == "policy" and stats["count"] == 16  # the first rollout batch
    (m,) = [m for m in metrics(run) if m["step"] == 1]
    assert abs(m["objective/score"]) < 1e-5  # that very batch, normalized with its own mean: mean 0


# --- alignment of response logprobs and values -----------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_and_values_of_padded_rows_match_plain_unpadded_forwards(temperature):
    torch.manual_seed(0)
    actor = LlamaForCausalLM(tiny_llama()).eval()
    seq_cls = LlamaForSequenceClassification(tiny_llama(num_labels=1)).eval()
    critic = ScalarHead(seq_cls)
    pad = 0
    prompts, responses = [[3, 4, 5], [6, 7, 8, 9, 10], [11, 12]], [[20, 21, 22, 23], [24, 25], [26, 27, 28]]
    width, length = max(map(len, prompts)), max(map(len, responses))
    sequences = torch.tensor([[pad] * (width - len(p)) + p + r + [pad] * (length - len(r))
                              for p, r in zip(prompts, responses)])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * (len(p) + len(r)) + [0] * (length - len(r))
                                   for p, r in zip(prompts, responses)])
    with torch.no_grad():
        logprobs, _ = response_logprobs(actor, sequences, attention_mask, width, temperature)  # (B, A)
        values = critic_values(critic, sequences, attention_mask, width)  # (B, A)
        for b, (p, r) in enumerate(zip(prompts, responses)):
            row = torch.tensor([p + r])
            logits = actor(input_ids=row).logits[0] / temperature  # (T, V)
            hidden = seq_cls.model(input_ids=row).last_hidden_state
            plain_values = seq_cls.score(hidden)[0, :, 0]  # (T,)
            for j, token in enumerate(r):
                t = len(p) + j  # the position of response token j; it is predicted (and valued) at t - 1
                assert logprobs[b, j].item() == pytest.approx(logits[t - 1].log_softmax(-1)[token].item(), abs=1e-5)
                assert values[b, j].item() == pytest.approx(plain_values[t - 1].item(), abs=1e-5)


# --- stage runs ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def first_iteration(chain, tmp_path_factory):
    """One iteration, one epoch, one minibatch (rollout 16 = batch 16), top-k sampling; stderr captured."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        run = run_stage("ppo", chain["root"], "train.max_steps=1", "ppo.ppo_epochs=1", "train.batch_size=16",
                        "ppo.gold_every=0", "generate.top_k=5", f"output_dir={tmp_path_factory.mktemp('first')}/run")
    return run, err.getvalue()


def test_reference_is_the_sft_model_at_the_start(first_iteration):
    run, _ = first_iteration
    (m,) = [m for m in metrics(run) if m["step"] == 1]
    # the reference (the actor with its adapter disabled) equals the starting actor: KL 0, and the only
    # minibatch is scored before any step: ratio 1
    assert abs(m["objective/kl"]) < 1e-6
    assert m["policy/ratio_mean"] == pytest.approx(1.0, abs=1e-5) and m["policy/epochs"] == 1


def test_start_reports_the_roles_and_the_filtered_sampling_caveat(first_iteration):
    _, err = first_iteration
    lines = err.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("ppo roles on")))
    assert [line.split()[0] for line in lines[start + 1:start + 5]] == ["actor", "reference", "critic", "reward"]
    assert "shared with the actor (adapter disabled)" in lines[start + 2]
    (warning,) = [line for line in lines if line.startswith("warning: generate.top_k=5")]
    assert "unfiltered" in warning
    assert filtered_sampling_warning(GenerateSection(top_p=0.9)) is not None
    assert filtered_sampling_warning(GenerateSection()) is None
    assert filtered_sampling_warning(GenerateSection(temperature=0.0, top_k=5)) is None  # greedy: no filter


def test_early_stop_kl_stops_the_epochs_early(chain, tmp_path):
    run = run_stage("ppo", chain["root"], "train.max_steps=1", "ppo.ppo_epochs=4", "ppo.early_stop_kl=1e-9",
                    "ppo.gold_every=0", f"output_dir={tmp_path}/run")
    (m,) = [m for m in metrics(run) if m["step"] == 1]
    assert m["policy/epochs"] < 4


@pytest.mark.parametrize("extra", [["lora=null"], ["ppo.critic_init=actor"], ["generate.engine=hf"]])
def test_full_fine_tuning_and_an_actor_critic_run(chain, tmp_path, extra):
    run = run_stage("ppo", chain["root"], "train.max_steps=2", "ppo.gold_every=0", *extra, f"output_dir={tmp_path}/run")
    ms = [m for m in metrics(run) if "objective/kl" in m]
    assert [m["step"] for m in ms] == [1, 2]
    assert abs(ms[0]["objective/kl"]) < 1e-6  # the frozen reference copy equals the starting actor
    assert all(math.isfinite(m["loss/policy"]) and math.isfinite(m["loss/value"]) for m in ms)
    for folder in ("model", "critic"):
        assert (run / folder).is_dir() and any((run / folder).glob("*.safetensors"))
    if extra == ["lora=null"]:
        assert (run / "model" / "config.json").is_file() and not (run / "model" / "adapter_config.json").exists()


# --- refusals: one line, exit 2, nothing written -------------------------------------------------------------


def refused(chain, tmp_path, capsys, *extra) -> str:
    assert main(cli_args("ppo", chain["root"], *extra, f"output_dir={tmp_path}/out")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    return err[0]


def test_fp16_is_refused(chain, tmp_path, capsys):
    err = refused(chain, tmp_path, capsys, "train.mixed_precision=fp16")  # refused at recipe load
    assert err.startswith("error: command line: train.mixed_precision: ") and "bf16 or no" in err
    from rlhf.errors import RecipeError
    from tests.chain import write_recipe

    raw = write_recipe("ppo", chain["root"]).read_text().replace("train:\n", "train:\n  mixed_precision: fp16\n", 1)
    (tmp_path / "fp16.yaml").write_text(raw)
    with pytest.raises(RecipeError, match=r"fp16.yaml: train.mixed_precision: PPO steps two optimizers"):
        load_recipe(tmp_path / "fp16.yaml", "ppo")  # in the file: the error names the file (rlhf check too)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU 4-bit loading is possible")
def test_qlora_is_not_silently_ignored(chain, tmp_path, capsys):
    err = refused(chain, tmp_path, capsys, "lora.quantization=4bit", f"model.name_or_path={chain['pretrain']}")
    assert "lora.quantization: 4-bit QLoRA needs a CUDA GPU" in err
    # the sft run is a LoRA adapter: QLoRA needs its export
    assert "needs a full model" in refused(chain, tmp_path, capsys, "lora.quantization=4bit")


# --- the reward model's view of decoded responses -------------------------------------------------------------


@pytest.mark.parametrize("stops", ["eos", "eos+token"])
@pytest.mark.parametrize("engine", ["hf", "hf_static"])
def test_engines_agree_on_greedy_rollouts(chain, engine, stops):
    """Greedy decoding has no randomness: transformers' generate and our seeded decoder must return the
    same left-padded sequences, response masks (up to the first stop token) and ended flags, with EOS alone
    or with a second stop id (as a chat model's end of turn) that ends some rows before their EOS."""
    from rlhf.data import encode_prompts, load_split
    from rlhf.batching import collate_prompts
    from rlhf.models import load_model
    from rlhf.rollout import generate
    from data_formats.schemas import parse_prompt

    tok = load_tokenizer(str(chain["sft"]))
    model = load_model(str(chain["sft"])).eval()
    records = load_split(PromptData(train=str(chain["tasks"] / "prompts.jsonl"), template="plain"), parse_prompt,
                         0).train[:6]
    batch = collate_prompts(encode_prompts(records, tok, 64)[0], tok.pad_token_id)
    assert batch["attention_mask"].min() == 0  # prompts of different lengths: left padding is exercised
    cfg = GenerateSection(max_new_tokens=12, temperature=0.0, engine=engine)
    stop_ids = [tok.eos_token_id]
    if stops == "eos+token":  # the last new token of the first row's response becomes a stop id too
        row = generate(model, batch["input_ids"], batch["attention_mask"], cfg, stop_ids, tok.pad_token_id,
                       engine="seeded").responses[0].tolist()
        cut = max(j for j in range(len(row)) if row[j] not in row[:j] + stop_ids)
        stop_ids.append(row[cut])
    ours = generate(model, batch["input_ids"], batch["attention_mask"], cfg, stop_ids, tok.pad_token_id,
                    engine="seeded")
    theirs = generate(model, batch["input_ids"], batch["attention_mask"], cfg, stop_ids, tok.pad_token_id)
    if stops == "eos+token":
        assert ours.ended[0] and int(ours.response_mask[0].sum()) == cut + 1  # ended at the second stop id
    width = min(ours.responses.shape[1], theirs.responses.shape[1])
    assert torch.equal(ours.responses[:, :width], theirs.responses[:, :width])
    assert torch.equal(ours.response_mask[:, :width], theirs.response_mask[:, :width])
    assert ours.response_mask[:, width:].sum() == 0 and theirs.response_mask[:, width:].sum() == 0
    assert torch.equal(ours.ended, theirs.ended)


def test_decoded_responses_hold_only_real_tokens():
    from tokenizers import Tokenizer, decoders, models

    vocab = {"!": 0, "a": 1, "b": 2, "</s>": 3, "<pad>": 4}  # id 0 is an ordinary character, as in GPT-2
    backend = Tokenizer(models.WordLevel(vocab, unk_token="!"))
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>")
    sequences = torch.tensor([[4, 1, 1, 2, 3, 4, 4], [2, 2, 2, 1, 2, 1, 2]])  # prompt width 2
    response_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    gen = Generation(sequences, torch.cat([torch.tensor([[0, 1], [1, 1]]), response_mask], 1), response_mask,
                     torch.tensor([True, False]), 2)
    assert decode_responses(tokenizer, gen) == ["ab", "babab"]
    assert tokenizer.batch_decode(gen.responses * gen.response_mask, skip_special_tokens=True)[0] == "ab!!"


def test_text_scores_append_eos_only_to_responses_that_ended(chain):
    from rlhf.scoring import load_scorer

    scorer = load_scorer(str(chain["rm"]))
    text = "Reverse the list.\na b\nb a"
    ids = scorer.tokenizer(text)["input_ids"]
    eos = scorer.tokenizer.eos_token_id

    def by_ids(x):
        return scorer.score_ids(torch.tensor([x]), torch.ones(1, len(x), dtype=torch.long))

    cut, ended = by_ids(ids), by_ids(ids + [eos])
    assert not torch.allclose(cut, ended)
    assert torch.allclose(scorer([text, text], ended=[False, True]), torch.cat([cut, ended]), atol=1e-6)
    assert torch.allclose(scorer([text]), ended, atol=1e-6)  # finished texts (no flags): EOS appended


# --- the over-optimization monitor ---------------------------------------------------------------------------


def test_monitor_warns_on_proxy_up_gold_down_and_on_kl_over_budget():
    monitor = OverOptimizationMonitor(kl_budget=6.0, tolerance=0.02)
    assert monitor.check(0, {"gold/accuracy": 0.5, "gold/proxy_score": 0.1}, 0.0) == []  # the baseline
    assert monitor.check(1, {"gold/accuracy": 0.49, "gold/proxy_score": 0.3}, 1.0) == []  # within tolerance
    (warning,) = monitor.check(2, {"gold/accuracy": 0.40, "gold/proxy_score": 0.5}, 1.0)
    assert "proxy score rose 0.300 -> 0.500 while gold accuracy fell 0.490 -> 0.400" in warning
    assert monitor.check(3, {"gold/accuracy": 0.30, "gold/proxy_score": 0.4}, 1.0) == []  # proxy fell too
    assert monitor.check(4, {"gold/accuracy": 0.45, "gold/proxy_score": 0.6}, 1.0) == []  # both rose
    (kl,) = monitor.check(5, {}, 7.5)
    assert "KL 7.50 nats is over the budget 6" in kl
    restored = OverOptimizationMonitor(kl_budget=6.0)
    restored.load_state_dict(json.loads(json.dumps(monitor.state_dict())))
    assert restored.last == monitor.last == {"gold": 0.45, "proxy": 0.6}
    assert len(restored.check(6, {"gold/accuracy": 0.1, "gold/proxy_score": 0.9}, 0.0)) == 1


# --- checkpoints restore every RNG ----------------------------------------------------------------------------


def test_checkpoint_restores_torch_python_and_numpy_rng(tmp_path):
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    path = checkpoint.save(tmp_path / "checkpoints", 1, acc, {"iteration": 1}, {}, {}, {}, keep=1)
    expected = (torch.rand(4), random.random(), np.random.rand(3))
    random.seed(10)
    np.random.seed(20)
    torch.manual_seed(30)
    assert checkpoint.load(path, acc, {}, {}, {}) == {"iteration": 1}
    got = (torch.rand(4), random.random(), np.random.rand(3))
    assert torch.equal(got[0], expected[0]) and got[1] == expected[1] and np.array_equal(got[2], expected[2])


# --- several processes: the same forwards everywhere, gold evaluation on shards -------------------------------


class Always:
    """A stand-in causal LM whose greedy token is always `token`; counts its forwards."""

    def __init__(self, token: int, vocab: int = 8):
        self.token, self.vocab, self.forwards = token, vocab, 0

    def __call__(self, input_ids, **_):
        from types import SimpleNamespace

        self.forwards += 1
        logits = torch.zeros(input_ids.shape[0], 1, self.vocab)
        logits[..., self.token] = 1.0
        return SimpleNamespace(logits=logits)


def gold_setup(root: Path):
    from data_formats.schemas import parse_prompt
    from rlhf.data import encode_prompts, load_split
    from rlhf.models import load_model
    from rlhf.sections import PromptData
    from rlhf.scoring import load_scorer

    r = recipe("ppo", root)
    tokenizer = load_tokenizer(r.model.name_or_path)
    split = load_split(PromptData(train=r.ppo.gold_prompts, template=r.data.template), parse_prompt, 0)
    prompts = encode_prompts(split.train, tokenizer, r.data.max_prompt_len)[0][:5]
    model = load_model(r.model.name_or_path, vocab=len(tokenizer)).eval()
    return model, tokenizer, prompts, load_scorer(r.ppo.reward_model)


GOLD_CFG = dict(max_new_tokens=12, temperature=1.0, batch_size=2)


def _worker(rank: int, world: int, port: int, root: str, out: str) -> None:
    import torch.distributed as dist

    from rlhf.monitor import gold_sums
    from rlhf.rollout import seeded_generate

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        # rank 0's rows end at once, rank 1's never: both must still decode to the same length
        fake = Always(token=2 if rank == 0 else 5)
        seeded_generate(fake, torch.ones(3, 4, dtype=torch.long), torch.ones(3, 4, dtype=torch.long),
                        GenerateSection(max_new_tokens=30, temperature=0.0), stop_ids=[2], pad_id=0, synced=True)
        model, tokenizer, prompts, scorer = gold_setup(Path(root))
        n = len(prompts)  # 5 over 2 processes: shards of 2 and 3, so 1 and 2 generate calls of 2 prompts
        lo, hi = rank * n // world, (rank + 1) * n // world
        forwards = []
        model.register_forward_hook(lambda *_: forwards.append(1))
        sums = gold_sums(model, tokenizer, prompts[lo:hi], GenerateSection(**GOLD_CFG), "cpu", scorer, seed=0,
                         first=lo, batches=2, synced=True)
        Path(out, f"rank{rank}.json").write_text(json.dumps({"fake": fake.forwards, "sums": sums,
                                                            "forwards": len(forwards)}))
    finally:
        dist.destroy_process_group()


def test_processes_run_the_same_forwards_and_shard_the_gold_evaluation(chain, tmp_path):
    from rlhf.monitor import gold_sums

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_worker, args=(2, port, str(chain["root"]), str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["fake"] == ranks[1]["fake"] == 30  # the prefill and 29 decoding steps on both
    assert ranks[0]["forwards"] == ranks[1]["forwards"]  # the short shard joins the forwards of the long one
    model, tokenizer, prompts, scorer = gold_setup(chain["root"])
    whole = gold_sums(model, tokenizer, prompts, GenerateSection(**GOLD_CFG), "cpu", scorer, seed=0)
    for key, value in whole.items():
        assert ranks[0]["sums"][key] + ranks[1]["sums"][key] == pytest.approx(value, abs=1e-4), key
    assert whole["rows"] == 5


def test_every_ppo_logprob_forbids_the_pad_token_as_the_rollout_did(chain, tmp_path, monkeypatch):
    """The rollout engines never sample the pad token; old, reference and update log-probs (and the entropy) must
    be taken under that same distribution (rlhf.logprobs.prepare_logits with the pad id suppressed)."""
    import rlhf.ppo

    calls = []
    original = rlhf.ppo.response_logprobs

    def spy(*args, **kwargs):
        calls.append(kwargs.get("suppress_ids"))
        return original(*args, **kwargs)

    monkeypatch.setattr(rlhf.ppo, "response_logprobs", spy)
    run = run_stage("ppo", chain["root"], "train.max_steps=1", "ppo.gold_every=0", f"output_dir={tmp_path}/run")
    pad = load_tokenizer(str(run / "model")).pad_token_id
    assert len(calls) >= 3 and set(calls) == {(pad,)}  # old, reference and update passes
