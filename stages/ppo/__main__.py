from stages.common.errors import run_stage_main
from stages.ppo.train import main

raise SystemExit(run_stage_main(main))
