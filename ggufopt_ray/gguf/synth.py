"""A deterministic tiny llama-architecture GGUF, made from a seed in about a second.

Tests and the default sweep need a real model that llama.cpp loads, quantizes and runs, without
downloading anything. This one has a real SentencePiece vocabulary with byte fallback (so any
text tokenizes), grouped-query attention, and every weight row a multiple of 256 wide so that
every K-quant and IQ type applies to every matrix. Weights are random but scaled so that the
next-token distributions are neither flat nor one-hot (entropy well inside (0, ln n_vocab)).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ggufopt_ray.errors import UserError
from ggufopt_ray.gguf.vocab import build_spm_vocab


@dataclass(frozen=True)
class SynthSpec:
    seed: int = 0
    n_layer: int = 2
    n_embd: int = 256
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 768
    n_vocab: int = 1024
    context_length: int = 1024
    dtype: str = "f32"  # "f32" or "f16" for the 2-D weights; norms stay f32
    logit_scale: float = 2.5  # target standard deviation of the output logits

    def validate(self) -> None:
        if self.n_embd % 256 or self.n_ff % 256:
            raise UserError(f"n_embd ({self.n_embd}) and n_ff ({self.n_ff}) must be multiples of 256 "
                            "so every K-quant applies; pick e.g. 256 and 768")
        if self.n_embd % self.n_head or self.n_head % self.n_head_kv:
            raise UserError("n_head must divide n_embd and n_head_kv must divide n_head")
        if self.n_layer < 1:
            raise UserError("n_layer must be at least 1")
        if self.dtype not in ("f32", "f16"):
            raise UserError(f"dtype must be f32 or f16, not {self.dtype!r}")


def _synth_tensors(spec: SynthSpec, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Weights in numpy layout [out_features, in_features]; gguf reverses them to ggml order."""
    d, ff, v = spec.n_embd, spec.n_ff, spec.n_vocab
    head_dim = d // spec.n_head
    kv = head_dim * spec.n_head_kv

    def normal(shape, std):
        # A Student-t draw gives the heavy-ish tails of trained weights, which is what makes
        # low-bit quantization of outliers visibly worse than high-bit quantization.
        w = rng.standard_t(df=5, size=shape) * np.sqrt(3.0 / 5.0)
        return (w * std).astype(np.float32)

    tensors: dict[str, np.ndarray] = {"token_embd.weight": normal((v, d), 1.0)}
    for i in range(spec.n_layer):
        p = f"blk.{i}."
        tensors[p + "attn_norm.weight"] = (1.0 + 0.1 * rng.standard_normal(d)).astype(np.float32)
        tensors[p + "attn_q.weight"] = normal((d, d), 1.5 / np.sqrt(d))
        tensors[p + "attn_k.weight"] = normal((kv, d), 1.5 / np.sqrt(d))
        tensors[p + "attn_v.weight"] = normal((kv, d), 1.0 / np.sqrt(d))
        tensors[p + "attn_output.weight"] = normal((d, d), 0.7 / np.sqrt(d))
        tensors[p + "ffn_norm.weight"] = (1.0 + 0.1 * rng.standard_normal(d)).astype(np.float32)
        tensors[p + "ffn_gate.weight"] = normal((ff, d), 1.0 / np.sqrt(d))
        tensors[p + "ffn_up.weight"] = normal((ff, d), 1.0 / np.sqrt(d))
        tensors[p + "ffn_down.weight"] = normal((d, ff), 0.7 / np.sqrt(ff))
    tensors["output_norm.weight"] = np.ones(d, dtype=np.float32)
    # After the final RMSNorm the hidden state has unit RMS, so logit std ~= std_w * sqrt(d).
    tensors["output.weight"] = normal((v, d), spec.logit_scale / np.sqrt(d))
    return tensors


def write_synthetic_model(path: str | Path, spec: SynthSpec = SynthSpec()) -> Path:
    """Write the model described by ``spec`` to ``path`` atomically and return the path."""
    import gguf  # local import: the CLI stays fast to start

    spec.validate()
    path = Path(path)
    if path.parent and not path.parent.exists():
        raise UserError(f"output folder {path.parent} does not exist; create it first")
    rng = np.random.default_rng(spec.seed)
    vocab = build_spm_vocab(spec.n_vocab)
    tensors = _synth_tensors(spec, rng)

    tmp = path.with_name(path.name + ".partial")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_name(f"ggufopt-synth-seed{spec.seed}")
    writer.add_description("synthetic model made by ggufopt synth-model: " +
                           ", ".join(f"{k}={v}" for k, v in asdict(spec).items()))
    writer.add_context_length(spec.context_length)
    writer.add_embedding_length(spec.n_embd)
    writer.add_block_count(spec.n_layer)
    writer.add_feed_forward_length(spec.n_ff)
    writer.add_head_count(spec.n_head)
    writer.add_head_count_kv(spec.n_head_kv)
    writer.add_rope_dimension_count(spec.n_embd // spec.n_head)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(spec.n_vocab)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if spec.dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    writer.add_unk_token_id(vocab.unk_id)
    writer.add_bos_token_id(vocab.bos_id)
    writer.add_eos_token_id(vocab.eos_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    for name, array in tensors.items():
        if spec.dtype == "f16" and array.ndim == 2:
            array = array.astype(np.float16)
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(path)
    return path
