"""The bundled tiny LLaVA's non-weight files: its SentencePiece vocabulary and its demo image.

    python demo/tiny_assets.py demo/llava_tiny

writes `tokenizer.model` (trained on the shapes task's text), `demo.png` and `demo.json` (the demo scene and
every question about it with its right answer). Both are deterministic: running it again gives the same bytes.
"""
import argparse
import io
import os
import string

import sentencepiece as spm

import shapes_task

VOCAB_SIZE = 192  # SentencePiece pieces; the tokenizer adds <image> and <pad> after them (ids 192, 193)


def vocab_corpus():
    """The training sentences: every question/answer once per its share of the task, the template's words,
    and the printable ASCII characters (so any ASCII question tokenizes without <unk>)."""
    texts = shapes_task.all_texts()
    descriptions = [text for text in texts if text.startswith("A ")]
    others = [text for text in texts if not text.startswith("A ")]
    # Descriptions come in thousands of variants, the other texts in a few dozen: repeat those so the
    # merges favour the words every prompt uses (USER, ASSISTANT, What, color, shapes, ...).
    return descriptions + others * 400 + ["USER: ASSISTANT:"] * 4000 + [string.printable.strip()]


def train_vocab(path, vocab_size=VOCAB_SIZE):
    """Train the BPE vocabulary and write it to `path`; LLaMA's conventions (unk 0, bos 1, eos 2, no
    normalization, whitespace kept), a "\\n" piece for the prompt template, no byte fallback."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(vocab_corpus()), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, byte_fallback=False, user_defined_symbols=["\n"], num_threads=1,
        shuffle_input_sentence=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True,
        hard_vocab_limit=True, minloglevel=2)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path + ".tmp", "wb") as f:
        f.write(model.getvalue())
    os.replace(path + ".tmp", path)
    return path


def write_assets(directory):
    os.makedirs(directory, exist_ok=True)
    train_vocab(os.path.join(directory, "tokenizer.model"))
    shapes_task.write_demo(os.path.join(directory, "demo.png"), os.path.join(directory, "demo.json"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("directory", help="where tokenizer.model, demo.png and demo.json are written")
    args = parser.parse_args(argv)
    write_assets(args.directory)
    print(f"wrote tokenizer.model, demo.png, demo.json to {args.directory}")


if __name__ == "__main__":
    main()
