"""Names of the PoD attention backend, importable without vLLM (the plugin registers them lazily)."""

BACKEND_NAME = "PODKV_TORCH"
BACKEND_PATH = "podkv.serving.attention.PodTorchBackend"
