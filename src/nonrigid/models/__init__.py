"""Models: loading pipelines (hub ids, diffusers folders, single-file checkpoints, the built-in ``tiny`` and
``mini`` models), the model-family seam the stages reach every network through (:mod:`.family`, :mod:`.registry`,
:mod:`.sd`), and weight fingerprints. This module itself is torch-free."""

DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"
