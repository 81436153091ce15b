from stages.common.errors import run_stage_main
from stages.dpo.train import main

raise SystemExit(run_stage_main(main))
