"""`python -m async_grpo` is the `async-grpo` console script."""

from async_grpo.cli import main

raise SystemExit(main())
