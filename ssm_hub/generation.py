"""Greedy decoding with every decode step replayed as one CUDA graph, for models whose cache is all SSM state.

transformers' ``generate`` spends most of a small model's decode step in Python: preparing inputs, dispatching
each layer's kernels, updating model kwargs. An SSM's decode step has fixed shapes and no dependence on the
position, so the whole step (forward, greedy choice, end-of-sequence bookkeeping) can be captured once and
replayed. Use it through ``generate``'s ``custom_generate`` hook, with a static cache so that the states keep
their addresses:

    import ssm_hub
    out = model.generate(input_ids, custom_generate=ssm_hub.cuda_graph_greedy, cache_implementation="static",
                         max_new_tokens=256)

The result is the same LongTensor that greedy ``generate`` returns (prompt followed by the new tokens, finished
rows padded with pad_token_id). On CPU the same step runs eagerly, so the bookkeeping is testable anywhere.
Only what can run inside a graph is accepted: greedy search, the min-length rules and the max-length and
end-of-sequence stops (the ids of every EOS criterion and min-length processor given, not only the config's); any
other logits processor, stopping criterion, streamer or ``return_dict_in_generate`` is an error naming it.

The captured step is kept per model and reused while the weights keep their addresses and the model's mode
(training flag, autocast, PEFT adapters merged / enabled / active) is unchanged. Calls on one model share it, so
two concurrent ``generate`` calls on the same model (threads or streams) are not supported.
"""

import contextlib
import functools
import weakref

import torch
from transformers.cache_utils import DynamicCache, LinearAttentionCacheLayerMixin
from transformers.generation.logits_process import MinLengthLogitsProcessor, MinNewTokensLengthLogitsProcessor
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria

# How many replays run between two host reads of "has every row finished?" (each read waits for the GPU). A cache
# the caller passed in is checked after every step, so that it ends exactly where transformers' loop would leave it.
FINISHED_CHECK_INTERVAL = 32


def _reject_unsupported(model, logits_processor, stopping_criteria, generation_config, synced_gpus, streamer):
    if generation_config.do_sample or generation_config.num_beams != 1:
        raise ValueError("cuda_graph_greedy does greedy search only: use do_sample=False and num_beams=1")
    if generation_config.return_dict_in_generate:
        raise ValueError("cuda_graph_greedy returns token ids only: return_dict_in_generate=True is not supported")
    if streamer is not None or synced_gpus:
        raise ValueError("cuda_graph_greedy supports neither a streamer nor synced_gpus")
    supported_processors = (MinLengthLogitsProcessor, MinNewTokensLengthLogitsProcessor)
    others = [type(p).__name__ for p in logits_processor if not isinstance(p, supported_processors)]
    if others:
        raise ValueError(f"cuda_graph_greedy cannot run these logits processors inside a CUDA graph: {others}")
    others = [type(c).__name__ for c in stopping_criteria if not isinstance(c, (MaxLengthCriteria, EosTokenCriteria))]
    if others:
        raise ValueError(f"cuda_graph_greedy supports only the max-length and EOS stops, not {others}")
    if model.config.is_encoder_decoder:
        raise ValueError("cuda_graph_greedy is for decoder-only models")
    if getattr(model.config, "absolute_position_embeddings", False):
        raise ValueError("cuda_graph_greedy replays a position-independent step, and this model adds absolute "
                         "position embeddings: decode through generate(cache_implementation='static')")


def _check_cache(cache) -> None:
    layers = getattr(cache, "layers", None)
    if cache is None or isinstance(cache, DynamicCache) or not getattr(cache, "is_compileable", False):
        raise ValueError(
            "cuda_graph_greedy needs a cache whose tensors keep their addresses: pass cache_implementation='static'"
        )
    if not layers or not all(isinstance(layer, LinearAttentionCacheLayerMixin) for layer in layers):
        raise ValueError(
            "cuda_graph_greedy replays a position-independent step, so every layer must be an SSM layer; "
            "models with attention layers decode through generate(cache_implementation='static')"
        )


