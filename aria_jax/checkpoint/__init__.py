"""Checkpoints in and out: the safetensors reader (``safetensors_io``), Aria's HF key dialects and loading
(``hf_keys``), converted directories (``converted``: Orbax, streamed writer, checks, restore), ``convert`` and the
HF ``export``."""
