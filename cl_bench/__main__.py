"""`python -m cl_bench [overrides]`: the Hydra entry point.

User errors (bad config, missing data, unavailable model) print one line and exit 2; the
traceback goes to the run's log only when HYDRA_FULL_ERROR=1.
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _fail(exc: BaseException) -> None:
    print(f"cl_bench: error: {exc}", file=sys.stderr)
    sys.exit(2)


def main() -> None:
    from .config import check_group_overrides
    from .errors import CLBenchError

    try:
        check_group_overrides(sys.argv[1:])
    except CLBenchError as exc:
        _fail(exc)

    import hydra
    from hydra.core.hydra_config import HydraConfig

    @hydra.main(version_base="1.3", config_path="../conf", config_name="config")
    def app(cfg) -> None:
        from .runner import run

        try:
            run(cfg, HydraConfig.get().runtime.output_dir)
        except CLBenchError as exc:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            _fail(exc)

    app()


if __name__ == "__main__":
    main()
