"""pcbkit analysis side: class statistics, calibration, LVIS evaluation, plots, reports, dumps.

This package imports without torchvision or detectron2.
"""

__version__ = "0.1.0"