def _stop_ids(stopping_criteria, device) -> torch.Tensor | None:
    """Every id that ends a row: the union of the EOS criteria's (generate builds one from the config; a caller may
    add more), or None without any."""
    ids = [torch.as_tensor(c.eos_token_id, device=device).view(-1) for c in stopping_criteria
           if isinstance(c, EosTokenCriteria)]
    return torch.cat(ids).unique() if ids else None


def _min_new_tokens_per_id(logits_processor, prompt_len: int, vocab_size: int, device) -> torch.Tensor:
    """[V]: for each token id, the count of new tokens before which the min-length processors forbid it (their
    own EOS ids; 0 for the others)."""
    minimum = torch.zeros(vocab_size, dtype=torch.long, device=device)
    for processor in logits_processor:
        if isinstance(processor, MinLengthLogitsProcessor):
            count = processor.min_length - prompt_len
        else:  # MinNewTokensLengthLogitsProcessor, the other kind _reject_unsupported lets through
            count = processor.min_new_tokens - (prompt_len - processor.prompt_length_to_skip)
        ids = torch.as_tensor(processor.eos_token_id, device=device).view(-1)
        minimum[ids] = torch.clamp(minimum[ids], min=count)
    return minimum


class _GreedyDecoder:
    """The device-side state of a greedy decode and the step that advances it.

    Every tensor here keeps its address for the decoder's life and every per-call setting (token budget, EOS
    ids, min length, pad) is a tensor, which is what lets ``step`` be captured once and replayed across calls.
    """

    def __init__(self, batch_size: int, vocab_size: int, capacity: int, device):
        self.capacity = capacity
        long = dict(dtype=torch.long, device=device)
        self.tokens = torch.zeros(batch_size, 1, **long)  # the next step's input
        self.generated = torch.zeros(batch_size, capacity, **long)
        self.unfinished = torch.ones(batch_size, dtype=torch.bool, device=device)
        self.eos_columns = torch.zeros(vocab_size, dtype=torch.bool, device=device)  # which ids end a row
        self.min_new_tokens = torch.zeros(vocab_size, **long)  # per id: forbidden while fewer tokens are written
        self.count = torch.zeros((), **long)  # tokens written so far
        # The length the output keeps: the count when the last row finished (max_new_tokens while any runs).
        self.length = torch.zeros((), **long)
        self.max_new_tokens = torch.zeros((), **long)
        self.pad = torch.zeros((), **long)

    def reset(self, max_new_tokens: int, min_new_tokens: torch.Tensor, eos, pad) -> None:
        """Start a decode: in place, so that a captured step sees the new settings."""
        self.unfinished.fill_(True)
        self.eos_columns.zero_()
        if eos is not None:
            self.eos_columns[eos] = True
            self.pad.copy_(pad)
        self.min_new_tokens.copy_(min_new_tokens)
        self.count.zero_()
        self.length.fill_(max_new_tokens)
        self.max_new_tokens.fill_(max_new_tokens)

    def choose(self, logits: torch.Tensor) -> None:
        """Append the greedy token of ``logits`` [B, V] (float32) to every row; finished rows get pad."""
        logits = logits.masked_fill(self.count < self.min_new_tokens, float("-inf"))
        next_tokens = torch.where(self.unfinished, logits.argmax(-1), self.pad)
        self.unfinished &= ~self.eos_columns[next_tokens]
        self.generated.index_copy_(1, self.count.view(1), next_tokens[:, None])
        self.count += 1
        all_finished_now = ~self.unfinished.any() & (self.length == self.max_new_tokens)
        self.length.copy_(torch.where(all_finished_now, self.count, self.length))
        self.tokens.copy_(next_tokens[:, None])

    def step(self, model, cache) -> None:
        """One decode step: the model reads ``tokens`` against the cache, then ``choose`` picks the next ones."""
        logits = model(input_ids=self.tokens, cache=cache, use_cache=True, logits_to_keep=1).logits
        self.choose(logits[:, -1].float())


