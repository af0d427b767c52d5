"""``generate()`` for every ssm_hub causal LM, with each decode step replayed as one CUDA graph by default.

transformers' decoding loop spends most of a small model's step in Python: preparing inputs, dispatching each
layer's kernels, running the logits processors, checking the stopping criteria. An SSM's decode step has fixed
shapes, and so does an attention layer's against a static cache, so the whole step can be captured once and
replayed. Every ssm_hub causal LM inherits :class:`GraphDecodingGenerationMixin`, whose ``_sample`` (the loop that
``generate`` runs for greedy search and sampling) does this:

1. The prompt goes through transformers' own prefill (input preparation, left padding, images, chunked prefill)
   into a ``StaticCache`` that the decoder owns, so that its tensors keep their addresses from call to call.
2. Each later step runs the model on one token per row, applies the logits processors, chooses the token (argmax,
   or sampling written as ``torch.multinomial`` computes it, so the same seed gives the same tokens) and does the
   end-of-sequence bookkeeping, all on the device. On CUDA the step is captured as a graph on the first call and
   replayed; on a CPU it runs as it is.
3. The host reads "has every row finished?" every ``FINISHED_CHECK_INTERVAL`` steps only.

The tokens are those of transformers' loop, and so are the samples for a given seed. Where the step cannot be
captured (a streamer, a logits processor or stopping criterion that needs the host, ``return_dict_in_generate``, a
cache passed in, an offloaded or quantized cache_implementation, sliding-window attention layers, ...)
transformers' own loop runs instead, after one info line on the ``ssm_hub.generation`` logger that names the
reason; ``generate(..., disable_compile=True)`` asks for that loop, as it turns off transformers' automatic
compilation. Beam search and assisted decoding (an assistant model, prompt lookup) are transformers' own: the SSM
layers keep the states transformers' cache needs to roll rejected tokens back (ssm_hub.layers.state_rollback).

The captured step (with its cache and buffers) is kept per model, one at a time, and replayed by later calls with
the same batch size, cache length bucket, processors and model state (weights' addresses, training flag,
autocast, inference mode, attention implementation, kernel backend, forward hooks, PEFT adapters). Its static
cache holds the prompt and every new token from the start, and stays allocated between calls until another
shape replaces it or the model is deleted. Two concurrent ``generate`` calls on one model (threads or streams)
are not supported.
"""

import copy
import logging
import math
import time
import weakref

