"""The ``qnas`` command line: one Typer app, one module per command.

Exit codes: 0 success, 2 user error (one line on stderr; ``--debug`` shows the traceback),
1 internal failure, 3 export failed verification, 130 interrupted (a checkpoint was saved).
"""
from __future__ import annotations

from typing import Annotated

import typer
import typer.core
from rich.markup import escape

from ..errors import UserError
from .common import EXIT_CODES, err_console
from . import calibrate as calibrate_cmd
from . import export as export_cmd
from . import finetune as finetune_cmd
from . import latency as latency_cmd
from . import search as search_cmd
from . import space as space_cmd
from . import train as train_cmd


class _Group(typer.core.TyperGroup):
    """Turns library exceptions into exit codes and one-line messages."""

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except UserError as e:
            if ctx.params.get("debug"):
                raise
            err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise typer.Exit(130) from None
        except Exception as e:  # noqa: BLE001 - last line of defence: no traceback without --debug
            if hasattr(e, "exit_code") or isinstance(e, typer.Abort) or ctx.params.get("debug"):
                raise  # Typer's own exits and usage errors
            err_console.print(f"[bold red]internal error:[/] {type(e).__name__}: {escape(str(e))}\n(run with --debug for the traceback)",
                              highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None


app = typer.Typer(
    cls=_Group,
    help="Quantization-aware NAS: train one fully int8 supernet, search it, ship fully int8 TFLite.",
    epilog=EXIT_CODES,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False) -> None:
    """qnas: train -> search -> finetune -> calibrate -> export. Run `qnas COMMAND --help` for each step."""


app.add_typer(space_cmd.app, name="space")
app.command("train")(train_cmd.train)
app.command("calibrate")(calibrate_cmd.calibrate)
app.command("export")(export_cmd.export)
app.add_typer(latency_cmd.app, name="latency")
app.command("search")(search_cmd.search)
app.command("finetune")(finetune_cmd.finetune)


def main() -> None:
    app()

