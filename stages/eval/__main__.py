from stages.common.errors import run_stage_main
from stages.eval.compare import main

raise SystemExit(run_stage_main(main))
