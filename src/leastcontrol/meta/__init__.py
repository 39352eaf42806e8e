"""Meta-learning: the inner learning problem as an equilibrium system, LCP and its baselines.

>>> from leastcontrol.meta import get_meta_method
>>> get_meta_method("lcp", beta=0.1).route
'di'
"""
from .methods import (META_METHODS, FOMAML, IMAML, Contrastive, LCPMeta, MetaMethod, MetaOutput, TaskBatch,
                      get_meta_method)
from .problem import InnerProblem, InnerSettings
from .tasks import Sinusoid

__all__ = ["META_METHODS", "FOMAML", "IMAML", "Contrastive", "LCPMeta", "MetaMethod", "MetaOutput", "TaskBatch",
           "get_meta_method", "InnerProblem", "InnerSettings", "Sinusoid"]
