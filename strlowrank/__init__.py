"""strlowrank: learnable sparsity and learnable rank through Soft Threshold Reparameterization.

The public core is re-exported here: the classes and functions of the method layer (soft
thresholds, masks, low-rank matrices, recurrent layers, the budget table, caches) and of the
training layer (optimizer groups, configs, the engine, checkpoints, distributed set-up, the
budget controller, entry-point helpers) that a model or a training script calls. Helpers that
serve other core modules stay in their modules. The export and analysis layers are imported by
module (``strlowrank.export``, ``strlowrank.analysis``, ...), so importing the package loads
neither onnx nor matplotlib. Importing the package does no work beyond imports
(docs/ARCHITECTURE.md).
"""

from strlowrank.method.budget import budget_table, dead_layers, totals
from strlowrank.method.cache import build_once, cache_root, write_atomic
from strlowrank.method.group_threshold import (
    GroupSoftThreshold,
    apply_group_threshold,
    group_soft_threshold,
    remove_group_threshold,
)
from strlowrank.method.lowrank import (
    FullMatrix,
    LowRankMatrix,
    MatrixSpec,
    Refactorize,
    STRMatrix,
    factored_is_cheaper,
    make_matrix,
    refactorize_,
)
from strlowrank.method.pruning import (
    GMPCallback,
    MagnitudeMask,
    apply_masks,
    gmp_density,
    mask_density,
    masked_modules,
    read_budget_densities,
    remove_masks,
    set_global_density,
    set_layer_densities,
    uniform_densities,
    zero_pruned,
)
from strlowrank.method.rnn import RNNLayer, matrix_spectra
from strlowrank.method.threshold import (
    SoftThreshold,
    apply_soft_threshold,
    remove_soft_threshold,
    select_modules,
    soft_threshold,
    thresholded_modules,
    weight_parametrizations,
)
from strlowrank.training.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_model_state,
    save_checkpoint,
    seed_everything,
)
from strlowrank.training.cli import execute, parse_config, run_main
from strlowrank.training.config import (
    ConfigError,
    from_dict,
    load_config,
    option,
    save_config,
    to_dict,
)
from strlowrank.training.controller import BudgetController, build_controller
from strlowrank.training.controller_config import ControllerConfig
from strlowrank.training.distributed import DistInfo, cleanup, init_distributed
from strlowrank.training.engine import Interrupted, Task, Trainer, TrainingError
from strlowrank.training.optim import (
    RoleOptimizer,
    build_optimizer,
    describe_groups,
    param_groups,
    parameter_roles,
    warmup_cosine,
    warmup_cosine_factor,
)
from strlowrank.training.train_config import TrainConfig

__all__ = [
    # method: soft thresholds (strlowrank.method.threshold)
    "SoftThreshold",
    "apply_soft_threshold",
    "remove_soft_threshold",
    "select_modules",
    "soft_threshold",
    "thresholded_modules",
    "weight_parametrizations",
    # method: group (channel) soft thresholds (strlowrank.method.group_threshold)
    "GroupSoftThreshold",
    "apply_group_threshold",
    "group_soft_threshold",
    "remove_group_threshold",
    # method: magnitude masks (strlowrank.method.pruning)
    "GMPCallback",
    "MagnitudeMask",
    "apply_masks",
    "gmp_density",
    "mask_density",
    "masked_modules",
    "read_budget_densities",
    "remove_masks",
    "set_global_density",
    "set_layer_densities",
    "uniform_densities",
    "zero_pruned",
    # method: low-rank matrices and recurrent layers (strlowrank.method.lowrank,
    # strlowrank.method.rnn)
    "FullMatrix",
    "LowRankMatrix",
    "MatrixSpec",
    "Refactorize",
    "STRMatrix",
    "factored_is_cheaper",
    "make_matrix",
    "refactorize_",
    "RNNLayer",
    "matrix_spectra",
    # method: budgets and caches (strlowrank.method.budget, strlowrank.method.cache)
    "budget_table",
    "dead_layers",
    "totals",
    "build_once",
    "cache_root",
    "write_atomic",
    # training: optimizer (strlowrank.training.optim)
    "RoleOptimizer",
    "build_optimizer",
    "describe_groups",
    "param_groups",
    "parameter_roles",
    "warmup_cosine",
    "warmup_cosine_factor",
    # training: configs and entry points (strlowrank.training.config,
    # strlowrank.training.train_config, strlowrank.training.cli)
    "ConfigError",
    "TrainConfig",
    "from_dict",
    "load_config",
    "option",
    "save_config",
    "to_dict",
    "execute",
    "parse_config",
    "run_main",
    # training: the loop, checkpoints, processes, controller
    "Interrupted",
    "Task",
    "Trainer",
    "TrainingError",
    "CheckpointError",
    "load_checkpoint",
    "load_model_state",
    "save_checkpoint",
    "seed_everything",
    "DistInfo",
    "cleanup",
    "init_distributed",
    "BudgetController",
    "ControllerConfig",
    "build_controller",
]
