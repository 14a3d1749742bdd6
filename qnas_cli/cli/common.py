"""What every command shares: consoles, JSON output, progress that is quiet off a terminal."""
from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console

console = Console()
err_console = Console(stderr=True)


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")


def interactive() -> bool:
    """Progress bars only on a terminal; CI logs get plain lines."""
    return console.is_terminal
