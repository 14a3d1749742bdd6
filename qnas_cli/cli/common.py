"""What every command shares: consoles, JSON output, exit codes, progress that is quiet off a terminal."""
from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

from rich.console import Console

console = Console()
err_console = Console(stderr=True)

EXIT_GATE_FAILED = 3  # export ran, but the model failed verification: a CI job must not ship it
EXIT_TRAINING_COLLAPSED = 4  # training collapsed and did not recover: no supernet was written
EXIT_CODES = ("Exit codes: 0 success; 1 internal failure (a bug: run with --debug); 2 bad input (one line on stderr, "
              "nothing written); 3 the exported model failed verification (qnas export); 4 training collapsed and did not recover (qnas train); 130 interrupted.")


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")


def interactive() -> bool:
    """Progress bars only on a terminal; CI logs get plain lines."""
    return console.is_terminal


def say(con: Console, message: str) -> None:
    """One message as plain text: paths keep their brackets (no markup), and nothing is cut or
    wrapped (off a terminal Rich assumes 80 columns), so an architecture key can be copied whole."""
    con.print(message, markup=False, highlight=False, soft_wrap=True)


def logger(con: Console) -> Callable[..., None]:
    """A ``log`` for the library's functions: plain messages on ``con``."""
    return lambda message, **_: say(con, str(message))