import torch
from transformers import GenerationMixin
from transformers.cache_utils import StaticCache
from transformers.generation.logits_process import (
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria

from ssm_hub.backend import environment_backend
from ssm_hub.layers.sequence_boundaries import check_mask_length, check_position_range

logger = logging.getLogger(__name__)

# How many steps run between two host reads of "has every row finished?" (each read waits for the device).
FINISHED_CHECK_INTERVAL = 32
# The decoder's cache length is the generated length rounded up to this, so that calls of similar lengths share a
# captured step; attention layers attend over the whole static cache, so the rounding is kept small.
CACHE_LENGTH_GRANULE = 256
# Processors whose __call__ is device-only tensor code of fixed shapes: they run inside the graph as they are, on a
# fixed-size buffer of the ids so far (unwritten slots hold an id past the vocabulary, which the repetition penalty
# drops). Their scalar settings are part of the capture key.
GRAPH_SAFE_PROCESSORS = (
    TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
)
# Processors that read the length of the ids on the host: the decoder applies them from a device-side token count,
# before the others (where transformers puts them), so that a call with or without them replays the same step.
MIN_LENGTH_PROCESSORS = (MinLengthLogitsProcessor, MinNewTokensLengthLogitsProcessor)
# Warpers whose result changes if EOS is masked after them rather than before.
TRUNCATING_PROCESSORS = (TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper)
# What transformers passes to _sample that the decoder uses: the prefill takes all of them, the steps need only the
# cache, the padding mask and the positions.
DECODER_MODEL_KWARGS = ("cache", "attention_mask", "position_ids", "use_cache", "logits_to_keep", "inputs_embeds",
                        "pixel_values", "image_sizes")
ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")
# The cache_implementation values whose cache the decoder's own static cache stands in for.
DECODER_CACHE_IMPLEMENTATIONS = (None, "dynamic", "static")
# Names under which a cache may reach generate() (transformers' own, and the older ones it still accepts).
GENERATE_CACHE_KWARGS = ("cache", "past_key_values", "cache_params")
# generate() arguments that transformers hands to greedy search, sampling and beam search mixed with the model's
# keyword arguments (the tokenizer, already used by then for stop strings and token healing). They are no model inputs:
# transformers' models swallow them in **kwargs, ours reject unknown keyword arguments.
GENERATE_ONLY_KWARGS = ("tokenizer",)


def _without_generate_only_kwargs(model_kwargs: dict) -> dict:
    return {key: value for key, value in model_kwargs.items() if key not in GENERATE_ONLY_KWARGS}


def _graph_safe(logits_processor) -> list:
    return [p for p in logits_processor if type(p) in GRAPH_SAFE_PROCESSORS]


def _processor_settings(processor) -> tuple:
    """What a graph-safe processor bakes into a captured step: its scalar settings, and the shapes and dtypes of its
    tensor settings (their values are copied into the decoder's own copies at each call; see _Decoder.start)."""
    settings = []
    for name, value in sorted(vars(processor).items()):
        if isinstance(value, torch.Tensor):
            settings.append((name, "tensor", tuple(value.shape), value.dtype))
        else:
            settings.append((name, value))
    return (type(processor).__name__, tuple(settings))


def eager_decoding_reason(model, logits_processor, stopping_criteria, generation_config, synced_gpus, streamer,
                          model_kwargs) -> str | None:
    """Why this ``_sample`` call must run transformers' own loop, or None if the decoder can run it."""
    config = model.config
    if generation_config.disable_compile:
        return "disable_compile=True"
    if generation_config.compile_config is not None:
        return "a compile_config was given (transformers compiles the forward instead)"
    if streamer is not None:
        return "a streamer reads every token as it is made"
    if synced_gpus:
        return "synced_gpus=True"
    if generation_config.return_dict_in_generate:
        return "return_dict_in_generate=True (the decoder returns token ids only)"
    if not generation_config.use_cache:
        return "use_cache=False"
    if generation_config.is_assistant:
        return "the model drafts for an assistant-decoding loop"
    cache = model_kwargs.get("cache")
    if getattr(cache, "_is_user_defined", False):
        return "a cache was passed in (the decoder prefills a static cache of its own)"
    if generation_config.cache_implementation not in DECODER_CACHE_IMPLEMENTATIONS:
        return (f"cache_implementation={generation_config.cache_implementation!r} (the decoder keeps a static cache "
                "on the device)")
    other_kwargs = sorted(key for key, value in model_kwargs.items()
                          if key not in DECODER_MODEL_KWARGS and value is not None)
    if other_kwargs:
        return f"model keyword arguments the decode step does not take: {other_kwargs}"
    unsupported = [type(p).__name__ for p in logits_processor
                   if type(p) not in MIN_LENGTH_PROCESSORS + GRAPH_SAFE_PROCESSORS]
    if unsupported:
        return f"logits processors that need the host: {unsupported}"
    before_last_min_length = max(
        (i for i, p in enumerate(logits_processor) if type(p) in MIN_LENGTH_PROCESSORS), default=0)
    if any(type(p) in TRUNCATING_PROCESSORS for p in list(logits_processor)[:before_last_min_length]):
        return "a min-length processor after a top-k / top-p / min-p warper (the decoder masks EOS first)"
    unsupported = [type(c).__name__ for c in stopping_criteria
                   if type(c) not in (MaxLengthCriteria, EosTokenCriteria)]
    if unsupported:
        return f"stopping criteria other than max length and EOS: {unsupported}"
    layer_types = getattr(config, "layer_types", None) or ()
    if "sliding_attention" in layer_types:
        return "sliding-window attention layers (transformers' static cache tracks their fill on the host)"
    has_attention = any(kind in ATTENTION_LAYER_TYPES for kind in layer_types)
    if has_attention and config._attn_implementation not in ("sdpa", "eager"):
        return f"attention implementation {config._attn_implementation!r} (the decoder captures 'sdpa' and 'eager')"
    devices = set(getattr(model, "hf_device_map", {}).values())
    if len(devices) > 1:
        return f"the model is spread over several devices ({sorted(map(str, devices))})"
    return None


def _stop_ids(stopping_criteria, vocab_size: int, device) -> torch.Tensor | None:
    """Every id that ends a row: the union of the EOS criteria's (generate builds one from the config; a caller may
    add more), or None without any. Ids outside the vocabulary are kept out: no token ever matches them."""
    ids = [torch.as_tensor(c.eos_token_id, device=device).view(-1) for c in stopping_criteria
           if type(c) is EosTokenCriteria]
    if not ids:
        return None
    ids = torch.cat(ids).unique()
    return ids[(ids >= 0) & (ids < vocab_size)]


def _min_new_tokens_per_id(logits_processor, prompt_len: int, vocab_size: int, device) -> torch.Tensor:
    """[V]: for each token id, the count of new tokens before which the min-length processors forbid it (their
    own EOS ids; 0 for the others)."""
    minimum = torch.zeros(vocab_size, dtype=torch.long, device=device)
    for processor in logits_processor:
        if type(processor) is MinLengthLogitsProcessor:
            count = processor.min_length - prompt_len
        elif type(processor) is MinNewTokensLengthLogitsProcessor:
            count = processor.min_new_tokens - (prompt_len - processor.prompt_length_to_skip)
        else:
            continue
        ids = torch.as_tensor(processor.eos_token_id, device=device).view(-1)
        minimum[ids] = torch.clamp(minimum[ids], min=count)
    return minimum


try:
    from peft.tuners.tuners_utils import BaseTunerLayer

    _PEFT_LAYER_TYPES: tuple[type, ...] = (BaseTunerLayer,)
except ImportError:  # PEFT is a dependency; without it there are no adapter layers to account for
    _PEFT_LAYER_TYPES = ()


def _model_key(model) -> tuple:
    """What a captured step depends on in the model: the parameters' and buffers' addresses, shapes and dtypes (it
    reads them in place), and the Python-side state that changes what a forward runs: the training flag, autocast,
    inference mode (tensors made under it cannot be updated outside it), the attention implementation, the kernel
    backend variable, the modules' forward hooks, and each PEFT layer's merged / disabled / active adapters
    (merging writes into the base weights in place, so the addresses alone would not show it)."""
    weights = [*model.parameters(), *model.buffers()]
    adapters, hooks = [], []
    for name, module in model.named_modules():
        if isinstance(module, _PEFT_LAYER_TYPES):
            adapters.append((name, module.merged, module.disable_adapters, tuple(module.active_adapters)))
        if module._forward_hooks or module._forward_pre_hooks:
            hooks.append((name, tuple(module._forward_hooks), tuple(module._forward_pre_hooks)))
    global_hooks = (tuple(torch.nn.modules.module._global_forward_hooks),
                    tuple(torch.nn.modules.module._global_forward_pre_hooks))
    modes = (model.training, torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"),
             torch.is_inference_mode_enabled(), getattr(model.config, "_attn_implementation", None),
             environment_backend())
    return (modes, tuple(adapters), tuple(hooks), global_hooks,
            tuple((t.data_ptr(), tuple(t.shape), t.dtype) for t in weights))


class _Decoder:
    """The device-side state of a decode, its cache and the step that advances it.

    Every tensor here keeps its address for the decoder's life and every per-call setting (prompt, token budget,
    EOS ids, min length, pad) is written into a tensor in place, which is what lets ``step`` be captured once and
    replayed across calls. The processors' scalar settings and the call's shape are in ``key`` instead.
    """

    def __init__(self, model, key: tuple, batch_size: int, cache_length: int, vocab_size: int, device,
                 logits_processor, do_sample: bool, has_padding: bool):
        self.key, self.cache_length, self.vocab_size = key, cache_length, vocab_size
        self.cache = StaticCache(config=model.config, max_cache_len=cache_length)
        # Copies of the processors of the call that made the decoder, with tensor settings of their own on the
        # device: a captured step reads those tensors, so later calls copy their values into them (their other
        # settings are in the key). The caller's processors are left as they are.
        self.processors = [copy.copy(processor) for processor in _graph_safe(logits_processor)]
        for processor in self.processors:
            for name, value in vars(processor).items():
                if isinstance(value, torch.Tensor):
                    setattr(processor, name, value.to(device, copy=True))
        self.do_sample = do_sample
        long = dict(dtype=torch.long, device=device)
        # The prompt, then the new tokens, then vocab_size (an id the repetition penalty drops) in unwritten slots.
        self.ids = torch.full((batch_size, cache_length), vocab_size, **long)
        self.tokens = torch.zeros(batch_size, 1, **long)  # the next step's input
        self.positions = torch.zeros(batch_size, 1, **long)
        # The prompt's padding mask followed by ones; only passed when the prompt is padded.
        self.attention_mask = torch.ones(batch_size, cache_length, **long) if has_padding else None
        self.prompt_length = torch.zeros((), **long)
        self.unfinished = torch.ones(batch_size, dtype=torch.bool, device=device)
        self.eos_columns = torch.zeros(vocab_size, dtype=torch.bool, device=device)  # which ids end a row
        self.min_new_tokens = torch.zeros(vocab_size, **long)  # per id: forbidden while fewer tokens are written
        self.count = torch.zeros((), **long)  # tokens written so far
        # The length the output keeps: the count when the last row finished (max_new_tokens while any runs).
        self.length = torch.zeros((), **long)
        self.max_new_tokens = torch.zeros((), **long)
        self.pad = torch.zeros((), **long)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.capture_failed = False

    def start(self, input_ids, attention_mask, logits_processor, max_new_tokens: int, min_new_tokens, eos, pad):
        """Set up a call in place: its processors' tensor settings, prompt, budget and stops."""
        for own, given in zip(self.processors, _graph_safe(logits_processor)):
            for name, value in vars(own).items():
                if isinstance(value, torch.Tensor) and getattr(given, name) is not value:
                    value.copy_(getattr(given, name))
        prompt_len = input_ids.shape[1]
        self.ids[:, :prompt_len].copy_(input_ids)
        self.ids[:, prompt_len:].fill_(self.vocab_size)
        if self.attention_mask is not None:
            prefill_len = attention_mask.shape[1]
            self.attention_mask[:, :prefill_len].copy_(attention_mask)
            self.attention_mask[:, prefill_len:].fill_(1)
        self.prompt_length.fill_(prompt_len)
        self.unfinished.fill_(True)
        self.eos_columns.zero_()
        if eos is not None:
            self.eos_columns[eos] = True
            self.pad.copy_(pad)
        self.min_new_tokens.copy_(min_new_tokens)
        self.count.zero_()
        self.length.fill_(max_new_tokens)
        self.max_new_tokens.fill_(max_new_tokens)
        self.cache.reset()

    def choose(self, logits: torch.Tensor) -> None:
        """Append the next token of every row, chosen from ``logits`` [B, V] (float32) as transformers' loop chooses
        it; finished rows get pad."""
        # Every min-length processor's ids and counts are in one mask (without any, it forbids nothing).
        scores = logits.masked_fill(self.count < self.min_new_tokens, -math.inf)
        for processor in self.processors:
            scores = processor(self.ids, scores)
        if self.do_sample:
            # torch.multinomial(probs, 1) draws exactly this (exponential race), but checks its input on the host.
            probs = scores.softmax(dim=-1)
            next_tokens = (probs / torch.empty_like(probs).exponential_(1)).argmax(dim=-1)
        else:
            next_tokens = scores.argmax(dim=-1)
        next_tokens = torch.where(self.unfinished, next_tokens, self.pad)
        self.unfinished &= ~self.eos_columns[next_tokens]
        self.ids.scatter_(1, (self.prompt_length + self.count).expand(next_tokens.shape[0], 1), next_tokens[:, None])
        self.count += 1
        all_finished_now = ~self.unfinished.any() & (self.length == self.max_new_tokens)
        self.length.copy_(torch.where(all_finished_now, self.count, self.length))
        self.tokens.copy_(next_tokens[:, None])

    def step(self, model) -> None:
        """One decode step: the model reads ``tokens`` against the cache, then ``choose`` picks the next ones."""
        logits = model(input_ids=self.tokens, cache=self.cache, attention_mask=self.attention_mask,
                       position_ids=self.positions, use_cache=True, logits_to_keep=1).logits
        self.positions += 1
        self.choose(logits[:, -1].float())

    def capture(self, model) -> None:
        """Run one real step on a side stream (it compiles the Triton kernels and sets up cuBLAS, which a capture
        cannot do), then capture the next step as a graph. The warm-up step is the decode's next step, not a
        throwaway. A step that cannot be captured (it waits for the host somewhere) is logged and runs uncaptured."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.step(model)
        torch.cuda.current_stream().wait_stream(side)
        started = time.perf_counter()
        graph = torch.cuda.CUDAGraph()
        generator = torch.cuda.default_generators[self.tokens.device.index]
        generator_before = generator.clone_state()
        try:
            with torch.cuda.graph(graph):
                self.step(model)
        except RuntimeError as error:
            # A capture that fails midway leaves the device's default generator in capture mode, and every later
            # random op on the device would raise "Offset increment outside graph capture": give it back its state
            # from before the capture.
            generator.graphsafe_set_state(generator_before)
            self.capture_failed = True
            logger.info("%s's decode step could not be captured as a CUDA graph, so it runs uncaptured: %s",
                        type(model).__name__, error)
            return
        self.graph = graph
        logger.info("captured %s's decode step as a CUDA graph in %.2f s (batch %d, cache length %d); later calls "
                    "with the same batch size, length bucket and settings replay it", type(model).__name__,
                    time.perf_counter() - started, self.tokens.shape[0], self.cache_length)

    def output(self) -> torch.LongTensor:
        """Prompt + new tokens, cut where the last row finished."""
        new_tokens = int(torch.minimum(self.count, self.length))
        return self.ids[:, : int(self.prompt_length) + new_tokens].clone()


def _check_position_table(config, positions: torch.Tensor, steps: int) -> None:
    """A model with learned absolute positions checks them on the host in every forward, which a replayed step
    skips: so check the last position the steps will read before any runs (one host read)."""
    if getattr(config, "absolute_position_embeddings", False) and steps > 0:
        check_position_range(int(positions.min()), int(positions.max()) + steps - 1, config.max_position_embeddings)


# model -> its _Decoder. Weak, and the decoder holds no reference to the model, so a deleted model frees its graph.
_DECODERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def decode(model, input_ids, logits_processor, stopping_criteria, generation_config, model_kwargs
           ) -> torch.LongTensor:
    """Greedy search or sampling as transformers' ``_sample`` does it, on the decoder (see the module docstring);
    the caller has checked :func:`eager_decoding_reason`."""
    batch_size, prompt_len = input_ids.shape
    device = input_ids.device
    max_length = min(c.max_length for c in stopping_criteria if type(c) is MaxLengthCriteria)
    max_new_tokens = max_length - prompt_len
    if max_new_tokens < 1:
        raise ValueError(f"nothing to generate: max_length {max_length} <= prompt length {prompt_len}")
    vocab_size = model.get_output_embeddings().weight.shape[0]
    eos = _stop_ids(stopping_criteria, vocab_size, device)
    pad = generation_config._pad_token_tensor
    if eos is not None:
        if pad is None:
            raise ValueError("an eos_token_id needs a pad_token_id to fill the rows that have finished")
        pad = pad.to(device)
    attention_mask = model_kwargs.get("attention_mask")
    # Tokens the prefill puts in the cache: the prompt ids, or the embeddings given instead (then input_ids holds
    # no prompt and the output only the new tokens, as transformers returns them).
    inputs_embeds = model_kwargs.get("inputs_embeds")
    prefill_len = inputs_embeds.shape[1] if inputs_embeds is not None else prompt_len
    cache_length = math.ceil((prefill_len + max_new_tokens) / CACHE_LENGTH_GRANULE) * CACHE_LENGTH_GRANULE
    key = (
        batch_size, cache_length, str(device), generation_config.do_sample, attention_mask is not None,
        tuple(_processor_settings(p) for p in _graph_safe(logits_processor)), _model_key(model),
    )
    decoder = _DECODERS.get(model)
    if decoder is None or decoder.key != key:
        _DECODERS.pop(model, None)  # one decoder a model: free the old graph and cache before making new ones
        decoder = _DECODERS[model] = _Decoder(model, key, batch_size, cache_length, vocab_size, device,
                                              logits_processor, generation_config.do_sample, attention_mask is not None)
    min_new_tokens = _min_new_tokens_per_id(logits_processor, prompt_len, vocab_size, device)
    decoder.start(input_ids, attention_mask, logits_processor, max_new_tokens, min_new_tokens, eos, pad)

    model_kwargs = {**model_kwargs, "cache": decoder.cache}
    # transformers compiles a chunked prefill's forward when the cache is static; the decoder's cache standing in
    # for a dynamic one must not turn that on.
    prefill_config = copy.copy(generation_config)
    prefill_config.disable_compile = True
    prefill_logits = model._prefill(input_ids, prefill_config, model_kwargs).logits[:, -1].float()
    position_ids = model_kwargs.get("position_ids")
    if position_ids is not None:
        decoder.positions.copy_((position_ids[..., -1:] + 1).expand(batch_size, 1))
    else:
        decoder.positions.fill_(prefill_len)
    steps = max_new_tokens - 1
    _check_position_table(model.config, decoder.positions, steps)
    decoder.choose(prefill_logits)
    # A step after every row has finished costs nothing but time, except when sampling: its draw would move the
    # random generator past where transformers' loop leaves it, so a sampling decode that can stop early checks
    # after every step.
    check_every = 1 if generation_config.do_sample and eos is not None else FINISHED_CHECK_INTERVAL
    if device.type != "cuda":
        logger.info("%s decodes without CUDA graphs: the model is on %s", type(model).__name__, device.type)
        return _run(decoder, lambda: decoder.step(model), steps, check_every)
    with torch.cuda.device(device):  # streams and graphs belong to the model's GPU, not the current one
        if decoder.graph is None and not decoder.capture_failed and steps > 0:
            decoder.capture(model)  # its warm-up is the first step
            steps -= 1
        run_step = decoder.graph.replay if decoder.graph is not None else (lambda: decoder.step(model))
        return _run(decoder, run_step, steps, check_every)


def _run(decoder: _Decoder, run_step, steps: int, check_every: int) -> torch.LongTensor:
    """Run up to ``steps`` steps, stopping early once every row has finished (read before every ``check_every``-th
    step); prompt + new tokens."""
    for index in range(steps):
        if index % check_every == 0 and not decoder.unfinished.any():
            break
        run_step()
    return decoder.output()


class GraphDecodingGenerationMixin(GenerationMixin):
    """transformers' GenerationMixin whose greedy search and sampling run on a captured decode step (see module)."""

    def _prepare_model_inputs(self, inputs=None, bos_token_id=None, model_kwargs=None):
        """transformers' preparation of generate's inputs, plus the attention mask checked against the prompt: as
        long as it without a cache passed in, at least as long with one (the mask then also covers the cached
        tokens). transformers would cut a longer mask to the prompt's length in the masks it builds for a static
        cache, and the SSM layers would read its last columns, silently."""
        inputs_tensor, input_name, model_kwargs = super()._prepare_model_inputs(inputs, bos_token_id, model_kwargs)
        mask = model_kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.ndim == 2 and inputs_tensor.ndim >= 2:
            cached = any(model_kwargs.get(name) is not None for name in GENERATE_CACHE_KWARGS)
            check_mask_length(mask, inputs_tensor.shape[1], None if cached else 0)
        return inputs_tensor, input_name, model_kwargs

    def _validate_generation_mode(self, generation_mode, generation_config, generation_mode_kwargs):
        super()._validate_generation_mode(generation_mode, generation_config, generation_mode_kwargs)
        assistant_model = generation_mode_kwargs.get("assistant_model")
        if "assistant_tokenizer" in generation_mode_kwargs and getattr(assistant_model, "_is_stateful", False):
            # transformers re-aligns the two tokenizations each round by rolling the draft's cache back past tokens it
            # had already confirmed; a recurrent state only keeps the states since the last roll back, so transformers'
            # cache fails with an IndexError (its own Mamba drafts too).
            raise ValueError(
                f"assisted decoding with a different tokenizer needs a draft whose cache can roll back any number of "
                f"tokens, such as an attention model; {type(assistant_model).__name__} keeps a recurrent state. Use a "
                "draft with this model's tokenizer, or an attention draft"
            )

    def _sample(self, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus=False,
                streamer=None, **model_kwargs):
        model_kwargs = _without_generate_only_kwargs(model_kwargs)
        reason = eager_decoding_reason(self, logits_processor, stopping_criteria, generation_config, synced_gpus,
                                       streamer, model_kwargs)
        if reason is not None:
            logger.info("%s.generate runs transformers' decoding loop: %s", type(self).__name__, reason)
            return super()._sample(input_ids, logits_processor, stopping_criteria, generation_config,
                                   synced_gpus=synced_gpus, streamer=streamer, **model_kwargs)
        return decode(self, input_ids, logits_processor, stopping_criteria, generation_config, model_kwargs)

    def _beam_search(self, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus=False,
                     **model_kwargs):
        return super()._beam_search(input_ids, logits_processor, stopping_criteria, generation_config,
                                    synced_gpus=synced_gpus, **_without_generate_only_kwargs(model_kwargs))
