"""`num_processes > 1`: the prepared plan is trained on every rank under torchrun (DDP: gloo on CPU,
NCCL on GPUs).

The launching process writes the plan as JSON into its work dir and starts torchrun on the step's
module; each rank sees `SPEC_ENV` and runs `worker_main`, which trains the same plan. Rank 0 writes its
run id (at once) and its result (at the end) to the work dir; the launcher reads them back, and marks
the run FAILED if the ranks died before it ended.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
from pathlib import Path

from lora_pipeline.errors import StepError
from lora_pipeline.paths import PROJECT_ROOT
from lora_pipeline.training.plan import Plan
from lora_pipeline.training.session import Result, rank_and_world, train

log = logging.getLogger(__name__)

# Set by the launcher for the torchrun workers: the path of the prepared plan (JSON).
SPEC_ENV = "E2E_FINETUNE_SPEC"


def launch(plan: Plan, module: str) -> Result:
    """Run `train` on `num_processes` ranks with torchrun (each rank: `python -m <module>`, whose
    main calls `worker_main` when `SPEC_ENV` is set); this process only waits and reports."""
    import mlflow

    n = plan.args.num_processes
    spec = Path(plan.work_dir) / "plan.json"
    spec.write_text(plan.to_json())
    env = dict(os.environ)
    env[SPEC_ENV] = str(spec)
    root = str(PROJECT_ROOT)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
           f"--nproc_per_node={n}", "-m", module]
    log.info("launching %d training processes: %s", n, " ".join(cmd))
    proc = subprocess.run(cmd, env=env, cwd=root)
    info = plan.read_result()
    if proc.returncode != 0 or "result" not in info:
        run_id = info.get("run_id")
        if run_id:
            from lora_pipeline.cli import configure_tracking

            configure_tracking()
            client = mlflow.MlflowClient()
            if client.get_run(run_id).info.status == "RUNNING":
                client.set_terminated(run_id, "FAILED")
        raise StepError(f"training processes failed (torchrun exit {proc.returncode}); the first "
                        "error is in the log above" + (f"; run {run_id} marked FAILED" if run_id else ""))
    return Result(**info["result"])


def worker_main(args_type: type) -> int:
    """Entry of each torchrun rank: train the prepared plan (its args rebuilt as `args_type`, the
    step's Args); rank 0 writes the result."""
    from lora_pipeline.cli import setup_logging

    setup_logging()
    plan = Plan.from_json(Path(os.environ[SPEC_ENV]).read_text(), args_type)
    result = train(plan)
    if rank_and_world()[0] == 0:
        plan.write_result({"result": dataclasses.asdict(result)})
    return 0
