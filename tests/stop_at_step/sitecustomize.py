"""A stop signal at an exact step, for the pre-emption tests of the evaluation stages
(tests/test_reliability.py). Python imports this module in every process started with
its folder on PYTHONPATH; with STOP_AT_STEP=k set, rank 0 sends SIGTERM to the stage's
command as its k-th SGD step (the evaluation trainers' optimiser) returns: to itself
when it is that command, else to its parent, the stage's launcher, which passes it on
to every worker. A worker then waits for its copy, so the ranks stop after step k."""

import os

if "STOP_AT_STEP" in os.environ and os.environ.get("RANK", "0") == "0":
    import signal
    import time

    import torch

    _steps, _stop_at, _step = [0], int(os.environ["STOP_AT_STEP"]), torch.optim.SGD.step

    def _step_then_stop(self, *args, **kwargs):
        out = _step(self, *args, **kwargs)
        _steps[0] += 1
        if _steps[0] == _stop_at:
            if "BARLOW_LAUNCHED_WORKER" not in os.environ:
                os.kill(os.getpid(), signal.SIGTERM)
                return out
            # Wait until the launcher's copy has been handled here (Python runs the
            # handler in this thread, whichever thread the kernel gave the signal to).
            # A kill followed by pause() would wait forever when that copy came and was
            # handled between the two calls, and the other ranks would time out.
            handler, handled = signal.getsignal(signal.SIGTERM), []

            def note(signum, frame):
                handled.append(signum)
                if callable(handler):  # the stage's stop handler (barlow.interrupt)
                    handler(signum, frame)

            signal.signal(signal.SIGTERM, note)
            os.kill(os.getppid(), signal.SIGTERM)
            while not handled:
                time.sleep(0.001)
            signal.signal(signal.SIGTERM, handler)
        return out

    torch.optim.SGD.step = _step_then_stop
