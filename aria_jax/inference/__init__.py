"""Running Aria: the ``Aria`` object (``api``), generation over a KV cache (``generation``, ``sampling``), and the
processor that turns text and images into model inputs (``processor``, ``image_processor``)."""
