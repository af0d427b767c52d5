"""How ``ssm-hub`` reports a failure: one line on stderr that names the thing and the fix, exit status 2; Ctrl-C: where
to pick up again, exit status 130; ``--debug``: the traceback as well. ``ssm-hub --version`` is declared here too.

    parser = ArgumentParser(prog="ssm-hub")        # a usage error is one line and exit status 2, as any error
    add_reporting_flags(parser, top_level=True)    # --debug and --version (subcommands: --debug only)
    try:
        ...
    except KeyboardInterrupt:
        return report_interrupt("resume with: ...")
    except Exception as error:
        return report_error(error, debug=args.debug)

Library code raises ValueError naming the field, the constraint and the value (DESIGN.md); this module only turns
what reaches the command line into one line, and the errors that do not name their cause into ones that do: a
network failure names the endpoint and HF_ENDPOINT / HF_TOKEN, a Hub refusal its status, a file error its path.
"""

import argparse
import sys
import traceback
from pathlib import Path

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a process that Ctrl-C ended
DEBUG_HINT = "--debug shows the traceback"


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, whose usage errors (a missing argument, a value of the wrong type) are one line."""

    def error(self, message: str):
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def version_text() -> str:
    from importlib.metadata import PackageNotFoundError, version

    from ssm_hub import __version__

    found = []
    for name in ("transformers", "torch", "huggingface_hub"):
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            pass
    return f"ssm-hub {__version__} ({', '.join(found)})"


def add_reporting_flags(parser: argparse.ArgumentParser, top_level: bool = False) -> None:
    """--debug (on the command and on each subcommand, so that it may come anywhere) and, at the top, --version."""
    # A subcommand's default must not hide `ssm-hub --debug COMMAND`: argparse lets a subparser's defaults win.
    parser.add_argument("--debug", action="store_true", default=False if top_level else argparse.SUPPRESS,
                        help="on an error, print the traceback too")
    if top_level:
        parser.add_argument("--version", action="version", version=version_text())


def _one_line(text: str) -> str:
    """``text`` on one line: a line ending in ':' runs on into the next, other lines are joined with '; '."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    joined = ""
    for line in lines:
        joined += line if not joined else (" " if joined.endswith(":") else "; ") + line
    return joined


def _hub_endpoint() -> str:
    try:
        from huggingface_hub import constants
    except ImportError:
        return "the Hub"
    return constants.ENDPOINT


def _network_error_classes() -> tuple[type, ...]:
    """The HTTP clients' connection errors, for the clients already imported (huggingface_hub uses httpx2 or httpx)."""
    classes = [ConnectionError]  # huggingface_hub's OfflineModeIsEnabled among them
    for name in ("httpx2", "httpx"):
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "TransportError"):
            classes.append(module.TransportError)
    requests = sys.modules.get("requests")
    if requests is not None:
        classes.append(requests.ConnectionError)
    return tuple(classes)


def _not_a_local_folder(error: BaseException) -> str:
    """Where the failed request was for a repository (its id in the URL's path), that no local folder of that name
    exists either: a mistyped or not yet written folder (``model.pretrained: runs/mine``) has the form of a Hub id,
    and only reaches the Hub because it is missing."""
    try:
        parts = [part for part in error.request.url.path.split("/") if part]
    except (AttributeError, RuntimeError):  # no request: httpx raises RuntimeError when none was set
        return ""
    if parts[:1] == ["api"]:
        parts = parts[2:]  # /api/models/NAMESPACE/NAME/...
    if len(parts) < 2:
        return ""
    repo_id = "/".join(parts[:2])
    return "" if Path(repo_id).exists() else f"; and {repo_id!r} is not a folder here ({Path.cwd()}) either"


def _chain(error: BaseException):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def describe(error: BaseException) -> tuple[str, bool]:
    """(the one-line message for ``error``, whether it names its cause; False for an unexpected error)."""
    network = _network_error_classes()
    for link in _chain(error):
        if isinstance(link, network):
            detail = _one_line(link) or "no answer"
            return (f"cannot reach {_hub_endpoint()} ({type(link).__name__}: {detail}): check the network, or set "
                    "HF_ENDPOINT (the Hub's address) / HF_TOKEN (an access token); HF_HUB_OFFLINE=1 uses the local "
                    "cache only" + _not_a_local_folder(link)), True
    hub_errors = sys.modules.get("huggingface_hub.errors")
    if hub_errors is not None and isinstance(error, hub_errors.HfHubHTTPError):
        answer = _one_line(error) or type(error).__name__
        return (f"{_hub_endpoint()} refused the request: {answer.rstrip('.')}: check the repo id, and set HF_TOKEN to "
                "a token with access (HF_ENDPOINT if this is not the Hub you meant)"), True
    if isinstance(error, UnicodeDecodeError):
        return (f"cannot read text as {error.encoding}: byte 0x{error.object[error.start]:02x} at position "
                f"{error.start}: save the file as UTF-8"), True
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror}: check the path and its permissions", True
    if isinstance(error, (ValueError, OSError)) and str(error).strip():
        return _one_line(error), True
    return f"{type(error).__name__}: {_one_line(error)}".rstrip(": "), False


def report_error(error: BaseException, debug: bool = False, stream=None) -> int:
    """Print ``error`` as one line (after its traceback with ``debug``); returns the exit status, 2."""
    stream = stream or sys.stderr
    if debug:
        traceback.print_exception(error, file=stream)
    message, named = describe(error)
    if not named and not debug:
        message += f" (an unexpected error: {DEBUG_HINT}; please report it)"
    print(f"ssm-hub: error: {message}", file=stream)
    return EXIT_ERROR


def report_interrupt(hint: str | None = None, stream=None) -> int:
    """Print that Ctrl-C stopped the command, and ``hint`` (where to pick up); returns the exit status, 130."""
    print(f"ssm-hub: interrupted{': ' + hint if hint else ''}", file=stream or sys.stderr)
    return EXIT_INTERRUPTED
