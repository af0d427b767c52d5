"""Launching ``ssm-hub train`` and ``ssm-hub distill`` on several GPUs through accelerate (no launcher of our own).

    ssm-hub train --config my_recipe.yaml --accelerate-config fsdp2 --num-processes 2
    ssm-hub distill --teacher T --student S --data FILE --output DIR --accelerate-config ddp --num-processes 2

``--accelerate-config`` names an accelerate config shipped in ssm_hub.recipes/accelerate (``ddp``, ``fsdp2``,
``zero3``) or is a path to one's own; the run becomes ``python -m accelerate.commands.launch --config_file CONFIG
[--num_processes N] -m ssm_hub.cli SUBCOMMAND ARGUMENTS`` (the same arguments, less the two launch flags), and
each process runs through Trainer, which reads the distributed setup from accelerate.
"""

import os
import subprocess
import sys
from pathlib import Path

from ssm_hub.training.config import shipped_file


def accelerate_config_path(name: str | Path) -> Path:
    """``name`` if it is a file, else the shipped accelerate config of that name."""
    return shipped_file(name, "accelerate config", subfolder="accelerate")


def accelerate_command(accelerate_config: str | Path, cli_arguments: list[str],
                       num_processes: int | None = None) -> list[str]:
    """The command line that runs ``ssm-hub CLI_ARGUMENTS`` (a subcommand and its arguments) in every process that
    accelerate launches with ``accelerate_config``."""
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"--num-processes must be at least 1, got {num_processes}")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(accelerate_config_path(accelerate_config))]
    if num_processes is not None:
        command += ["--num_processes", str(num_processes)]
    return command + ["-m", "ssm_hub.cli", *cli_arguments]


def launch(accelerate_config: str | Path, cli_arguments: list[str], num_processes: int | None = None) -> int:
    """Run the accelerate command; returns its exit status. PYTHONSAFEPATH keeps ``python -m`` from putting the
    working directory first on sys.path: in a source checkout, its ``ssm_hub/`` folder would shadow the installed
    package (which alone holds ``ssm_hub.kernels``)."""
    environment = {**os.environ, "PYTHONSAFEPATH": "1"}
    command = accelerate_command(accelerate_config, cli_arguments, num_processes)
    return subprocess.run(command, env=environment).returncode


def end_process_group() -> None:
    """At the end of a run under a distributed launcher: wait for every process, then close the process group, so
    that no process exits while another still holds a connection to it (gloo aborts a process whose peer went away,
    which made two-process runs fail now and then). Nothing to do in a single process."""
    import torch.distributed as distributed

    if distributed.is_available() and distributed.is_initialized():
        distributed.barrier()
        distributed.destroy_process_group()
