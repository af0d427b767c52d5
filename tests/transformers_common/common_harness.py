"""Run transformers' ModelTesterMixin on an ssm_hub model type and on its native control, and compare.

:func:`control_and_ours` builds two unittest classes that share the mixins, the flags and a tiny config (the same
sizes on both sides). Every test of the control records its outcome (a failure there shows as xfail); a test of ours

* is skipped when ``exceptions.txt`` lists it as a design difference (the reason is the skip message);
* is expected to fail (strictly) when ``known_failures.txt`` lists it: a real difference still to fix;
* otherwise must pass when the control's passed: a failure, or a skip where the control passed, fails. Where the
  control failed or skipped too, ours may fail or skip, with a message that says so.

Every test carries the ``transformers_common`` marker; those of ``FULL_RUN_ONLY`` carry it with
``full_run_only=True``, and tests/conftest.py deselects them unless the run selects ``-m transformers_common``.
"""

import contextlib
import fnmatch
import functools
import unittest
from pathlib import Path
from unittest import mock

import pytest
import torch
from transformers.models.auto import modeling_auto

HERE = Path(__file__).parent

# The slowest families (seconds a test on 2 cores, dozens of parametrisations) run only under
# ``pytest -m transformers_common``; every CI run keeps one eager-vs-sdpa case and everything else.
FULL_RUN_ONLY = (
    "test_model_rope_scaling_from_config_*",
    "test_eager_matches_sdpa_inference_*",
    "test_training_overfit",
)
KEPT_IN_CI = ("test_eager_matches_sdpa_inference_08_fp32_pad_left_sdpa_kernels",)


def full_run_only(test_name: str) -> bool:
    return test_name not in KEPT_IN_CI and any(fnmatch.fnmatchcase(test_name, pattern) for pattern in FULL_RUN_ONLY)


# Flags every type's control and ours share. transformers runs test_can_init_all_missing_weights only for models whose
# source says "Copyright 2023" or later; ours carries no such line, so the test is asked for on both sides.
COMMON_FLAGS = dict(test_can_init_all_missing_weights_before_2023=True)

# The mixin recognises heads by class name in transformers' static auto mappings (to add labels, to skip training a
# base model); ssm_hub registers its classes through AutoModel*.register, which those name lists do not see. Within
# one of our tests the names are added under a key no config maps to, so no auto class tries to import them.
HEAD_NAME_MAPPINGS = {
    "base": modeling_auto.MODEL_MAPPING_NAMES,
    "causal_lm": modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    "sequence_classification": modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    "image_text_to_text": modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
}
UNMAPPED_KEY = "ssm_hub_transformers_common_tests"


def _read_test_list(file_name: str) -> dict[tuple[str, str], str]:
    """``<type> <test name>: <reason>`` lines -> {(type, test name): reason}. ``*`` as the type means every type;
    a test name may be a glob (``test_x_*``) for the parametrised variants of one test."""
    entries = {}
    for line in (HERE / file_name).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, reason = line.split(":", 1)
            model_type, test_name = key.split()
            entries[model_type, test_name] = reason.strip()
    return entries


DESIGN_DIFFERENCES = _read_test_list("exceptions.txt")
KNOWN_FAILURES = _read_test_list("known_failures.txt")


def _listed(entries: dict, model_type: str, test_name: str) -> str | None:
    for (listed_type, pattern), reason in entries.items():
        if listed_type in ("*", model_type) and fnmatch.fnmatchcase(test_name, pattern):
            return reason
    return None


class TinyCausalLMTester:
    """What ModelTesterMixin asks of a model tester: a tiny config and inputs for it."""

    batch_size = 2
    seq_length = 7
    is_training = True

    def __init__(self, parent, config_class, config_fields: dict, model_classes: tuple):
        self.parent = parent
        # The training mixin trains this head (its first model class otherwise, a base model without a loss).
        self.causal_lm_class = next(
            cls for cls in model_classes if cls.__name__.endswith(("ForCausalLM", "ForConditionalGeneration"))
        )
        self.config_class = config_class
        self.config_fields = config_fields
        # A composite config (an image-text model's) keeps the language model's sizes in its text config.
        config = self.get_config().get_text_config()
        self.vocab_size = config.vocab_size
        self.hidden_size = config.hidden_size
        self.num_hidden_layers = config.num_hidden_layers
        self.num_attention_heads = getattr(config, "num_attention_heads", None)

    def get_config(self):
        return self.config_class(**self.config_fields)

    def text_ids(self, shape: tuple[int, ...], high: int | None = None) -> torch.LongTensor:
        # Token 0 is the pad token: sequence classification finds each row's last token through it.
        return torch.randint(1, high or self.vocab_size, shape)

    def prepare_config_and_inputs_for_common(self):
        config = self.get_config()
        input_ids = self.text_ids((self.batch_size, self.seq_length))
        attention_mask = torch.ones_like(input_ids)
        return config, {"input_ids": input_ids, "attention_mask": attention_mask}


