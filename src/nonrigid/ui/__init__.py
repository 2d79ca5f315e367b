"""The web UI (``nonrigid ui``): :mod:`.session` is the server side without the page (gradio-free), :mod:`.knobs`
turns the method catalogue into controls, :mod:`.app` is the Gradio page. Needs the ``ui`` extra."""
