"""Command-line tools of gridd: ``gridctl``, the submitter's and operator's command."""
