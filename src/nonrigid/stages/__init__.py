"""The method's three stages, each a function with explicit inputs and outputs, and the cache of their results.

Stage A, :mod:`~nonrigid.stages.text_optimization`; stage B, :mod:`~nonrigid.stages.inversion`; stage C,
:mod:`~nonrigid.stages.sampling`; :mod:`~nonrigid.stages.cache` keeps results on disk and
:mod:`~nonrigid.stages.cached` runs a stage through it. They reach the model only through
:class:`nonrigid.models.family.ModelFamily`. This module itself is torch-free: the names below are what the
command line validates before it imports torch.
"""

INVERSION_METHODS = ("nti", "ddim", "npi")
# the guidance scale an inversion is made for, unless given: NTI and NPI edit at 7.5, DDIM reconstructs at 1
DEFAULT_GUIDANCE = {"nti": 7.5, "ddim": 1.0, "npi": 7.5}
