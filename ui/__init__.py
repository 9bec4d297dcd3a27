"""zipchat's Gradio UI: `text.py` (what the page says: tables, messages, the settings as the pipeline
takes them), `handlers.py` (one plain method per event, on an object holding the models and shared
stores), `layout.py` (the components and the event chain). No tensors here: all model work is in
`pipeline/`."""
