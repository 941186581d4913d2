"""Model runners over the paged cache: the project's ops and one AVMP arena hold every cache byte."""
from avmp_triton.models.nemotron_h import SUPPORTED_LAYERS, NemotronHRunner, layer_pattern

__all__ = ["NemotronHRunner", "SUPPORTED_LAYERS", "layer_pattern"]
