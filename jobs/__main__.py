"""``python -m jobs <command> ...``: the ``clipn`` CLI as a ``ray job submit`` entrypoint."""

from jobs.cli import main

raise SystemExit(main())
