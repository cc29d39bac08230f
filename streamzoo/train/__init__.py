"""Training: optax loops, orbax checkpoints, truncated BPTT, sharding and data pipelines."""

from streamzoo.train.checkpoint import Checkpointer
from streamzoo.train.configs import TrainConfig, load_config, register_config, register_model, run
from streamzoo.train.loop import (StepOptions, TrainState, eval_step, evaluate, fit, make_optimizer,
                                  train_step)
from streamzoo.train.metrics import MetricsLogger, plot_metrics
from streamzoo.train.tbptt import (DynamicChunkSampler, chunk_attention_mask, make_tbptt_loss_fn,
                                   tbptt_loss)

__all__ = [
    "Checkpointer", "DynamicChunkSampler", "MetricsLogger", "StepOptions", "TrainConfig",
    "TrainState", "chunk_attention_mask", "eval_step", "evaluate", "fit", "load_config",
    "make_optimizer", "make_tbptt_loss_fn", "plot_metrics", "register_config", "register_model",
    "run", "tbptt_loss", "train_step",
]
