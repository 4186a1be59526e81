"""podkv: PoD (Proximal tokens over Distant tokens) KV-cache compression for long-context LLMs.

Data path: a :class:`SharingPlan` is made offline (``podkv.analysis``), used by PoD attention
(``podkv.attention``), held by :class:`PodCache` (``podkv.cache``) and wired into a transformers
model by :func:`enable_pod` (``podkv.models``).
"""

__version__ = "0.1.0"

from podkv.errors import PodError
from podkv.models.loading import load_model
from podkv.plan import SharingPlan


def __getattr__(name):
    # Lazy: importing podkv must not register anything or import heavy modules: `import podkv` stays cheap.
    if name == "PodCache":
        from podkv.cache.pod_cache import PodCache

        return PodCache
    if name in ("enable_pod", "disable_pod"):
        from podkv.models import enable

        return getattr(enable, name)
    raise AttributeError(name)


__all__ = ["PodError", "SharingPlan", "PodCache", "enable_pod", "disable_pod", "load_model", "__version__"]
