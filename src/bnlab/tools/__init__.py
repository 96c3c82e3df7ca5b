"""Operations over a whole model (any ``torch.nn.Module`` tree) that contains batch-norm layers."""

from .distributed import convert_sync, sync_running_stats
from .penalties import apply_constraints, constrained_modules, regularization_loss, regularized_modules
from .recalibrate import recalibrate
from .summary import ModelSummary, summary
from .surgery import FoldReport, convert, fold, freeze, unfreeze

__all__ = [
    "FoldReport", "ModelSummary", "apply_constraints", "constrained_modules", "convert", "convert_sync", "sync_running_stats", "fold", "freeze",
    "recalibrate", "regularization_loss", "regularized_modules", "summary", "unfreeze",
]
