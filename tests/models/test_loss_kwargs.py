"""The keyword arguments transformers' losses, Trainer and older callers pass to a causal LM, on every ssm_hub
model type: each is accepted and does what it does for transformers' own models (transformers.loss.loss_utils's
ForCausalLMLoss is the spec of the loss), and an unknown one is still refused by name."""

import pytest
import torch
from torch.nn import functional as F
from transformers import AutoModelForCausalLM
from transformers.loss.loss_utils import ForCausalLMLoss

from conftest import WITH_ATTENTION, tiny_config

VOCAB = 64


def _model_and_batch(model_type):
    model = AutoModelForCausalLM.from_config(tiny_config(model_type)).eval()
    input_ids = torch.randint(1, VOCAB, (2, 10))
    labels = input_ids.clone()
    labels[0, :3] = -100
    return model, input_ids, labels


def _shifted(labels: torch.Tensor) -> torch.Tensor:
    """labels as the loss shifts them: position i targets labels[i + 1], -100 after the last."""
    return F.pad(labels, (0, 1), value=-100)[:, 1:].contiguous()


def test_shift_labels_are_used_as_given_not_shifted_again(causal_lm_type):
    # Context parallelism shifts the labels before it splits the row, and passes them as shift_labels.
    model, input_ids, labels = _model_and_batch(causal_lm_type)
    shift_labels = torch.randint(0, VOCAB, labels.shape)
    shift_labels[1, -4:] = -100
    with torch.no_grad():
        out = model(input_ids, labels=labels, shift_labels=shift_labels)
        plain = model(input_ids, labels=labels)
        given_alone = model(input_ids, shift_labels=shift_labels)
    expected = ForCausalLMLoss(out.logits, labels, VOCAB, shift_labels=shift_labels)
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(given_alone.loss, expected)
    assert not torch.allclose(out.loss, plain.loss), "the test must tell shift_labels from labels"


def test_shift_labels_equal_to_the_shifted_labels_give_the_labels_loss(causal_lm_type):
    model, input_ids, labels = _model_and_batch(causal_lm_type)
    with torch.no_grad():
        plain = model(input_ids, labels=labels).loss
        shifted = model(input_ids, labels=labels, shift_labels=_shifted(labels)).loss
    torch.testing.assert_close(shifted, plain)


def test_num_items_in_batch_divides_the_summed_loss(causal_lm_type):
    model, input_ids, labels = _model_and_batch(causal_lm_type)
    num_items = torch.tensor(37)
    with torch.no_grad():
        out = model(input_ids, labels=labels, num_items_in_batch=num_items)
        with_shift_labels = model(input_ids, labels=labels, shift_labels=_shifted(labels), num_items_in_batch=num_items)
    summed = F.cross_entropy(out.logits.reshape(-1, VOCAB), _shifted(labels).reshape(-1), reduction="sum")
    torch.testing.assert_close(out.loss, summed / 37)
    torch.testing.assert_close(out.loss, ForCausalLMLoss(out.logits, labels, VOCAB, num_items_in_batch=num_items))
    torch.testing.assert_close(with_shift_labels.loss, out.loss)


def test_unknown_keyword_arguments_are_refused_by_name(causal_lm_type):
    model, input_ids, labels = _model_and_batch(causal_lm_type)
    with pytest.raises(TypeError, match="unexpected keyword arguments.*not_a_loss_argument"):
        model(input_ids, labels=labels, shift_labels=_shifted(labels), not_a_loss_argument=1)


def test_output_options_and_logits_to_keep(causal_lm_type):
    model, input_ids, labels = _model_and_batch(causal_lm_type)
    with torch.no_grad():
        full = model(input_ids, labels=labels)
        kept = model(input_ids, logits_to_keep=3)
        hidden = model(input_ids, output_hidden_states=True)
        as_tuple = model(input_ids, labels=labels, return_dict=False)
    torch.testing.assert_close(kept.logits, full.logits[:, -3:])
    assert len(hidden.hidden_states) == model.config.num_hidden_layers + 1
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], full.loss)


def test_cache_position_gives_the_positions_of_the_current_tokens(causal_lm_type):
    # transformers' older convention: cache_position says where the current tokens sit in the whole sequence. RoPE
    # only sees relative positions, so the attention models take learned absolute ones here.
    absolute = dict(use_rope=False, absolute_position_embeddings=True, max_position_embeddings=32)
    config = tiny_config(causal_lm_type, **(absolute if causal_lm_type in WITH_ATTENTION else {}))
    model = AutoModelForCausalLM.from_config(config).eval()
    input_ids = torch.randint(1, VOCAB, (2, 10))
    positions = torch.arange(4, 14)
    with torch.no_grad():
        got = model(input_ids, use_cache=False, cache_position=positions).logits
        expected = model(input_ids, use_cache=False, position_ids=positions[None].expand(2, -1)).logits
        from_zero = model(input_ids, use_cache=False).logits
    torch.testing.assert_close(got, expected)
    if causal_lm_type in WITH_ATTENTION:
        assert not torch.allclose(got, from_zero, atol=1e-4), "the test must see the positions"
    else:
        torch.testing.assert_close(got, from_zero)  # SSM layers use no positions


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_default_loss_is_the_cross_entropy_op_with_transformers_values_and_gradients(causal_lm_type, backend,
                                                                                    monkeypatch):
    # The default loss (ForCausalLMLoss) runs as ssm_hub.ops.cross_entropy, which on the kernels never copies the
    # logits to float32; loss and gradients are transformers' own.
    import ssm_hub.kernels.cross_entropy as kernels

    launches = []
    launcher = kernels.cross_entropy_fwd
    monkeypatch.setattr(kernels, "cross_entropy_fwd", lambda *args: launches.append(args) or launcher(*args))
    monkeypatch.setenv("SSM_HUB_BACKEND", backend)
    model, input_ids, labels = _model_and_batch(causal_lm_type)
    out = model(input_ids, labels=labels)
    (got,) = torch.autograd.grad(out.loss, out.logits, retain_graph=True)
    expected = ForCausalLMLoss(out.logits, labels, VOCAB)
    (want,) = torch.autograd.grad(expected, out.logits)
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(got, want)
    assert len(launches) == (1 if backend == "triton" else 0)


def test_a_loss_function_set_on_the_model_is_called_as_it_is(causal_lm_type):
    model, input_ids, labels = _model_and_batch(causal_lm_type)
    seen = {}

    def custom_loss(logits, labels, vocab_size, **kwargs):
        seen.update(vocab_size=vocab_size, kwargs=kwargs)
        return logits.float().mean()

    model.loss_function = custom_loss
    with torch.no_grad():
        out = model(input_ids, labels=labels, num_items_in_batch=torch.tensor(5))
    torch.testing.assert_close(out.loss, out.logits.float().mean())
    assert seen["vocab_size"] == VOCAB and set(seen["kwargs"]) == {"num_items_in_batch"}
