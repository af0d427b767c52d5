"""Which layers of a hybrid stack are of a given kind, in each form a layout is written, read and checked here only.

- A period form, ``layer % period == offset``: SsmHubHybridConfig's ``attn_layer_period`` / ``attn_layer_offset``
  and ``expert_layer_*`` (Jamba's fields, which its config writes too) and the ``every:K[:OFFSET]`` selection.
- An index list: Bamba's ``attn_layer_indices``, and selections such as ``3,7,11``.
- The per-layer lists the config stores (``mixer_types``, ``ffn_types``), which the two forms become.

    periodic_layers(8, 4, 3, "attn_layer_period", "attn_layer_offset")   # [3, 7]
    period_form([False, True, False, True])                               # (2, 1)
    parse_layer_selection("every:4:3", 12)                                # [3, 7, 11]
"""

from collections.abc import Sequence

SELECTION_FORMS = "all, none, every:K[:OFFSET], auto:N or a list of layer indices such as 3,7,11"


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def periodic_layers(num_layers: int, period, offset, period_name: str = "period", offset_name: str = "offset",
                    context: str = "") -> list[int]:
    """The layers ``i < num_layers`` with ``i % period == offset``. ValueError, naming the fields as the caller
    calls them (after ``context``), unless ``period`` is a positive integer and ``offset`` an integer in
    [0, period)."""
    if not _is_int(period) or period < 1:
        raise ValueError(f"{context}{period_name} must be a positive integer, got {period!r}")
    if not _is_int(offset) or not 0 <= offset < period:
        raise ValueError(f"{context}{offset_name} must be an integer in [0, {period_name} = {period}), "
                         f"got {offset!r}")
    return list(range(offset, num_layers, period))


def period_form(flags: Sequence[bool]) -> tuple[int, int] | None:
    """The smallest (period, offset) whose :func:`periodic_layers` are exactly the flagged layers, or None if no
    period does. No flagged layer gives a period longer than the stack: (len(flags) + 1, len(flags))."""
    layers = len(flags)
    flagged = [i for i, flag in enumerate(flags) if flag]
    if not flagged:
        return layers + 1, layers
    for period in range(1, layers + 1):
        offset = flagged[0] % period
        if periodic_layers(layers, period, offset) == flagged:
            return period, offset
    return None


def index_layers(indices, num_layers: int, what: str) -> list[int]:
    """``indices`` sorted, after checking they are distinct integers in [0, num_layers); ValueError naming ``what``."""
    indices = list(indices)
    wrong = [i for i in indices if not _is_int(i) or not 0 <= i < num_layers]
    if wrong or len(set(indices)) != len(indices):
        raise ValueError(f"{what}: indices must be distinct integers in [0, {num_layers}), got "
                         f"{', '.join(map(str, indices))}")
    return sorted(indices)


def parse_layer_selection(spec: str, num_layers: int,
                          option: str = "--attention-layers") -> list[int] | tuple[str, int]:
    """The layers a selection ``spec`` names (sorted indices), or ``("auto", N)`` for ``auto:N`` (N of them, chosen
    by the caller): ``all``, ``none``, ``every:K[:OFFSET]`` (:func:`periodic_layers`), ``auto:N`` or ``3,7,11``.
    Errors name ``option`` and the spec."""
    text = str(spec).strip()
    where = f"{option} {spec!r}"

    def integer(part: str, form: str) -> int:
        try:
            return int(part)
        except ValueError:
            raise ValueError(f"{where}: expected {SELECTION_FORMS}; {part!r} in {form} is not an integer") from None

    if text == "all":
        return list(range(num_layers))
    if text == "none":
        return []
    if text.startswith("auto:"):
        count = integer(text[5:], "auto:N")
        if not 0 <= count <= num_layers:
            raise ValueError(f"{where}: N must be in [0, {num_layers}] (the model's layers)")
        return list(range(count)) if count in (0, num_layers) else ("auto", count)
    if text.startswith("every:"):
        parts = text[6:].split(":")
        if len(parts) > 2:
            raise ValueError(f"{where}: write every:K or every:K:OFFSET")
        period = integer(parts[0], "every:K")
        offset = integer(parts[1], "every:K:OFFSET") if len(parts) == 2 else 0
        return periodic_layers(num_layers, period, offset, "K", "OFFSET", context=f"{where}: ")
    return index_layers([integer(part, "a list of layer indices") for part in text.split(",")], num_layers, where)
