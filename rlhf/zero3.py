"""DeepSpeed ZeRO-3 and model loading: a partitioned parameter is an empty flat tensor on each process (its full
shape in `ds_shape`), so code that reads shapes or edits weights before `accelerator.prepare` goes through these.
Without DeepSpeed they change nothing."""

from __future__ import annotations

import contextlib

import torch


def rows(weight: torch.Tensor) -> int:
    """First dimension of a weight; under DeepSpeed ZeRO-3 a loaded weight is an empty partition whose full shape
    is `ds_shape`."""
    return getattr(weight, "ds_shape", weight.shape)[0]


def gathered(weight: torch.Tensor):
    """A context in which a ZeRO-3 partitioned weight is whole and edits to it (on rank 0) are kept."""
    if not hasattr(weight, "ds_shape"):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([weight], modifier_rank=0)


@contextlib.contextmanager
def replicated_load():
    """Load a frozen model whole on every process, also under DeepSpeed ZeRO-3: with `zero3_init_flag`,
    transformers partitions every model it loads for an engine to gather, and a frozen model never goes through
    one (`accelerator.prepare` takes one DeepSpeed model). transformers reads the config from a module-level weak
    reference; it is cleared for this load only."""
    try:
        from transformers.integrations import deepspeed as hf_deepspeed
    except ImportError:  # pragma: no cover
        yield
        return
    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved
