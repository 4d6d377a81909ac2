"""SentencePiece tokenizer of LLaVA-1.5: the LLaMA-2 / Vicuna-v1.5 vocabulary plus `<image>` and `<pad>`.

It reproduces the ids of HuggingFace's slow ``LlamaTokenizer`` as llava-hf/llava-1.5-7b-hf configures it:

* ``legacy=False``: the SentencePiece model is loaded with ``add_dummy_prefix`` switched off and one
  ``"▁"`` is prepended to the whole text instead. So text that directly follows an added token such as
  ``<image>`` gets no extra ``"▁"`` (``"<image>\\nWhat"`` → ``[32000, 13, 5618]``), while plain
  SentencePiece on each piece of text would insert one (``[32000, 29871, 13, ...]``).
* the text before an added token keeps its trailing space as a lone ``"▁"`` (id 29871):
  ``"USER: <image>"`` → ``[3148, 1001, 29901, 29871, 32000]``; a prompt that starts with ``<image>``
  also keeps the leading ``"▁"``, because llava-hf registers ``<image>`` as an added token and not as
  one of the named special tokens (bos/eos/unk/pad), for which HF would drop it.
* ``<image>`` and ``<pad>`` are appended after the SentencePiece pieces, in that order (32000, 32001 on
  LLaMA-2). ``decode(..., skip_special_tokens=True)`` drops bos/eos/unk/pad but keeps ``<image>``, spaced
  off from its neighbours, exactly as HF does.

The MindFormers ``LlamaTokenizer`` (subclassed here) already follows these rules for encoding; this class
fixes the added token ids, the vocabulary length and decoding after a leading special token, loads the
model without a protobuf module, checks the vocabulary file, and makes ``save_pretrained`` work for a
tokenizer MindFormers does not know.
"""
import os

import sentencepiece as spm
from mindformers.mindformer_book import MindFormerBook
from mindformers.models.llama import LlamaTokenizer
from mindformers.models.tokenization_utils import AddedToken
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

__all__ = ["LlavaTokenizer", "check_vocab_fits"]

SPIECE_UNDERLINE = "▁"

# Protobuf merges repeated occurrences of a message field, so appending a `normalizer_spec` (field 3 of
# ModelProto) that holds only `add_dummy_prefix = false` (field 3 of NormalizerSpec) to a serialized
# model switches the dummy prefix off. This gives the same model bytes as parsing and editing the proto,
# without importing a `sentencepiece_model_pb2` module: MindFormers and transformers each ship one, and
# under protobuf's pure-Python implementation (which MindSpore selects) MindFormers' copy fails to import
# (KeyError '_SELFTESTDATA') once transformers' copy is loaded.
_NO_DUMMY_PREFIX = bytes([0x1A, 0x02, 0x18, 0x00])

# MindFormers' yaml `save_pretrained` looks the processor of a tokenizer up in this table.
MindFormerBook.get_tokenizer_name_to_processor().setdefault("LlavaTokenizer", "LlavaProcessor")


def load_sentencepiece(vocab_file):
    """Open `vocab_file` as a SentencePiece model, with errors that name the file.

    Returns:
        spm.SentencePieceProcessor with the model as stored (add_dummy_prefix unchanged).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a directory, or a file that is not a SentencePiece model (text, image, truncated or empty).
    """
    if not vocab_file:
        raise ValueError("LLaVA tokenizer: no vocab_file: set processor.tokenizer.vocab_file to the SentencePiece "
                         "tokenizer.model (LLaMA-2's), or load a checkpoint folder that has one")
    path = os.fspath(vocab_file)
    if os.path.isdir(path):
        raise ValueError(f"LLaVA tokenizer: vocab_file {path!r} is a directory; give the SentencePiece "
                         "tokenizer.model file in it")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"LLaVA tokenizer: vocab_file {path!r} does not exist (expected a SentencePiece "
                                "tokenizer.model, e.g. LLaMA-2's)")
    processor = spm.SentencePieceProcessor()
    try:
        processor.Load(path)
    except (RuntimeError, OSError) as err:
        raise ValueError(f"LLaVA tokenizer: vocab_file {path!r} is not a SentencePiece model ({err})") from None
    if processor.get_piece_size() == 0:
        raise ValueError(f"LLaVA tokenizer: vocab_file {path!r} is a SentencePiece model without any pieces")
    return processor


