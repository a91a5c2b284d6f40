"""The ``methods`` command group: what is registered and what each method needs."""

from __future__ import annotations

from urbanprofile.clikit import err, out

# The project's modules, urbanprofile.methods included, are imported inside each command, not here: the data,
# evaluation, benchmark and report modules pull pandas and scikit-learn (about 2 s measured with `python -X importtime`
# on this busy 2-core machine), and even urbanprofile.methods (importlib.metadata for its plug-ins) and
# urbanprofile.config (tomllib) added 0.18 s to `import urbanprofile.cli` (0.21 -> 0.39 s, best of 7) when hoisted,
# which --help, --version and a mistyped option must not pay.


# -- methods -----------------------------------------------------------------------------------------
def methods_list() -> None:
    """List registered methods and what they need."""
    from urbanprofile.methods import broken_plugins, get_method, list_methods
    from urbanprofile.report.terminal import Column, FitTable

    table = FitTable([Column("method"), Column("head", priority=2), Column("views", "text", priority=1),
                      Column("needs", "text", priority=2), Column("seeds", priority=3),
                      Column("description", "text")])
    for name in list_methods():
        spec = get_method(name)
        needs = ", ".join([*spec.requires_views, *(["locations"] if spec.needs_locations else [])])
        table.add_row(name, spec.head, spec.describe_views() or "-", needs or "-",
                      "several" if spec.stochastic else "one", spec.description)
    out.print(table)
    for plugin, reason in broken_plugins().items():  # the others still work; say which one does not
        err.print(f"warning: method plug-in {plugin!r} not loaded: {reason}", soft_wrap=True)