def _capture(decoder: _GreedyDecoder, model, cache) -> torch.cuda.CUDAGraph:
    """Run one real step on a side stream (it compiles the Triton kernels and sets up cuBLAS, which a capture
    cannot do), then capture the next step as a graph. The warm-up step is the decode's first step, not a
    throwaway, so the cache never has to be rolled back."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        decoder.step(model, cache)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            decoder.step(model, cache)
    except RuntimeError as error:
        raise RuntimeError(
            f"{type(model).__name__}'s decode step could not be captured in a CUDA graph ({error}); "
            "decode through generate(cache_implementation='static') instead"
        ) from error
    return graph


def _cache_states(cache) -> list[torch.Tensor]:
    """The cache's conv and recurrent state tensors, layer by layer (allocated by the prefill)."""
    states = []
    for layer in cache.layers:
        states += [t for t in (*layer.conv_states.values(), *layer.recurrent_states.values()) if t is not None]
    return states


@contextlib.contextmanager
def _cache_reading(cache, states: list[torch.Tensor]):
    """Point the cache's layers at ``states`` (in ``_cache_states`` order) while the context lasts."""
    saved = [(dict(layer.conv_states), dict(layer.recurrent_states)) for layer in cache.layers]
    replacements = iter(states)
    for layer in cache.layers:
        for slots in (layer.conv_states, layer.recurrent_states):
            for key, tensor in slots.items():
                if tensor is not None:
                    slots[key] = next(replacements)
    try:
        yield
    finally:
        for layer, (conv_states, recurrent_states) in zip(cache.layers, saved):
            layer.conv_states, layer.recurrent_states = conv_states, recurrent_states


class _CapturedDecode:
    """A decoder, its step captured as a CUDA graph, and the state buffers the graph reads and writes.

    generate builds a new cache on every call, so the graph cannot point at the cache: it owns copies of the
    states instead. A call copies the prefill's states in and the final states back out (one multi-tensor copy
    each way), so the cache ends as if the steps had run on it.
    """

    def __init__(self, model, cache, decoder: _GreedyDecoder, key: tuple):
        self.decoder, self.key = decoder, key
        self.states = [t.clone() for t in _cache_states(cache)]
        with _cache_reading(cache, self.states):
            self.graph = _capture(decoder, model, cache)


try:
    from peft.tuners.tuners_utils import BaseTunerLayer

    _PEFT_LAYER_TYPES: tuple[type, ...] = (BaseTunerLayer,)
except ImportError:  # PEFT is a dependency; without it there are no adapter layers to account for
    _PEFT_LAYER_TYPES = ()

# model -> its _CapturedDecode. Weak, and the entry holds no reference to the model or to a cache, so a deleted
# model frees its graph.
_CAPTURED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _capture_key(model, states: list[torch.Tensor], batch_size: int) -> tuple:
    """What a captured step depends on: the batch size; the parameters' and buffers' addresses (it reads them in
    place); the states' shapes and dtypes; and the Python-side modes that change which kernels a forward runs: the
    training flag, autocast, and each PEFT layer's merged / disabled / active adapters (merging writes into the
    base weights in place, so the addresses alone would not show it)."""
    weights = [*model.parameters(), *model.buffers()]
    adapters = tuple(
        (name, module.merged, module.disable_adapters, tuple(module.active_adapters))
        for name, module in model.named_modules() if isinstance(module, _PEFT_LAYER_TYPES)
    )
    autocast = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
    return (
        batch_size, model.training, autocast, adapters,
        tuple((t.data_ptr(), tuple(t.shape), t.dtype) for t in weights),
        tuple((tuple(t.shape), t.dtype) for t in states),
    )


