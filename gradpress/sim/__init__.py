"""A fast single-process simulator of ``P`` workers for convex problems.

``problems`` (least squares, ridge, logistic with exact optima; the ECQ-SGD paper's Syn-d
data and scikit-learn's bundled data sets), ``data`` (iid / non-iid splits), ``loop``
(the vectorized training loop through real payloads), ``experiments`` (the papers' runs)
and ``poster`` (the "Optimal Gradient Compression" poster's bytes-to-1e-4 experiment).
See each module's docstring.
"""

from gradpress.sim.data import split
from gradpress.sim.loop import Curve, Method, Simulation
from gradpress.sim.problems import Problem, real_dataset, synthetic_linear

__all__ = ["Curve", "Method", "Problem", "Simulation", "real_dataset", "split",
           "synthetic_linear"]
