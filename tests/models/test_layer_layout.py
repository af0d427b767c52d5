"""The one reader of hybrid layer layouts (ssm_hub.models.hybrid.layer_layout): period forms, index lists and the
--attention-layers selections, and the errors that name the caller's own fields.

    pytest tests/models/test_layer_layout.py
"""

import pytest

from ssm_hub.models.hybrid.layer_layout import index_layers, parse_layer_selection, period_form, periodic_layers


def test_periodic_layers_and_period_form_are_inverse():
    assert periodic_layers(8, 4, 3) == [3, 7]
    assert periodic_layers(3, 8, 4) == []  # Jamba's default (1 in 8, at 4) on a stack shorter than the period
    for flags in ([False, True] * 3, [True, False, False] * 2, [False] * 5 + [True], [True] * 4):
        period, offset = period_form(flags)
        assert periodic_layers(len(flags), period, offset) == [i for i, flag in enumerate(flags) if flag]
    assert period_form([False] * 4) == (5, 4)  # none flagged: a period longer than the stack
    assert period_form([True, True, False, True]) is None


@pytest.mark.parametrize("period, offset, message", [
    (0, 0, "cfg.every must be a positive integer, got 0"), (True, 0, "cfg.every must be a positive integer"),
    (4, 4, r"cfg.at must be an integer in \[0, every = 4\), got 4"), (4, -1, r"cfg.at must be an integer"),
])
def test_bad_periods_are_named_as_the_caller_names_them(period, offset, message):
    with pytest.raises(ValueError, match=message):
        periodic_layers(8, period, offset, "every", "at", context="cfg.")


def test_index_layers_sorts_and_checks():
    assert index_layers([3, 1], 4, "attn_layer_indices") == [1, 3]
    for wrong in ([1, 1], [4], [-1], [1.0]):
        with pytest.raises(ValueError, match=r"attn_layer_indices: indices must be distinct integers in \[0, 4\)"):
            index_layers(wrong, 4, "attn_layer_indices")


@pytest.mark.parametrize("spec, kept", [
    ("all", [0, 1, 2, 3, 4, 5]), ("none", []), ("every:3", [0, 3]), ("every:2:1", [1, 3, 5]), ("5, 1", [1, 5]),
    ("auto:2", ("auto", 2)), ("auto:0", []), ("auto:6", [0, 1, 2, 3, 4, 5]),  # nothing to rank: no probe
])
def test_selections(spec, kept):
    assert parse_layer_selection(spec, 6) == kept


@pytest.mark.parametrize("spec, message", [
    ("every:0", "'every:0': K must be a positive integer"), ("every:3:3", r"OFFSET must be an integer in \[0, K = 3\)"),
    ("1,1", "distinct"), ("6", r"in \[0, 6\)"), ("auto:7", r"N must be in \[0, 6\]"),
    ("half", "'half' in a list of layer indices"), ("every:2:1:0", "every:K or every:K:OFFSET"),
])
def test_bad_selections_are_named(spec, message):
    with pytest.raises(ValueError, match=f"--attention-layers .*{message}"):
        parse_layer_selection(spec, 6)