class TinyImageTextTester(TinyCausalLMTester):
    """Inputs of an image-text model: every row holds one image, laid out as a processor would: ``text_before`` text
    tokens, the image's ``image_grid`` (rows x cols) of placeholders (``config.image_token_id``), each row of them
    closed by ``row_end_token_id``, then ``text_after`` text tokens (the resize test writes a new id at position -2).
    Text ids stay below both special ids, so no text token reads as an image token; the special ids must stay below
    vocab_size - 15, the vocabulary the resize test shrinks to (it clamps the ids into it).

    One image a row keeps every image tensor ``batch_size`` long, so the tests that cut the inputs along dim 0
    (batching equivalence, eager vs sdpa) cut the images with their rows. The eager-vs-sdpa tests run at batch 7 and
    fill shorter inputs with random rows that hold no placeholders: at 7 rows the images go in there too.
    A subclass says how its model takes the images (:meth:`image_inputs`), drawn the same way for every model.
    """

    batch_size = 7
    image_grid = (2, 2)
    text_before = 1
    text_after = 2
    row_end_token_id: int

    def __init__(self, parent, config_class, config_fields: dict, model_classes: tuple):
        super().__init__(parent, config_class, config_fields, model_classes)
        config = self.get_config()
        self.image_token_id = config.image_token_id
        self.patch_size = config.patch_size
        self.num_channels = config.num_channels
        rows, cols = self.image_grid
        self.seq_length = self.text_before + rows * (cols + 1) + self.text_after

    def image_inputs(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images [batch_size, C, H, W], one a row -> the model's image arguments."""
        raise NotImplementedError

    def prepare_config_and_inputs_for_common(self):
        config, inputs = super().prepare_config_and_inputs_for_common()
        rows, cols = self.image_grid
        input_ids = self.text_ids(inputs["input_ids"].shape, high=min(self.image_token_id, self.row_end_token_id))
        image_row = torch.tensor(([self.image_token_id] * cols + [self.row_end_token_id]) * rows)
        input_ids[:, self.text_before:self.text_before + len(image_row)] = image_row
        images = torch.rand(self.batch_size, self.num_channels, rows * self.patch_size, cols * self.patch_size)
        return config, {**inputs, "input_ids": input_ids, **self.image_inputs(images)}


@contextlib.contextmanager
def _inline_sub_test(self, msg=None, **params):
    """unittest's subTest under pytest reports a failure beside the test and lets the test pass; inline, the failure
    ends the test, so the comparison with the control sees it."""
    yield


def _test_names(test_class) -> list[str]:
    return [name for name in dir(test_class) if name.startswith("test_") and callable(getattr(test_class, name))]


def _recording(test, outcomes: dict, name: str):
    @functools.wraps(test)
    def run(self):
        outcomes[name] = "failed"
        try:
            test(self)
        except unittest.SkipTest:
            outcomes[name] = "skipped"
            raise
        except Exception as error:
            # The control's failures are facts about transformers, not ours to fix: recorded, never failing CI.
            pytest.xfail(f"fails on the native control: {error!r:.200}")
        outcomes[name] = "passed"

    return run


def _compared(test, control_outcomes: dict, model_type: str, name: str, head_names: dict):
    design_difference = _listed(DESIGN_DIFFERENCES, model_type, name)
    known_failure = _listed(KNOWN_FAILURES, model_type, name)

    @functools.wraps(test)
    def run(self):
        if design_difference:
            self.skipTest(f"design difference: {design_difference}")
        control = control_outcomes.get(name, "not run")
        patches = [mock.patch.dict(HEAD_NAME_MAPPINGS[kind], {UNMAPPED_KEY: class_name}) for kind, class_name
                   in head_names.items()]
        try:
            for patch in patches:
                patch.start()
            test(self)
        except unittest.SkipTest as skip:
            if known_failure:
                pytest.xfail(f"known failure to fix: {known_failure}")
            if control == "passed":
                pytest.fail(f"skipped on ssm_hub ({skip}) but passes on the native control")
            raise
        except Exception as error:
            if known_failure:
                pytest.xfail(f"known failure to fix: {known_failure}")
            if control in ("failed", "skipped"):
                self.skipTest(f"fails on ssm_hub and {control} on the native control too: {error!r:.200}")
            raise
        finally:
            for patch in reversed(patches):
                patch.stop()
        if known_failure:
            pytest.fail(f"listed in known_failures.txt ({known_failure}) but passes: remove it from the list")

    return run


def _marked(name: str, test):
    return pytest.mark.transformers_common(full_run_only=full_run_only(name))(test)


def control_and_ours(common, model_type: str, control: dict, ours: dict, flags: dict):
    """Two TestCase classes running the same mixins with the same ``flags``: the native control first, then ours.

    ``control`` and ``ours`` hold ``config_class``, ``config_fields``, ``model_classes`` and optionally ``tester``
    (the model tester class, TinyCausalLMTester by default); ``ours`` also ``head_names`` ({kind in
    HEAD_NAME_MAPPINGS: class name}).
    """
    mixins = (common.ModelTesterMixin, common.TrainingTesterMixin, unittest.TestCase)
    control_outcomes = {}

    def set_up_for(side):
        def setUp(self):
            tester = side.get("tester", TinyCausalLMTester)
            self.model_tester = tester(self, side["config_class"], side["config_fields"], side["model_classes"])

        return setUp

    control_class = type("ControlTest", mixins, {
        **flags, "all_model_classes": control["model_classes"], "setUp": set_up_for(control),
        "subTest": _inline_sub_test,
    })
    for name in _test_names(control_class):
        setattr(control_class, name, _marked(name, _recording(getattr(control_class, name), control_outcomes, name)))

    ours_class = type("OursTest", mixins, {
        **flags, "all_model_classes": ours["model_classes"], "setUp": set_up_for(ours), "subTest": _inline_sub_test,
    })
    for name in _test_names(ours_class):
        compared = _compared(getattr(ours_class, name), control_outcomes, model_type, name, ours["head_names"])
        setattr(ours_class, name, _marked(name, compared))
    return control_class, ours_class
