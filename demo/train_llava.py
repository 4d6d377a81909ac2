"""Training LlavaVlm on the synthetic shapes task (demo/shapes_task.py) with MindSpore, on CPU.

    python run_mindformer.py --config demo/llava_tiny/finetune_llava_tiny.yaml \\
        --register_path research/llava --run_mode finetune

(`make train-demo` runs that and writes the bundled checkpoint.) The YAML's `trainer:` names
`ShapesTaskTrainer` and its `train_dataset:` `ShapesTaskDataset`, both registered here with MindFormers'
registry (`auto_register: demo--train_llava.<Class>`, MindFormers' form for a module outside --register_path).
What the YAML decides:

* the model: `model:`, built through MindFormers' registry exactly as `run_mindformer.py --run_mode predict`
  builds it; the tokenizer and processor: `train_dataset.processor` (the same as the predict YAML's
  `processor:`), so training sees the same prompts and pixels as inference (`LlavaProcessor`: template,
  `<image>` expansion, CLIP preprocessing);
* the data: `train_dataset:` (seed, examples per epoch, the stages of the data schedule: each a share of the
  steps, the most shapes per picture and the question mix), generated on the fly, a fresh image per example;
* `runner_config:` (epochs, batch size), `optimizer:` (MindFormers `AdamW`; weight decay on matrices only),
  `lr_schedule:` (MindFormers `CosineWithWarmUpLR`; `total_steps: -1` = all steps), `seed:` (initial weights
  and the whole run), `trainer:` (progress interval, gradient clipping, the held-out check after training,
  and where and in which dtype the `.ckpt` is written, with llava_weights.save_weights, so that
  `run_mindformer.py --load_checkpoint` reads it).

Each example is the single-turn prompt `USER: <image>\n{question} ASSISTANT:` followed by ` {answer}</s>`; the
loss is the mean cross-entropy over the answer tokens and that EOS only. The training forward (`AnswerLoss`)
is `LlavaVlm.construct` in a form that compiles: the `<image>` slots are planned on the host with
`LlavaVlm.merge_plan` and the rest is `LlavaVlm.forward_merged` (tests check both give the same logits, and
that loss and gradients equal HuggingFace's LLaVA in torch on converted weights). The whole step (forward,
backward, clipping, update) is compiled as one graph.

What it took to make a model this small learn to see (measured on the shapes task): PyTorch-scale initial
weights (LlavaVlm's N(0, 0.02), meant to be overwritten by converted checkpoints, left the ViT unable to learn
shapes at all: a ViT probe classifying the four shapes stayed at loss ln 4 for 300 steps with it), a learning rate of 3e-4 (at 1e-3 the decoder learns colours and counts fast, and the ViT,
which learns only through the decoder, never learns shapes), and a first stage of single shapes described
("A red circle."), which teaches the ViT the four shapes before the decoder has to bind shapes to colours
and order them left to right.
"""
import os
import time

import numpy as np

import mindspore as ms
from mindspore import Tensor, nn, ops

from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

import shapes_task
from llava_generation import answer
from llava_layout import linear_kind
from llava_steps import causal_mask
from llava_processor import build_prompt
from llava_runtime import build_components, set_up_context
from llava_weights import load_weights, save_weights

__all__ = ["ShapesBatcher", "ShapesTaskDataset", "AnswerLoss", "build_optimizer", "evaluate",
           "run_finetune", "ShapesTaskTrainer"]


# ----------------------------------------------------------------------------------------------- data