def appended_token_ids(processor, tokens):
    """Ids for `tokens` as llava-hf assigns them: a token the SentencePiece model already has keeps its
    piece id; the others are numbered in order after the last piece.

    Args:
        processor: spm.SentencePieceProcessor.
        tokens: list of str (None entries are skipped).

    Returns:
        dict token -> id.
    """
    unk_id = processor.unk_id()
    next_id = processor.get_piece_size()
    ids = {}
    for token in tokens:
        if token is None or token in ids:
            continue
        piece_id = processor.piece_to_id(token)
        if piece_id != unk_id or token == processor.id_to_piece(unk_id):
            ids[token] = piece_id
        else:
            ids[token] = next_id
            next_id += 1
    return ids


def _as_added_token(token):
    """An added-token entry as llava-hf stores it: special, not normalized, no stripping."""
    if isinstance(token, dict):
        return AddedToken(**token)
    if isinstance(token, AddedToken):
        return token
    return AddedToken(str(token), lstrip=False, rstrip=False, normalized=False, special=True)


def _added_tokens_decoder(saved, fixed_ids):
    """Merge the `added_tokens_decoder` of a saved tokenizer (json keys are str) with the ids of the
    image and pad tokens, which always win: they are derived from the vocabulary itself."""
    decoder = {int(index): _as_added_token(token) for index, token in (saved or {}).items()}
    taken = set(fixed_ids)
    decoder = {index: token for index, token in decoder.items() if str(token) not in taken}
    for token, index in fixed_ids.items():
        decoder[index] = _as_added_token(token)
    return decoder


