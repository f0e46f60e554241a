"""``python -m hwbptt``: the command-line entry, which belongs to the programs layer
(``hwbptt.programs``); the core never imports it."""

from hwbptt.programs.cli import main

raise SystemExit(main())
