"""Model runners over the paged cache: the project's ops and one AVMP arena hold every cache byte."""
from avmp_triton.models.bamba import BambaRunner
from avmp_triton.models.falcon_h1 import FalconH1Runner
from avmp_triton.models.granitemoehybrid import GraniteMoeHybridRunner
from avmp_triton.models.jamba import JambaRunner
from avmp_triton.models.mamba import Mamba2Runner, MambaRunner
from avmp_triton.models.nemotron_h import SUPPORTED_LAYERS, NemotronHRunner, layer_pattern
from avmp_triton.models.loading import RUNNERS, load_checkpoint, random_model, runner_for
from avmp_triton.models.runner import HybridRunner, Residual
from avmp_triton.models.zamba2 import Zamba2Runner

__all__ = ["RUNNERS", "BambaRunner", "FalconH1Runner", "GraniteMoeHybridRunner", "JambaRunner", "HybridRunner", "MambaRunner", "Mamba2Runner", "NemotronHRunner", "Residual", "SUPPORTED_LAYERS", "Zamba2Runner",
           "layer_pattern",
           "load_checkpoint", "random_model", "runner_for"]
