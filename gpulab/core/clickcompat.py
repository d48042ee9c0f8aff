"""The click module that the installed Typer uses (Typer >= 0.23 vendors its own copy as typer._click)."""
import typer.core as _typer_core

click = getattr(_typer_core, "_click", None) or getattr(_typer_core, "click")
