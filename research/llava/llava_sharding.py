"""Tensor-parallel checkpoints: slicing a full checkpoint while it streams in, and the per-rank layout
`DIR/rank_K/*.ckpt`. Which axis of each parameter is split across ranks is llava_layout.py's.
"""
import os
import re

from llava_checkpoint import (CheckpointError, CheckpointWriter, check_complete, check_tensor, iter_checkpoint,
                              load_checkpoint_into, load_tensors_into, resolve_checkpoint_file)
from llava_layout import checkpoint_layout, shard, shard_shape

RANK_DIR = "rank_{}"


def check_heads_divisible(config, size):
    """Raise ValueError unless `size` divides the attention head counts of both towers (a rank holds whole
    heads; the model refuses the same at build time)."""
    for heads, what in ((config.vision_config.num_attention_heads, "vision attention heads"),
                        (config.text_config.num_heads, "text attention heads")):
        if heads % size:
            raise ValueError(f"model_parallel={size} does not divide the {heads} {what}")


def sharded_layout(config, size, check_heads=True):
    """Name -> shape of one rank's parameters under `size`-way model parallelism.

    Raises ValueError naming the heads (`check_heads`: off when the head counts are only guessed) or the
    tensor and dimension that `size` does not divide.
    """
    if check_heads and size > 1:
        check_heads_divisible(config, size)
    return {name: shard_shape(name, shape, size) for name, shape in checkpoint_layout(config).items()}


def is_sharded_directory(path):
    return os.path.isdir(path) and os.path.isdir(os.path.join(path, RANK_DIR.format(0)))


def rank_checkpoint(directory, rank):
    """`directory/rank_K/<one>.ckpt`, with an error naming the missing rank directory."""
    rank_directory = os.path.join(directory, RANK_DIR.format(rank))
    if not os.path.isdir(rank_directory):
        raise CheckpointError(f"{directory}: no directory {RANK_DIR.format(rank)} for rank {rank}; a sharded "
                              f"checkpoint needs rank_0 ... rank_N-1 for model_parallel N")
    return resolve_checkpoint_file(rank_directory)


def iter_rank_tensors(full_checkpoint, full_layout, rank, size):
    """Stream a full checkpoint and yield (name, this rank's slice), checking names and full shapes.

    Only one full tensor is in memory at a time, so no rank ever holds the whole model.
    """
    seen = set()
    for name, array in iter_checkpoint(full_checkpoint):
        check_tensor(name, array.shape, full_layout, full_checkpoint)
        seen.add(name)
        yield name, shard(name, array, rank, size)
    check_complete(seen, full_layout, full_checkpoint)


def load_model_weights(model, path, auto_trans_ckpt=False, save_shards_to=None):
    """Load this rank's weights into `model` from a full checkpoint or a `rank_K/` directory.

    A full checkpoint under model parallelism needs `auto_trans_ckpt` (as in MindFormers): each rank streams
    it and keeps only its slices, and with `save_shards_to` also writes them as `save_shards_to/rank_K/`.
    """
    tensor_parallel = model.tensor_parallel
    if is_sharded_directory(path):
        present = {name for name in os.listdir(path) if re.fullmatch(RANK_DIR.format(r"\d+"), name)}
        expected = {RANK_DIR.format(rank) for rank in range(tensor_parallel.size)}
        for rank in range(tensor_parallel.size):
            rank_checkpoint(path, rank)  # names the first missing rank directory
        if present != expected:
            raise CheckpointError(f"{path} holds shards for {len(present)} ranks but model_parallel is "
                                  f"{tensor_parallel.size}; reshard from the full checkpoint "
                                  "(--auto_trans_ckpt True) or convert with --model_parallel "
                                  f"{tensor_parallel.size}")
        return load_checkpoint_into(model, rank_checkpoint(path, tensor_parallel.rank))
    path = resolve_checkpoint_file(path)
    if tensor_parallel.size == 1:
        return load_checkpoint_into(model, path)
    if not auto_trans_ckpt:
        raise CheckpointError(f"{path} is a full checkpoint but model_parallel={tensor_parallel.size}: pass "
                              "--auto_trans_ckpt True to slice it while loading, or a directory of rank_K/ shards")
    tensors = iter_rank_tensors(path, checkpoint_layout(model.config), tensor_parallel.rank, tensor_parallel.size)
    if save_shards_to is None:
        load_tensors_into(model, tensors, path)
        return path
    target = os.path.join(save_shards_to, RANK_DIR.format(tensor_parallel.rank), "llava.ckpt")
    with CheckpointWriter(target) as writer:
        load_tensors_into(model, _written(tensors, writer), path)
    return path


def _written(tensors, writer):
    for name, array in tensors:
        writer.write(name, array)
        yield name, array
