from .configs import ALIASES, MODEL_CONFIGS, canonical_name
from .factory import CheckpointMismatchError, create_model, load_checkpoint
from .groupmixformer import GroupMixFormer

__all__ = ["GroupMixFormer", "create_model", "load_checkpoint", "MODEL_CONFIGS", "ALIASES", "canonical_name",
           "CheckpointMismatchError"]