@MindFormerRegister.register(MindFormerModuleType.TOKENIZER)
class LlavaTokenizer(LlamaTokenizer):
    """LLaMA-2 SentencePiece tokenizer with LLaVA's `<image>` and `<pad>` tokens.

    Args:
        vocab_file (str): SentencePiece `tokenizer.model` (LLaMA-2: 32000 pieces, unk 0, bos 1, eos 2).
        add_bos_token (bool): prepend `<s>` when encoding with special tokens. Default True.
        add_eos_token (bool): append `</s>` when encoding with special tokens. Default False.
        image_token (str): the placeholder for image features; id = piece count (32000 on LLaMA-2).
        pad_token (str): padding token; id = piece count + 1 (32001) unless the vocabulary has it.
        legacy (bool): False (llava-hf's setting) for the rules in the module docstring.
        **kwargs: other MindFormers tokenizer options (unk_token, bos_token, eos_token, model_max_length, ...).

    `__call__`, `encode`, `decode`, `batch_decode`, `save_pretrained` come from MindFormers.
    """

    def __init__(self, vocab_file, add_bos_token=True, add_eos_token=False, image_token="<image>",
                 pad_token="<pad>", legacy=False, clean_up_tokenization_spaces=False, **kwargs):
        vocab_file = os.fspath(vocab_file) if vocab_file else vocab_file  # load_sentencepiece names a missing one
        if pad_token is not None:
            pad_token = _as_added_token(pad_token)
        fixed_ids = appended_token_ids(load_sentencepiece(vocab_file),
                                       [image_token, None if pad_token is None else str(pad_token)])
        added_tokens_decoder = _added_tokens_decoder(kwargs.pop("added_tokens_decoder", None), fixed_ids)
        super().__init__(vocab_file=vocab_file, pad_token=pad_token, add_bos_token=add_bos_token,
                         add_eos_token=add_eos_token, legacy=legacy,
                         clean_up_tokenization_spaces=clean_up_tokenization_spaces,
                         added_tokens_decoder=added_tokens_decoder, **kwargs)
        self.image_token = image_token
        # LlamaTokenizer keeps these out of `init_kwargs`; without them a saved tokenizer forgets them.
        self.init_kwargs.update(vocab_file=vocab_file, add_bos_token=add_bos_token, add_eos_token=add_eos_token,
                                image_token=image_token, legacy=legacy)

    def get_spm_processor(self, from_slow=False):
        """The SentencePiece model; with `legacy=False` its dummy prefix is switched off (see module doc)."""
        processor = spm.SentencePieceProcessor(**self.sp_model_kwargs)
        with open(self.vocab_file, "rb") as model_file:
            proto = model_file.read()
        if not (self.legacy or from_slow):
            proto += _NO_DUMMY_PREFIX
        processor.LoadFromSerializedProto(proto)
        return processor

    @property
    def image_token_id(self):
        """int: id of `<image>` (32000 on LLaMA-2)."""
        return self.convert_tokens_to_ids(self.image_token)

    def __len__(self):
        """Ids in use: the SentencePiece pieces plus the added tokens beyond them (32002 for llava)."""
        beyond = [index for index in self.added_tokens_decoder if index >= self.vocab_size]
        return self.vocab_size + len(beyond)

    def convert_tokens_to_string(self, tokens):
        """Join token strings into text as HF's LlamaTokenizer does with `add_prefix_space=True`.

        The "▁" that `tokenize` prepended is removed from the first token. Ordinary pieces are decoded
        together by SentencePiece (byte-fallback pieces must be decoded as a group); named special tokens
        (bos/eos/unk/pad) are copied verbatim. When the text starts with a special token, a space separates
        it from a following word piece that has no "▁" of its own (HF: "<s>" + "Hi" -> "<s> Hi").
        """
        tokens = list(tokens)
        if not tokens:
            return ""
        if tokens[0].startswith(SPIECE_UNDERLINE):
            tokens[0] = tokens[0][len(SPIECE_UNDERLINE):]
        special = set(self.all_special_tokens)
        parts, pending = [], []
        for position, token in enumerate(tokens):
            if token in special:
                if pending and self.legacy:
                    parts.append(" ")
                parts.append(self.sp_model.decode(pending) + token)
                pending = []
                continue
            if position == 1 and tokens[0] in special and not token.startswith(SPIECE_UNDERLINE):
                parts.append(" ")
            pending.append(token)
        parts.append(self.sp_model.decode(pending))
        return "".join(parts)

    def save_pretrained(self, save_directory=None, save_name="mindspore_model", file_format="yaml",
                        save_json=False, **kwargs):
        """Write the tokenizer: `save_json=True` gives HF-style `tokenizer_config.json` +
        `special_tokens_map.json` + `tokenizer.model`; otherwise MindFormers' `<save_name>.yaml` +
        `tokenizer.model`. Either directory loads back with `LlavaTokenizer.from_pretrained`."""
        if save_directory is None:
            raise ValueError("LlavaTokenizer.save_pretrained needs a save_directory")
        os.makedirs(save_directory, exist_ok=True)
        # The saved config must point at the copy of the vocabulary, not at the original path.
        original = self.init_kwargs.pop("vocab_file", None)
        try:
            super().save_pretrained(save_directory, save_name=save_name, file_format=file_format,
                                    save_json=save_json, **kwargs)
        finally:
            if original is not None:
                self.init_kwargs["vocab_file"] = original


def check_vocab_fits(tokenizer, vocab_size, image_token_id):
    """Check that a tokenizer can drive a model with `vocab_size` embedding rows and `image_token_id`.

    Args:
        tokenizer: LlavaTokenizer (anything with `len()` and `image_token_id`).
        vocab_size (int): rows of the model's embedding / lm_head (32064 for llava-1.5-7b-hf).
        image_token_id (int): the config's `<image>` id (32000).

    Raises:
        ValueError: the tokenizer produces ids >= vocab_size, or its `<image>` id differs from the config's.
    """
    # The highest id, not the count: added tokens need not be contiguous.
    highest_id = max([len(tokenizer) - 1, *getattr(tokenizer, "added_tokens_decoder", {})])
    if highest_id >= vocab_size:
        raise ValueError(f"the tokenizer needs {highest_id + 1} ids (SentencePiece pieces plus added tokens, up to "
                         f"id {highest_id}) but the model's vocab_size is {vocab_size}: ids from {vocab_size} on "
                         "have no embedding; use the vocabulary the checkpoint was trained with")
    if tokenizer.image_token_id != image_token_id:
        raise ValueError(f"the tokenizer's image token id is {tokenizer.image_token_id} but the model config's "
                         f"image_token_id is {image_token_id}; the image features would land on the wrong tokens")
