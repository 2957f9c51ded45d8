"""`python -m cl_bench.report DIR ...`: tables, figures and a document from run dirs."""

from .cli import main

raise SystemExit(main())