class ShapesBatcher:
    """shapes_task.Example list -> fixed-shape training arrays.

    A row is the processor's prompt for the question (BOS, template, expanded `<image>` slots), then the answer
    ids and EOS, right-padded to `length`: the longest row the task can produce, so the compiled step sees one
    shape. Padding comes after everything that counts and the mask is causal, so it changes no loss term.
    """

    def __init__(self, tokenizer, processor):
        self.tokenizer = tokenizer
        self.processor = processor
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id
        self._prompts = {}
        self._answers = {}
        self.length = max(len(self.row(question, answer)[0]) for question, answer in shapes_task.all_question_answers())

    def prompt_ids(self, question):
        """The processor's ids for the question with one image (BOS, template, expanded <image> slots)."""
        if question not in self._prompts:
            self._prompts[question] = self.processor.encode_prompt(question, 1)
        return self._prompts[question]

    def answer_ids(self, question, answer):
        """The ids that follow the prompt when ` {answer}` is appended to its text (what generate must emit)."""
        key = (question, answer)
        if key not in self._answers:
            prompt_text = build_prompt(question, 1)
            prompt = list(self.tokenizer(prompt_text)["input_ids"])
            full = list(self.tokenizer(f"{prompt_text} {answer}")["input_ids"])
            if full[:len(prompt)] != prompt:
                raise ValueError(f"the answer changes the prompt's tokens: {prompt_text!r} + {answer!r}")
            self._answers[key] = full[len(prompt):]
        return self._answers[key]

    def row(self, question, answer):
        """(prompt ids + answer ids + EOS, number of prompt ids)."""
        prompt = self.prompt_ids(question)
        return prompt + self.answer_ids(question, answer) + [self.eos_id], len(prompt)

    def __call__(self, examples):
        """B examples -> dict of numpy arrays:

        input_ids int32 [B, L] (pad-filled), pixel_values float32 [B, 3, S, S], labels int32 [B, L] (the next
        token), weights float32 [B, L] (1 where that next token is an answer token or the EOS after it).
        """
        batch, length = len(examples), self.length
        input_ids = np.full((batch, length), self.pad_id, np.int32)
        labels = np.zeros((batch, length), np.int32)
        weights = np.zeros((batch, length), np.float32)
        for index, example in enumerate(examples):
            ids, prompt_length = self.row(example.question, example.answer)
            if len(ids) > length:
                raise ValueError(f"{example.question!r} -> {example.answer!r} is {len(ids)} tokens, over {length}")
            input_ids[index, :len(ids)] = ids
            labels[index, :len(ids) - 1] = ids[1:]
            weights[index, prompt_length - 1:len(ids) - 1] = 1.0
        pixel_values = self.processor.image_processor([example.image() for example in examples])
        return {"input_ids": input_ids, "pixel_values": pixel_values, "labels": labels, "weights": weights}


# ----------------------------------------------------------------------------------------------- loss, step

class AnswerLoss(nn.Cell):
    """LlavaVlm's forward in compilable form (the host computes `merge_plan`, the graph the rest) and the mean
    cross-entropy over the weighted positions."""

    def __init__(self, model, length):
        super().__init__()
        self.model = model
        self.mask = causal_mask(length)
        self.positions = Tensor(np.arange(length, dtype=np.int32)[None])

    def logits(self, text_ids, merge_index, pixel_values):
        """text_ids int32 [B, L] and merge_index int32 [B*L] (from `LlavaVlm.merge_plan`), pixel_values float32
        [B, 3, S, S] -> logits float32 [B, L, V]."""
        positions = ops.broadcast_to(self.positions, text_ids.shape)
        return self.model.forward_merged(text_ids, merge_index, pixel_values, positions, self.mask)

    def construct(self, text_ids, merge_index, pixel_values, labels, weights):
        log_probs = ops.log_softmax(self.logits(text_ids, merge_index, pixel_values), -1)
        picked = ops.gather_elements(log_probs, -1, labels.expand_dims(-1)).squeeze(-1)
        return -(picked * weights).sum() / ops.maximum(weights.sum(), 1.0)


def initialize_weights(model, seed):
    """Fresh weights for training from scratch, at PyTorch's default scales: every linear weight
    ~ U(-1/sqrt(in), 1/sqrt(in)), token embeddings ~ N(0, 1); biases, norms, the class and position embeddings
    keep LlavaVlm's own initialization (see the module docstring for why not LlavaVlm's N(0, 0.02))."""
    model.init_weights()  # LlavaVlm's own N(0, 0.02) first: the values the class and position embeddings keep
    rng = np.random.default_rng([seed, 1])
    for name, param in model.weights().items():
        kind = linear_kind(name)
        if name.endswith("embed_tokens.weight"):
            values = rng.standard_normal(param.shape)
        elif kind is None or not name.endswith(".weight"):
            continue
        else:  # drawn as [in, out] and stored [out, in]: the values of the layout this recipe was trained in
            in_features = param.shape[1]
            bound = 1.0 / np.sqrt(in_features)
            values = rng.uniform(-bound, bound, tuple(reversed(param.shape))).T
        param.set_data(Tensor(np.ascontiguousarray(values, np.float32)).astype(param.dtype))


def decay_groups(model, weight_decay):
    """Parameter groups: weight decay on matrices (ndim >= 2), none on vectors (norms, biases)."""
    params = [p for p in model.weights().values() if p.requires_grad]
    matrices = [p for p in params if len(p.shape) >= 2]
    vectors = [p for p in params if len(p.shape) < 2]
    return [{"params": matrices, "weight_decay": weight_decay}, {"params": vectors, "weight_decay": 0.0},
            {"order_params": params}]


