"""The click module that the installed Typer uses (Typer >= 0.23 vendors its own copy as typer._click)."""
import typer.core as _typer_core

click = getattr(_typer_core, "_click", None) or getattr(_typer_core, "click")


def refuse_unused(ctx, names: dict[str, str], applies: bool, what: str, why: str = "") -> None:
    """A one-line InputError when an option of ``names`` was given although it does not apply (``applies``
    false) to the mode in use, which would ignore it: "--block applies only to --scheme fp8-block"."""
    from gpulab.core.errors import InputError

    unused = [] if applies else given_options(ctx, names)
    if unused:
        raise InputError(f"{', '.join(unused)} appl{'ies' if len(unused) == 1 else 'y'} only to {what}{why}")


def given_options(ctx, names: dict[str, str]) -> list[str]:
    """The options among ``names`` (parameter name -> its flag) that the user set, on the command line or from
    the environment; options left at their defaults are not listed."""
    source = click.core.ParameterSource
    return [flag for name, flag in names.items()
            if ctx.get_parameter_source(name) in (source.COMMANDLINE, source.ENVIRONMENT)]
