"""aria-jax: Aria (rhymes-ai/Aria), the multimodal mixture-of-experts model, in JAX/Flax."""

from aria_jax.config import AriaConfig, AriaTextConfig, AriaVisionConfig
from aria_jax.inference.api import Aria
from aria_jax.inference.processor import AriaProcessor

__all__ = ["Aria", "AriaConfig", "AriaProcessor", "AriaTextConfig", "AriaVisionConfig"]
__version__ = "0.1.0"
