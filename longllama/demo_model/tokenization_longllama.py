"""LongLLaMA / OpenLLaMA tokenizer: the checkpoint's sentencepiece `tokenizer.model`, used as is.

In transformers 5.x `LlamaTokenizer` is a `tokenizers` BPE converted from `tokenizer.model`. For OpenLLaMA's model
(`remove_extra_whitespaces=True`) it gives different ids than sentencepiece on runs of spaces and leading whitespace
(e.g. indented code). This class runs sentencepiece itself, so `tokenizer(text).input_ids` is exactly
`[bos_id] + SentencePieceProcessor(model_file="tokenizer.model").encode(text)` (special-token strings such as
"</s>" written in the text are still parsed as special tokens, as in every transformers tokenizer).

Ships in checkpoint directories as remote code (`auto_map` in tokenizer_config.json); imports only transformers.
"""

import json
import os

from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

VOCAB_FILES_NAMES = {"vocab_file": "tokenizer.model"}


def _pattern(add_bos: bool, add_eos: bool) -> str:
    return {(True, True): "bos_eos", (True, False): "bos", (False, True): "eos", (False, False): "none"}[
        (bool(add_bos), bool(add_eos))
    ]


class LongLlamaTokenizer(SentencePieceBackend):
    """Sentencepiece tokenizer adding BOS (`add_bos_token=True`) and no EOS (`add_eos_token=False`) by default."""

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file=None,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token=None,
        add_bos_token=True,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        **kwargs,
    ):
        kwargs.pop("special_tokens_pattern", None)
        kwargs.setdefault("legacy", True)  # keep sentencepiece's own dummy prefix: exact sentencepiece ids
        self._add_bos_token = bool(add_bos_token)
        self._add_eos_token = bool(add_eos_token)
        super().__init__(
            vocab_file=vocab_file,
            unk_token=unk_token,
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=pad_token,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            special_tokens_pattern=_pattern(add_bos_token, add_eos_token),
            **kwargs,
        )

    @property
    def add_bos_token(self) -> bool:
        return self._add_bos_token

    @add_bos_token.setter
    def add_bos_token(self, value: bool) -> None:
        self._add_bos_token = bool(value)
        self.special_tokens_pattern = _pattern(self._add_bos_token, self._add_eos_token)

    @property
    def add_eos_token(self) -> bool:
        return self._add_eos_token

    @add_eos_token.setter
    def add_eos_token(self, value: bool) -> None:
        self._add_eos_token = bool(value)
        self.special_tokens_pattern = _pattern(self._add_bos_token, self._add_eos_token)

    def _tokenize(self, text, **kwargs):
        return self.sp_model.encode(text, out_type=str)

    def _decode(self, token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=None, **kwargs) -> str:
        """sentencepiece's own decode (byte-fallback pieces, dummy prefix) on the runs between added/special tokens."""
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        special_ids = set(self.all_special_ids)
        added = self._added_tokens_decoder
        parts, run = [], []
        for index in token_ids:
            index = int(index)
            if skip_special_tokens and index in special_ids:
                continue
            if index in added or index >= self.sp_model.get_piece_size():
                if run:
                    parts.append(self.sp_model.decode(run))
                    run = []
                parts.append(str(added[index]) if index in added else "")
            else:
                run.append(index)
        if run:
            parts.append(self.sp_model.decode(run))
        text = "".join(parts)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        if clean_up_tokenization_spaces:
            text = self.clean_up_tokenization(text)
        return text

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self.sp_model.decode_pieces(list(tokens))

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Also records add_bos_token / add_eos_token in tokenizer_config.json (transformers 5 drops them)."""
        files = super().save_pretrained(save_directory, *args, **kwargs)
        prefix = kwargs.get("filename_prefix")
        path = os.path.join(str(save_directory), (prefix + "-" if prefix else "") + "tokenizer_config.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as handle:
                config = json.load(handle)
            config["add_bos_token"] = self._add_bos_token
            config["add_eos_token"] = self._add_eos_token
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
        return files


LongLlamaTokenizer.register_for_auto_class("AutoTokenizer")

__all__ = ["LongLlamaTokenizer"]
