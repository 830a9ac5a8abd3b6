"""Test hook, never shipped: a training process started with this directory on PYTHONPATH dies or fails at a chosen,
reproducible moment, as a process killed from outside or a disk filling up would.

``MOELPR_TEST_FAULT=<Trainer method>@<global step>:<fault>``: when transformers' ``Trainer.<method>`` is entered at
that step (``state.global_step``), ``kill`` sends the process SIGKILL, ``disk_full`` raises ``OSError(ENOSPC)``.
E.g. ``_save_optimizer_and_scheduler@4:kill`` dies inside the save of checkpoint-4, after its model files.
"""

import os

_FAULT = os.environ.get("MOELPR_TEST_FAULT")

if _FAULT:
    import errno
    import signal

    from transformers import Trainer

    _where, _fault = _FAULT.split(":")
    _method, _step = _where.split("@")
    _original = getattr(Trainer, _method)

    def _faulty(self, *args, **kwargs):
        if self.state.global_step == int(_step):
            if _fault == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return _original(self, *args, **kwargs)

    setattr(Trainer, _method, _faulty)