def build_optimizer(config, model, total_steps):
    """MindFormers optimizer + LR schedule from the YAML's `optimizer:` and `lr_schedule:` sections."""
    from mindformers.core.lr import build_lr
    from mindformers.core.optim import build_optim

    lr_config = dict(config.lr_schedule)
    if lr_config.get("total_steps") in (None, -1):
        lr_config["total_steps"] = int(total_steps)
    lr_schedule = build_lr(lr_config)
    optim_config = dict(config.optimizer)
    weight_decay = float(optim_config.pop("weight_decay", 0.0))
    optimizer = build_optim(optim_config, default_args={"params": decay_groups(model, weight_decay),
                                                        "learning_rate": lr_schedule})
    return optimizer, lr_schedule


@MindFormerRegister.register(MindFormerModuleType.DATASET)
class ShapesTaskDataset:
    """The YAML's `train_dataset:` as a stream of shapes_task.Example batches, following its data schedule:
    `stages` (each a share of the steps, its largest picture and its question mix), or one stage of
    `question_weights` over all steps. Every stage draws from its own stream, seeded from `seed` and its index.
    """

    def __init__(self, seed=0, num_samples=0, stages=None, question_weights=None):
        self.seed = int(seed or 0)
        self.num_samples = int(num_samples or 0)
        self.stages = [dict(stage) for stage in (stages or [{"fraction": 1.0}])]
        self.question_weights = question_weights
        fractions = np.asarray([float(stage.get("fraction", 0)) for stage in self.stages])
        if (fractions <= 0).any():
            raise ValueError("every train_dataset.stages entry needs a fraction > 0")
        self.fractions = fractions / fractions.sum()

    def schedule(self, total_steps):
        """list of dicts with "steps" (adding up to total_steps), "max_shapes", "question_weights"."""
        bounds = np.round(np.cumsum(self.fractions) * total_steps).astype(int)
        out = []
        for stage, count in zip(self.stages, np.diff(np.concatenate([[0], bounds]))):
            max_shapes = int(stage.get("max_shapes") or shapes_task.MAX_SHAPES)
            if not 1 <= max_shapes <= shapes_task.MAX_SHAPES:
                raise ValueError(f"max_shapes must be 1..{shapes_task.MAX_SHAPES}, got {max_shapes}")
            weights = dict(stage.get("question_weights") or self.question_weights
                           or {t: 1.0 for t in shapes_task.QUESTION_TYPES})
            out.append({"steps": int(count), "max_shapes": max_shapes, "question_weights": weights})
        return out

    def batches(self, total_steps, batch_size, log):
        """Yield `total_steps` lists of `batch_size` examples, logging where each stage starts."""
        step = 1
        for index, stage in enumerate(self.schedule(total_steps)):
            if not stage["steps"]:
                continue
            log(f"stage {index + 1}/{len(self.stages)} from step {step}: {stage['steps']} steps, pictures of "
                f"1 to {stage['max_shapes']} shapes, questions {stage['question_weights']}")
            stream = shapes_task.example_stream([self.seed, index], stage["question_weights"],
                                                max_shapes=stage["max_shapes"])
            for _ in range(stage["steps"]):
                yield [next(stream) for _ in range(batch_size)]
            step += stage["steps"]


def make_train_step(loss_net, optimizer, max_grad_norm):
    """One compiled step: loss, gradients of the trainable parameters, global-norm clipping, update."""
    grad_fn = ms.value_and_grad(loss_net, None, optimizer.parameters)

    @ms.jit
    def step(*inputs):
        loss, grads = grad_fn(*inputs)
        grads = ops.clip_by_global_norm(grads, max_grad_norm)
        optimizer(grads)
        return loss

    return step


# ----------------------------------------------------------------------------------------------- evaluation

def evaluate(model, tokenizer, processor, examples, batch_size=16):
    """Exact-match accuracy per question type over `examples` (shapes_task.Example), greedy answers.

    Returns:
        (dict type -> {"correct", "total", "accuracy"}, list of (example, wrong answer)).
    """
    answers = answer(model, tokenizer, processor, [e.question for e in examples], [e.image() for e in examples],
                     batch_size, do_sample=False)
    scores, wrong = {}, []
    for example, result in zip(examples, answers):
        score = scores.setdefault(example.question_type, {"correct": 0, "total": 0})
        score["total"] += 1
        if result["text"] == example.answer:
            score["correct"] += 1
        else:
            wrong.append((example, result["text"]))
    for score in scores.values():
        score["accuracy"] = score["correct"] / score["total"]
    return scores, wrong


def format_scores(scores):
    return ", ".join(f"{kind} {s['correct']}/{s['total']} ({100 * s['accuracy']:.1f}%)"
                     for kind, s in sorted(scores.items(), key=lambda item: shapes_task.QUESTION_TYPES.index(item[0])))


# ----------------------------------------------------------------------------------------------- the run

def _section(config, name):
    return dict(config.get(name) or {})


