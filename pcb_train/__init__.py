"""pcbkit training side: PCB loss, iterative RoI head, detector backends, data, samplers, train loop.

Depends on `pcb_analysis` (never the reverse).
"""
