"""Log-probs + entropy of (B, T, V) logits on CPU: today's full-tensor functions vs the chunked ones vs TRL.

    python bench/logprobs.py                              # V = 32k, 152k, 256k at B x T = 8 x 512, float32
    python bench/logprobs.py --vocab 152064 --dtypes float32,bfloat16
    python bench/logprobs.py --tiny                       # a smoke run in seconds

What PPO's update computes per micro-batch: the log-probs of the labels and the entropy, both with a
gradient, then the backward of Σ w1·logprob + w2·entropy (w random). Variants:
  before  the two functions rlhf.losses had before the chunked version (copied below): float32
          log-softmax of the whole tensor, one pass for the log-probs and one for the entropy;
  ours    rlhf.logprobs.logprobs_and_entropy: rows in chunks, one pass, softmax recomputed in backward;
  TRL     trl.trainer.utils.selective_log_softmax + entropy_from_logits (its CPU paths).
Each variant runs in its own process. Memory: after the logits exist and a warm-up on 4 rows, the
process's peak resident set (VmHWM) is reset to its current size (Linux /proc/self/clear_refs, value
5); "fwd" is the growth of that peak during the forward, "fwd+bwd" during forward and backward, which
includes the logits' gradient (B·T·V values in the logits' dtype, the same for every variant). Time:
wall seconds, the minimum over --repeat runs (the CPU is shared: expect noise). Accuracy: max |Δ| of
the log-probs, the entropy and the gradient against the same formulas evaluated in float64.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from common import table

VARIANTS = ("before", "ours", "TRL")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# --- the functions rlhf.losses had before (the baseline, verbatim) -------------------------------------


def logprobs_from_logits_before(logits, labels, temperature: float = 1.0):
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    picked = z.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(z, dim=-1)


def entropy_from_logits_before(logits, temperature: float = 1.0):
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    return torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(-1)


def run_variant(name: str, logits, labels, temperature: float):
    """(logprobs, entropy) of one variant, each (B, T)."""
    if name == "before":
        return logprobs_from_logits_before(logits, labels, temperature), entropy_from_logits_before(logits, temperature)
    if name == "ours":
        from rlhf.logprobs import logprobs_and_entropy

        return logprobs_and_entropy(logits, labels, temperature)
    from trl.trainer.utils import entropy_from_logits, selective_log_softmax

    scaled = logits / temperature if temperature != 1.0 else logits  # TRL's entropy takes no temperature
    return selective_log_softmax(logits, labels, temperature), entropy_from_logits(scaled)


# --- one measurement, in a process of its own -------------------------------------------------------------


def status_kib(field: str) -> int:
    """A `Vm...` line of /proc/self/status, in KiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS


def available_kib() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))


