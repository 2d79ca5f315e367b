"""The miniature world: procedural scenes with known identity and pose, and a small SD-1.x-layout model trained on
them, so the method's claims can be tested on any CPU. See docs/MINIATURE.md.

Submodules: ``world`` (the renderer), ``model`` (the architecture), ``train`` (training), ``config``.
"""
