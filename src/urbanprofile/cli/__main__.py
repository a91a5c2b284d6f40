"""``python -m urbanprofile.cli``: the same as the ``urbanprofile`` command."""

from __future__ import annotations

from urbanprofile.cli.app import main

main()
