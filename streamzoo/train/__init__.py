"""Training: optax loops, orbax checkpoints, truncated BPTT, sharding and data pipelines."""

from streamzoo.train.checkpoint import Checkpointer
from streamzoo.train.configs import TrainConfig, load_config, register_config, register_model, run
from streamzoo.train.distributed import initialize
from streamzoo.train.loop import (StepOptions, TrainState, eval_step, evaluate, fit, make_optimizer,
                                  train_step, train_step_fn)
from streamzoo.train.ring_attention import ring_attention
from streamzoo.train.sequence_parallel import sequence_parallel_scan
from streamzoo.train.sharding import ShardingPlan, data_parallel_step, make_mesh
from streamzoo.train.metrics import MetricsLogger, plot_metrics
from streamzoo.train.tbptt import (DynamicChunkSampler, chunk_attention_mask, make_tbptt_loss_fn,
                                   tbptt_loss)

__all__ = [
    "Checkpointer", "DynamicChunkSampler", "ShardingPlan", "data_parallel_step", "initialize",
    "make_mesh", "ring_attention", "sequence_parallel_scan", "train_step_fn", "MetricsLogger", "StepOptions", "TrainConfig",
    "TrainState", "chunk_attention_mask", "eval_step", "evaluate", "fit", "load_config",
    "make_optimizer", "make_tbptt_loss_fn", "plot_metrics", "register_config", "register_model",
    "run", "tbptt_loss", "train_step",
]
