"""Whether the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``, which the CPU test suite sets), read
here so that the kernels need nothing of ssm_hub's dispatch: some launchers pick smaller tiles there, and
``ssm_hub.backend`` lets an explicit ``backend="triton"`` take CPU tensors then. Needs no triton to import."""

import os


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
