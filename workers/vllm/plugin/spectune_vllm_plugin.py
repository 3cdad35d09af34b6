"""spectune's vLLM plugin (installed into the vLLM environment by `make vllm`; vLLM loads it in each process).

Why: with a `speculative_config` and no async scheduling (vLLM's CPU platform turns it off), vLLM's engine
core asks the model worker for the step's draft tokens after every step (`EngineCore.post_step` ->
`take_draft_token_ids`, one round trip between the two processes), whether or not the step drafted any.
In a band of `num_speculative_tokens_per_batch_size` with k = 0 nothing was drafted, yet the round trip
costs 3-7% of a step on a 2-core CPU (docs/benchmarks.md, "frozen contestants"). This plugin skips the
fetch when the step that just ran was scheduled with no speculative tokens.

Lossless: the scheduler clears every request's draft tokens when it schedules them, and a k = 0 step's
proposer returns none, so a skipped fetch would have set nothing. Only vLLM's own objects are wrapped; a
vLLM without them (another version) is left untouched with a warning. `SPECTUNE_VLLM_SKIP_IDLE_DRAFTS=0`
turns it off (to measure what it saves).
"""

from __future__ import annotations

import functools
import os

from vllm.logger import init_logger

ENV = "SPECTUNE_VLLM_SKIP_IDLE_DRAFTS"
MARK = "_spectune_skips_idle_drafts"
ANNOUNCE = "spectune plugin: a step scheduled with k = 0 skips the draft-token fetch"
FIRST_SKIP = "spectune plugin: skipped the draft-token fetch after a k = 0 step (said once per engine)"
logger = init_logger("vllm.spectune_plugin")  # vLLM's handlers: the line lands in the server's log


def register() -> None:
    """vLLM's `vllm.general_plugins` entry point: wrap the scheduler and the engine core once per process."""
    if os.environ.get(ENV, "1") == "0":
        return
    try:
        from vllm.v1.core.sched.scheduler import Scheduler
        from vllm.v1.engine.core import EngineCore
    except ImportError as err:
        logger.warning("spectune: this vLLM has no v1 scheduler/engine core (%s); draft fetches are not skipped", err)
        return
    if not all(hasattr(cls, name) for cls, name in ((Scheduler, "schedule"), (EngineCore, "post_step"))):
        logger.warning("spectune: this vLLM's engine core has no post_step; draft fetches are not skipped")
        return
    if getattr(EngineCore.post_step, MARK, False):
        return  # vLLM loads plugins more than once per process
    Scheduler.schedule = _remember_k(Scheduler.schedule)
    EngineCore.post_step = _skip_when_k_was_zero(EngineCore.post_step)
    logger.info(ANNOUNCE)


def _remember_k(schedule):
    @functools.wraps(schedule)
    def wrapped(self, *args, **kwargs):
        output = schedule(self, *args, **kwargs)
        # vLLM 0.32's dynamic speculation: the k this step drafts for (its batch size's band)
        self.spectune_last_k = getattr(output, "num_spec_tokens_to_schedule", None)
        return output

    return wrapped


def _skip_when_k_was_zero(post_step):
    @functools.wraps(post_step)
    def wrapped(self, model_executed: bool) -> None:
        if getattr(self.scheduler, "spectune_last_k", None) == 0:
            if not getattr(self, "spectune_skipped", False):
                self.spectune_skipped = True
                logger.info(FIRST_SKIP)
            return  # nothing was drafted: no round trip to the worker
        post_step(self, model_executed)

    setattr(wrapped, MARK, True)
    return wrapped
