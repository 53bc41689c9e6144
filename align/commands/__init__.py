"""One module (or package of subcommands) per `align` command; see `align.cli`."""
