"""`python -m mirascore ...`: the command line of mirascore.lm.cli (train, sample, eval, plot)."""
from mirascore.lm.cli import main

raise SystemExit(main())
