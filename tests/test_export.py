"""export: parity check gating, the hub push (intercepted), tokens never written anywhere."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub
import pytest

from rlhf.cli import main
from tests.chain import cli_args, run_stage

SECRET = "hf_s3cr3t_token_value"


@pytest.fixture(scope="module")
def sft_export_args(chain):
    return lambda tmp, *extra: cli_args("export", chain["root"], f"source={chain['sft']}", f"output_dir={tmp}/exp",
                                        *extra)


class FakeHub:
    """Stands in for the hub API: records calls, never touches the network."""

    calls: list = []

    def __init__(self, *a, **k):
        pass

    def create_repo(self, repo_id, private=True, exist_ok=False, repo_type=None):
        FakeHub.calls.append(("create_repo", repo_id, private))

    def create_branch(self, repo_id, branch, exist_ok=False):
        FakeHub.calls.append(("create_branch", repo_id, branch))

    def upload_folder(self, folder_path, repo_id, revision=None, commit_message=None):
        files = sorted(p.name for p in Path(folder_path).iterdir())
        FakeHub.calls.append(("upload_folder", repo_id, revision, commit_message, files))

        class Info:
            oid = "abc123"
            commit_url = f"https://huggingface.co/{repo_id}/commit/abc123"

        return Info()


def test_push_uses_the_hub_api_and_never_writes_the_token(sft_export_args, tmp_path, monkeypatch, capsys):
    FakeHub.calls = []
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: SECRET)
    args = sft_export_args(tmp_path, "export.push_to_hub=true", "export.hub_repo_id=someone/tiny-sft",
                           "export.revision=v1", "export.commit_message=first")
    assert main(args) == 0
    out = capsys.readouterr()
    assert [c[0] for c in FakeHub.calls] == ["create_repo", "create_branch", "upload_folder"]
    assert FakeHub.calls[0][1:] == ("someone/tiny-sft", True)
    _, repo, revision, message, files = FakeHub.calls[2]
    assert (repo, revision, message) == ("someone/tiny-sft", "v1", "first")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "README.md"):
        assert name in files
    manifest = json.loads((tmp_path / "exp" / "manifest.json").read_text())
    assert manifest["pushed"]["commit"] == "abc123"
    everything = out.out + out.err + "".join(p.read_text(errors="ignore") for p in (tmp_path / "exp").rglob("*")
                                             if p.is_file())
    assert SECRET not in everything


def test_no_token_is_a_clear_error_after_a_complete_local_export(sft_export_args, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    assert main(sft_export_args(tmp_path, "export.push_to_hub=true", "export.hub_repo_id=someone/x")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: export.push_to_hub: no Hugging Face token")
    assert (tmp_path / "exp" / "manifest.json").is_file() and (tmp_path / "exp" / "model" / "config.json").is_file()


def test_a_failed_parity_check_exports_nothing(sft_export_args, tmp_path, monkeypatch, capsys):
    import stages.export

    monkeypatch.setitem(stages.export.TOLERANCE, "float32", -1.0)  # no difference can pass
    assert main(sft_export_args(tmp_path)) == 2
    assert "parity check failed" in capsys.readouterr().err
    assert not (tmp_path / "exp").exists() and not (tmp_path / "exp.partial").exists()


def test_reward_model_export_keeps_its_head(chain, tmp_path):
    from transformers import AutoModelForSequenceClassification

    out = run_stage("export", chain["root"], f"source={chain['rm']}", f"output_dir={tmp_path}/rm-export")
    model = AutoModelForSequenceClassification.from_pretrained(out / "model")
    assert model.config.num_labels == 1 and (out / "model" / "reward_stats.json").is_file()
    assert json.loads((out / "manifest.json").read_text())["model_info"]["task"] == "seq_cls"


def test_export_shards_and_casts(chain, tmp_path):
    out = run_stage("export", chain["root"], f"source={chain['sft']}", "export.dtype=bfloat16",
                    "export.max_shard_size=100KB", f"output_dir={tmp_path}/sharded")
    shards = sorted((out / "model").glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / "model" / "model.safetensors.index.json").is_file()
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.dtype == __import__("torch").bfloat16
    gen = GenerationConfig.from_pretrained(out / "model")
    assert gen.pad_token_id != gen.eos_token_id
    cast = json.loads((out / "manifest.json").read_text())["parity"]["cast"]
    assert cast["logits_ok"] and cast["max_abs_logit_diff"] > 0  # bf16 differs a little, within tolerance


def test_push_private_false_reaches_the_api(sft_export_args, tmp_path, monkeypatch):
    FakeHub.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: SECRET)
    args = sft_export_args(tmp_path, "export.push_to_hub=true", "export.hub_repo_id=someone/public",
                           "export.private=false")
    assert main(args) == 0
    assert FakeHub.calls[0] == ("create_repo", "someone/public", False)
    assert [c[0] for c in FakeHub.calls] == ["create_repo", "upload_folder"]  # no revision: no branch made
    assert FakeHub.calls[1][2] is None


def test_network_failure_is_one_line_after_a_complete_local_export(sft_export_args, tmp_path, monkeypatch, capsys):
    class Offline(FakeHub):
        def create_repo(self, *a, **k):
            raise ConnectionError("Max retries exceeded with url: /api/repos/create\nmore detail")

    monkeypatch.setattr(huggingface_hub, "HfApi", Offline)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: SECRET)
    assert main(sft_export_args(tmp_path, "export.push_to_hub=true", "export.hub_repo_id=someone/x")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: export.hub_repo_id: push to someone/x failed: Max retries exceeded")
    assert "the local export is complete" in err[-1] and SECRET not in err[-1]
    assert (tmp_path / "exp" / "manifest.json").is_file() and (tmp_path / "exp" / "model" / "config.json").is_file()


def test_ppo_critic_exports_as_a_value_model(chain, tmp_path):
    """`source: <ppo run>/critic`: the critic adapter merged onto its reward-model base, head included."""
    import torch
    from transformers import AutoModelForSequenceClassification

    ppo = run_stage("ppo", chain["root"], "train.max_steps=1", "ppo.gold_every=0", f"output_dir={tmp_path}/ppo")
    out = run_stage("export", chain["root"], f"source={ppo}/critic", "export.dtype=float32",
                    f"output_dir={tmp_path}/critic-export")
    model = AutoModelForSequenceClassification.from_pretrained(out / "model").eval()
    assert model.config.num_labels == 1
    fp = json.loads((ppo / "manifest.json").read_text())["critic_info"]["fingerprint"]
    from rlhf.models import ScalarHead

    values = ScalarHead(model)(torch.tensor([fp["input_ids"]]), torch.ones(1, len(fp["input_ids"]), dtype=torch.long))
    assert torch.allclose(values[0], torch.tensor(fp["values"]), atol=1e-4)


def test_a_failed_push_is_retried_with_resume(sft_export_args, tmp_path, monkeypatch, capsys):
    """No network at the first push: the export is complete; the same command with resume=true pushes it,
    once (a third run finds it pushed and uploads nothing)."""
    class Offline(FakeHub):
        def create_repo(self, *a, **k):
            raise ConnectionError("Max retries exceeded")

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: SECRET)
    monkeypatch.setattr(huggingface_hub, "HfApi", Offline)
    args = sft_export_args(tmp_path, "export.push_to_hub=true", "export.hub_repo_id=someone/x")
    assert main(args) == 2
    hint = capsys.readouterr().err
    assert "pushed" not in json.loads((tmp_path / "exp" / "manifest.json").read_text())
    FakeHub.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    assert main(args + ["resume=true"]) == 0
    assert [c[0] for c in FakeHub.calls] == ["create_repo", "upload_folder"]
    assert json.loads((tmp_path / "exp" / "manifest.json").read_text())["pushed"]["commit"] == "abc123"
    FakeHub.calls = []
    assert main(args + ["resume=true"]) == 0
    assert FakeHub.calls == [] and "was pushed to someone/x (main) already" in capsys.readouterr().err
    assert "(push it with the same command and resume=true)" in hint  # the failure said how to retry


def test_parity_prompts_are_cut_to_the_model_positions():
    """The parity check generates too: a prompt longer than the model's positions is cut from the left
    (keeping BOS) to leave room for the new tokens, as in every other generation path."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from stages.export import forward_figures

    class Tok:
        pad_token_id, eos_token_id, bos_token_id = 0, 2, 1

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=32, bos_token_id=1,
                                         eos_token_id=2, pad_token_id=0)).eval()
    (figures,) = forward_figures(model, Tok(), [[1] + list(range(3, 40)) * 3], new_tokens=8, causal=True,
                                 stop_ids=[2])
    assert figures["logits"].shape[0] == 24 and len(figures["greedy"]) <= 8
