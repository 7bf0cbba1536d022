"""How many servers a provisioned power budget holds (POLCA's oversubscription question).

A server (one replica's devices) is provisioned at its nameplate power (every device at its
maximum) unless capped: a per-device cap bounds it at ``devices x cap``. A serving simulation
also gives the power a replica actually drew at its peak; provisioning for that peak instead
of the nameplate fits more servers, and the cap is what makes that safe (POLCA).
"""

from __future__ import annotations

import math
from typing import Any

from simulator.errors import InferSimError


def servers_under_budget(budget_w: float, devices: int, device_max_w: float, power_cap_w: float | None,
                         observed_peak_w: float | None = None, overhead_w: float = 0.0) -> dict[str, Any]:
    """Servers that fit under ``budget_w``, provisioned at nameplate, at the cap, and at the peak
    a simulation observed (``overhead_w``: the rest of a server, CPUs, fans, NICs)."""
    if not budget_w > 0:
        raise InferSimError(f"--power-budget must be positive watts, got {budget_w}")

    def fit(per_server: float) -> int:
        return int(math.floor(budget_w / per_server)) if per_server > 0 else 0

    nameplate = devices * device_max_w + overhead_w
    out: dict[str, Any] = {"budget_w": budget_w, "server_nameplate_w": nameplate,
                           "servers_at_nameplate": fit(nameplate)}
    if power_cap_w is not None:
        capped = devices * min(power_cap_w, device_max_w) + overhead_w
        out.update(server_capped_w=capped, servers_capped=fit(capped))
    if observed_peak_w is not None:
        peak = observed_peak_w + overhead_w
        out.update(server_observed_peak_w=peak, servers_at_observed_peak=fit(peak))
    return out