def run_finetune(config, log=print):
    """Train as the YAML says; returns a summary dict (steps, losses, seconds, checkpoint, evaluation)."""
    context = _section(config, "context")
    set_up_context(device_target=context.get("device_target", "CPU"), mode=context.get("mode", 1),
                   output_dir=config.get("output_dir") or "./output")
    seed = int(config.get("seed") or 0)
    ms.set_seed(seed)
    data = _section(config, "train_dataset")
    runner = _section(config, "runner_config")
    trainer = _section(config, "trainer")
    if not data.get("processor"):
        raise ValueError("the finetune YAML needs train_dataset.processor (the predict YAML's processor: section)")
    dataset = MindFormerRegister.get_instance_from_cfg(
        {key: value for key, value in data.items() if key != "processor"}, MindFormerModuleType.DATASET)
    batch_size = int(runner.get("batch_size") or 32)
    total_steps = int(runner.get("epochs") or 1) * (dataset.num_samples // batch_size)
    if total_steps < 1:
        raise ValueError(f"train_dataset.num_samples {dataset.num_samples} gives no step of batch_size {batch_size}")
    log_interval = max(1, int(trainer.get("log_interval") or 25))

    started = time.time()
    config.model.model_config.cpu_kernels = False  # llava-ms's CPU kernels have no gradient: MindSpore's MatMul
    model, tokenizer, processor = build_components(config, data["processor"])
    if config.get("load_checkpoint"):
        load_weights(model, config.load_checkpoint)
        log(f"initial weights from {config.load_checkpoint}")
    else:
        initialize_weights(model, seed)
    model.set_train(True)
    batcher = ShapesBatcher(tokenizer, processor)
    optimizer, lr_schedule = build_optimizer(config, model, total_steps)
    step_fn = make_train_step(AnswerLoss(model, batcher.length), optimizer, float(trainer.get("max_grad_norm", 1.0)))
    num_params = sum(int(np.prod(p.shape)) for p in model.weights().values())
    log(f"finetune: {num_params:,} parameters, {total_steps} steps of {batch_size} pictures with a question each "
        f"(rows of {batcher.length} tokens), seed {seed}, data seed {dataset.seed}")

    losses, window = [], []
    train_started = time.time()
    for step, examples in enumerate(dataset.batches(total_steps, batch_size, log), start=1):
        arrays = batcher(examples)
        text_ids, merge_index = model.merge_plan(arrays["input_ids"], len(examples))
        loss = step_fn(Tensor(text_ids), Tensor(merge_index), Tensor(arrays["pixel_values"]),
                       Tensor(arrays["labels"]), Tensor(arrays["weights"]))
        loss = float(loss.asnumpy())
        if not np.isfinite(loss):
            raise ValueError(f"the loss became {loss} at step {step}; lower lr_schedule.learning_rate")
        losses.append(loss)
        window.append(loss)
        if step % log_interval == 0 or step == total_steps or step == 1:
            elapsed = time.time() - train_started
            lr = float(lr_schedule(Tensor(step - 1, ms.int32)).asnumpy())
            log(f"step {step}/{total_steps}  loss {np.mean(window):.4f}  lr {lr:.2e}  "
                f"elapsed {elapsed:.0f}s  ({elapsed / step:.2f} s/step)")
            window = []
    train_seconds = time.time() - train_started

    model.set_train(False)
    summary = {"steps": total_steps, "losses": losses, "final_loss": float(np.mean(losses[-log_interval:])),
               "train_seconds": train_seconds, "num_params": num_params}
    path = trainer.get("save_checkpoint") or os.path.join(config.get("output_dir") or "./output", "checkpoint",
                                                           "llava_tiny.ckpt")
    size = save_weights(model, path, trainer.get("save_dtype") or "float32")
    summary.update(checkpoint=path, checkpoint_bytes=size)
    log(f"checkpoint written to {path} ({size / 1e6:.1f} MB); training took {train_seconds:.0f}s")

    eval_samples = int(trainer.get("eval_samples") or 0)
    if eval_samples:
        examples = shapes_task.sample_examples(int(trainer.get("eval_seed") or 7), eval_samples,
                                               {t: 1.0 for t in shapes_task.QUESTION_TYPES})
        scores, _ = evaluate(model, tokenizer, processor, examples)
        summary["eval"] = scores
        log(f"held-out accuracy ({eval_samples} fresh examples): {format_scores(scores)}")
    summary["total_seconds"] = time.time() - started
    return summary


@MindFormerRegister.register(MindFormerModuleType.TRAINER)
class ShapesTaskTrainer:
    """What `run_mindformer.py --run_mode finetune` runs for the YAML's `trainer: {type: ShapesTaskTrainer}`."""

    def __init__(self, config):
        self.config = config

    def train(self, log=print):
        return run_finetune(self.config, log)
