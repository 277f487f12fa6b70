"""Client budgets: a cost model of local training (memory, FLOPs, bytes) for every method.

>>> costs = predict(model, info, cfg)          # from the prepared model, without training
>>> costs.memory.peak, costs.flops_per_round(n_samples=500), costs.upload_bytes

See :mod:`fedpeft.budgets.costmodel` for what is modelled and the tolerance, and
:mod:`fedpeft.budgets.measure` for the measurement it is checked against.
"""

from fedpeft.budgets.costmodel import ClientCosts, MemoryBreakdown, PartCosts, predict, top_blocks_memory
from fedpeft.budgets.measure import Measured, measure_client, measure_step
from fedpeft.budgets.trace import SavedTensors, synthetic_batch, trace_module, trace_saved

__all__ = ["ClientCosts", "MemoryBreakdown", "PartCosts", "predict", "top_blocks_memory", "Measured", "measure_client", "measure_step",
           "SavedTensors", "synthetic_batch", "trace_module", "trace_saved"]