@torch.no_grad()
def cuda_graph_greedy(
    model,
    input_ids: torch.LongTensor,
    logits_processor=(),
    stopping_criteria=(),
    generation_config=None,
    synced_gpus: bool = False,
    streamer=None,
    **model_kwargs,
) -> torch.LongTensor:
    """``generate``'s decoding loop for greedy search, each decode step replayed as one CUDA graph (see module)."""
    generation_config = generation_config if generation_config is not None else model.generation_config
    _reject_unsupported(model, logits_processor, stopping_criteria, generation_config, synced_gpus, streamer)
    cache = model_kwargs.get("cache")
    _check_cache(cache)

    batch_size, prompt_len = input_ids.shape
    max_new_tokens = generation_config.max_length - prompt_len
    if max_new_tokens < 1:
        raise ValueError(f"nothing to generate: max_length {generation_config.max_length} <= prompt length {prompt_len}")
    eos = _stop_ids(stopping_criteria, input_ids.device)
    pad = generation_config._pad_token_tensor
    if eos is not None:
        if pad is None:
            raise ValueError("an eos_token_id needs a pad_token_id to fill the rows that have finished")
        pad = pad.to(input_ids.device)
    vocab_size = model.get_output_embeddings().weight.shape[0]
    min_new_tokens = _min_new_tokens_per_id(logits_processor, prompt_len, vocab_size, input_ids.device)
    check_every = 1 if getattr(cache, "_is_user_defined", False) else FINISHED_CHECK_INTERVAL

    # The prompt goes through generate's own prefill (input preparation, left padding, chunked prefill), which
    # also allocates the cache's states.
    prefill_logits = model._prefill(input_ids, generation_config, model_kwargs).logits[:, -1].float()
    if not input_ids.is_cuda:  # no graphs: the same step, run eagerly on the cache itself
        decoder = _GreedyDecoder(batch_size, vocab_size, max_new_tokens, input_ids.device)
        decoder.reset(max_new_tokens, min_new_tokens, eos, pad)
        decoder.choose(prefill_logits)
        step = functools.partial(decoder.step, model, cache)
        return _decode(decoder, step, max_new_tokens - 1, check_every, input_ids)
    with torch.cuda.device(input_ids.device):  # streams and graphs belong to the model's GPU, not the current one
        return _decode_with_graph(model, cache, input_ids, prefill_logits, max_new_tokens, min_new_tokens, eos, pad,
                                  check_every)


def _decode_with_graph(model, cache, input_ids, prefill_logits, max_new_tokens, min_new_tokens, eos, pad,
                       check_every) -> torch.LongTensor:
    batch_size = input_ids.shape[0]
    vocab_size = min_new_tokens.shape[0]
    states = _cache_states(cache)
    key = _capture_key(model, states, batch_size)
    captured = _CAPTURED.get(model)
    reuse = captured is not None and captured.key == key and captured.decoder.capacity >= max_new_tokens
    decoder = captured.decoder if reuse else _GreedyDecoder(batch_size, vocab_size, max_new_tokens, input_ids.device)
    decoder.reset(max_new_tokens, min_new_tokens, eos, pad)
    decoder.choose(prefill_logits)
    steps_left = max_new_tokens - 1
    if steps_left == 0 or (check_every == 1 and not decoder.unfinished.any()):  # nothing to capture a step for
        return _decode(decoder, None, 0, check_every, input_ids)
    if reuse:
        torch._foreach_copy_(captured.states, states)
    else:
        captured = _CAPTURED[model] = _CapturedDecode(model, cache, decoder, key)  # runs the first step
        steps_left -= 1
    output = _decode(decoder, captured.graph.replay, steps_left, check_every, input_ids)
    torch._foreach_copy_(states, captured.states)
    return output


def _decode(decoder: _GreedyDecoder, run_step, steps: int, check_every: int, input_ids: torch.LongTensor
            ) -> torch.LongTensor:
    """Run up to ``steps`` steps, stopping early once every row has finished (read before every ``check_every``-th
    step); prompt + new tokens."""
    for index in range(steps):
        if index % check_every == 0 and not decoder.unfinished.any():
            break
        run_step()
    generated = decoder.generated[:, : int(torch.minimum(decoder.count, decoder.length))]
    return torch.cat([input_ids, generated], dim=1)
