"""LoRA Studio web UI (Gradio). Imports lora_core; lora_core never imports this package.

Gradio reads GRADIO_ANALYTICS_ENABLED when it is imported, so it is switched off here, before any
module of this package imports gradio: the app makes no outbound calls unless `--share` is asked for.
"""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
