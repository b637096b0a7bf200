"""Whether a container's GPUs are in use, from NVML (the pynvml module).

A container whose CPU and network are quiet may still be training on its GPU; the
reconciler asks here before calling it idle. Without an NVIDIA driver there is no
answer (None), and idleness is judged from CPU and network alone.
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType

log = logging.getLogger(__name__)

BUSY_UTILIZATION = 5  # percent


class NvmlActivity:
    def __init__(self, nvml: ModuleType | None = None) -> None:
        self._nvml = nvml

    def busy(self, uuids: list[str], threshold: float | None = None) -> bool | None:
        """True if any of the devices runs a compute process or is utilized at
        ``threshold`` percent or more (DS01's gpu_idle_threshold; BUSY_UTILIZATION)."""
        if not uuids:
            return None
        try:
            nvml = self._nvml or importlib.import_module("pynvml")
            nvml.nvmlInit()
        except Exception:  # no driver, no library: nothing to say
            return None
        try:
            for uuid in uuids:
                handle = nvml.nvmlDeviceGetHandleByUUID(uuid)
                if nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                    return True
                try:
                    utilization = nvml.nvmlDeviceGetUtilizationRates(handle).gpu
                    if utilization >= (BUSY_UTILIZATION if threshold is None else threshold):
                        return True
                except nvml.NVMLError:  # MIG devices report no utilization
                    pass
            return False
        except nvml.NVMLError as err:
            log.warning("NVML could not report on %s: %s", uuids, err)
            return None
        finally:
            nvml.nvmlShutdown()
