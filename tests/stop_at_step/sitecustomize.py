"""A stop signal at an exact step, for the pre-emption tests of the evaluation stages
(tests/test_reliability.py). Python imports this module in every process started with
its folder on PYTHONPATH; with STOP_AT_STEP=k set, rank 0 sends SIGTERM to the stage's
command as its k-th SGD step (the evaluation trainers' optimiser) returns: to itself
when it is that command, else to its parent, the stage's launcher, which passes it on
to every worker. A worker then waits for its copy, so the ranks stop after step k."""

import os

if "STOP_AT_STEP" in os.environ and os.environ.get("RANK", "0") == "0":
    import signal

    import torch

    _steps, _stop_at, _step = [0], int(os.environ["STOP_AT_STEP"]), torch.optim.SGD.step

    def _step_then_stop(self, *args, **kwargs):
        out = _step(self, *args, **kwargs)
        _steps[0] += 1
        if _steps[0] == _stop_at:
            launched = "BARLOW_LAUNCHED_WORKER" in os.environ
            os.kill(os.getppid() if launched else os.getpid(), signal.SIGTERM)
            if launched:
                signal.pause()  # returns once the launcher's SIGTERM was handled here
        return out

    torch.optim.SGD.step = _step_then_stop