def make_inputs(batch: int, tokens: int, vocab: int, dtype: torch.dtype):
    """Logits ~ N(0, 2²) filled 64 rows at a time (no full-size float32 temporary before the baseline)."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.empty(batch * tokens, vocab, dtype=dtype)
    for start in range(0, batch * tokens, 64):
        logits[start:start + 64] = torch.randn(min(64, batch * tokens - start), vocab, generator=gen) * 2
    labels = torch.randint(0, vocab, (batch, tokens), generator=gen)
    weights = torch.randn(2, batch, tokens, generator=gen)
    return logits.view(batch, tokens, vocab).requires_grad_(True), labels, weights


def max_errors(logits, labels, weights, temperature: float, logprobs, entropy) -> dict:
    """max |Δ| against log_softmax / softmax in float64, 64 rows at a time."""
    flat, grad = logits.detach().flatten(0, 1), logits.grad.flatten(0, 1)
    y, w = labels.flatten(), weights.flatten(1)
    lp, ent = logprobs.detach().flatten().double(), entropy.detach().flatten().double()
    errors = {"logprob": 0.0, "entropy": 0.0, "grad": 0.0}
    for s in range(0, flat.shape[0], 64):
        x = flat[s:s + 64].double().requires_grad_(True)
        logp = torch.log_softmax(x / temperature, -1)
        ref_lp = logp.gather(-1, y[s:s + 64, None]).squeeze(-1)
        ref_ent = -(logp.exp() * logp).sum(-1)
        (ref_grad,) = torch.autograd.grad((w[0, s:s + 64] * ref_lp + w[1, s:s + 64] * ref_ent).sum(), x)
        for key, err in (("logprob", lp[s:s + 64] - ref_lp), ("entropy", ent[s:s + 64] - ref_ent),
                         ("grad", grad[s:s + 64].double() - ref_grad)):
            errors[key] = max(errors[key], err.abs().max().item())
    return errors


def worker(spec: dict) -> dict:
    if spec["variant"] == "TRL":
        import trl.trainer.utils  # noqa: F401  (imported before the baseline)
    # a guard for the shared machine: an allocation past what is free fails here instead of the OOM killer
    limit = (status_kib("VmSize") + int(0.85 * available_kib())) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    logits, labels, weights = make_inputs(spec["batch"], spec["tokens"], spec["vocab"], DTYPES[spec["dtype"]])
    temperature = spec["temperature"]
    # warm-up on 1 x 4 rows: library code paged in and thread pools started before the baseline
    small = logits.detach()[:1, :4].clone().requires_grad_(True)
    sum(x.float().sum() for x in run_variant(spec["variant"], small, labels[:1, :4], temperature)).backward()
    forward_s, total_s = [], []
    for run in range(spec["repeat"]):
        logits.grad = None
        if run == 0:
            reset_peak()
            base = status_kib("VmRSS")
        start = time.perf_counter()
        try:
            logprobs, entropy = run_variant(spec["variant"], logits, labels, temperature)
            forward_s.append(time.perf_counter() - start)
            fwd_peak = status_kib("VmHWM") - base
            ((weights[0] * logprobs).sum() + (weights[1] * entropy.float()).sum()).backward()
        except RuntimeError as err:  # the address-space guard
            return {"error": f"out of memory under the {limit / 2 ** 30:.1f} GiB guard ({str(err)[:60]})"}
        total_s.append(time.perf_counter() - start)
        if run == 0:
            peaks = {"fwd_mib": fwd_peak / 1024, "fwdbwd_mib": (status_kib("VmHWM") - base) / 1024}
    return {**peaks, "fwd_s": min(forward_s), "fwdbwd_s": min(total_s),
            **max_errors(logits, labels, weights, temperature, logprobs, entropy)}


# --- the table ---------------------------------------------------------------------------------------------


def measure(spec: dict) -> dict:
    print(f"  {spec['variant']:>6} V={spec['vocab']} {spec['dtype']} ...", file=sys.stderr, flush=True)
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"}
    return json.loads(lines[-1])


def row(spec: dict, result: dict, before: dict) -> dict:
    out = {"V": f"{spec['vocab']:,}", "logits": spec["dtype"], "variant": spec["variant"]}
    if "error" in result:
        return {**out, "fwd peak extra": result["error"]}
    def ratio(key: str) -> str:
        return f" ({result[key] / before[key]:.2f}x)" if before.get(key) and result is not before else ""

    return {**out, "fwd peak extra": f"{result['fwd_mib']:,.0f} MiB{ratio('fwd_mib')}",
            "fwd+bwd peak extra": f"{result['fwdbwd_mib']:,.0f} MiB{ratio('fwdbwd_mib')}",
            "fwd s": f"{result['fwd_s']:.2f}", "fwd+bwd s": f"{result['fwdbwd_s']:.2f}",
            "max abs Δ logprob": f"{result['logprob']:.1e}", "max abs Δ entropy": f"{result['entropy']:.1e}",
            "max abs Δ grad": f"{result['grad']:.1e}"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", default="32000,152064,256000", help="comma-separated vocabulary sizes")
    p.add_argument("--rows", default="8x512", help="B x T of the logits")
    p.add_argument("--dtypes", default="float32", help="logits dtypes: float32, bfloat16")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--repeat", type=int, default=1, help="runs per variant; time = the fastest")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--tiny", action="store_true", help="V = 1000 at 2 x 64: a smoke run")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.tiny:
        args.vocab, args.rows = "1000", "2x64"
    batch, tokens = (int(x) for x in args.rows.lower().split("x"))
    rows = []
    for dtype in args.dtypes.split(","):
        for vocab in (int(v) for v in args.vocab.split(",")):
            before = {}
            for variant in args.variants.split(","):
                spec = dict(variant=variant, vocab=vocab, batch=batch, tokens=tokens, dtype=dtype,
                            temperature=args.temperature, repeat=args.repeat)
                result = measure(spec)
                before = result if variant == "before" else before
                rows.append(row(spec, result, before))
    print(f"B x T = {batch} x {tokens}, temperature {args.temperature}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; peak extra = growth of the peak RSS (VmHWM) over the RSS with the "
          f"logits allocated, one process per row; (x) = / before")
    print(table(rows, ["V", "logits", "variant", "fwd peak extra", "fwd+bwd peak extra", "fwd s", "fwd+bwd s",
                       "max abs Δ logprob", "max abs Δ entropy", "max abs Δ grad"]))


if __name__ == "__main__":
    main()
