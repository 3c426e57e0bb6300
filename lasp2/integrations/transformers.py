"""Hugging Face transformers models, sequence-parallel in one call (optional: `pip install "lasp2[hf]"`).

    from lasp2.integrations.transformers import parallelize, shard_batch
    model = parallelize(AutoModelForCausalLM.from_config(config), sp)   # sp: lasp2 SequenceParallel
    out = model(**shard_batch(sp, input_ids, labels=input_ids))        # this rank's tokens
    out.loss.backward()                                                 # its share of the global mean

`parallelize` swaps the class of every supported token mixer for a subclass whose forward runs
the same math through `sp` on this rank's shard (parameters keep their names and shapes, so state
dicts load both ways), and routes the softmax attention through `sp.softmax_attn` with a
registered attention function. `shard_batch` hands each rank its tokens, their global (or
per-document) positions, the labels shifted on the whole sequence (`shift_labels`) and the
number of labelled tokens of the whole batch, so the ranks' losses add up to the global mean.

Supported (transformers 5.24): Qwen3-Next, Qwen3.5 (text) and OLMo-hybrid (Gated DeltaNet), Kimi Linear
(KDA, MLA), MiniMax (lightning attention), Mamba2, Bamba, NemotronH and GraniteMoeHybrid (SSD), mixers
and attention.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F

try:
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_utils import AttentionInterface
except ImportError as exc:  # the library works without transformers; this module needs it
    raise ImportError("lasp2.integrations.transformers needs transformers: pip install 'lasp2[hf]'") from exc

from ..ops.documents import documents

ATTENTION = "lasp2"  # the name lasp2's sequence-parallel softmax attention is registered under
FP32_GATES = ("A_log", "dt_bias", "D")  # a mixer's decay and skip parameters, kept fp32 under mixed precision
# The keyword argument that carries the call's own sequence-parallel context (a SequenceParallel
# bound to its packed documents and layout, e.g. a planner's slot table) or just a packed row's
# documents (`lasp2.ops.Documents`) into every decoder layer's call, and from there to its mixer
# and attention (HF layers pass **kwargs on).
DOCUMENTS = "lasp2_documents"


def _l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The delta-rule layers' q/k normalisation, as transformers (and FLA) compute it."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


class _RowDocuments:
    """The packed documents of the model call in progress: taken from the model's keyword
    arguments by a pre-hook (`lasp2_documents`, or `cu_seq_lens_q` checked here once per call,
    never per layer) and handed by each decoder layer's call to its layer as the argument
    `lasp2_documents` (`_DocumentsPerCall`). Being an argument of the layer's call, they are saved
    and replayed with it by activation checkpointing (torch's, composable or HF's own), so a
    recompute in the backward sees the documents of its own row, not the last row's. Outside a
    model call there are none."""

    current = None

    def enter(self, model, args, kwargs):
        given = kwargs.pop(DOCUMENTS, None)
        offsets = kwargs.get("cu_seq_lens_q")
        if given is None and offsets is not None:
            given = documents(offsets, "cu_seq_lens_q")
        self.current = given if given is None or _is_context(given) else documents(given, DOCUMENTS)
        return args, kwargs

    def leave(self, model, args, kwargs, output):
        self.current = None


class _DocumentsPerCall:
    """A decoder layer whose call passes the current row's documents on as an argument."""

    def __call__(self, *args, **kwargs):
        if DOCUMENTS not in kwargs:  # a recompute replays the arguments of the forward: kept
            kwargs[DOCUMENTS] = self._lasp2_row_documents.current
        return super().__call__(*args, **kwargs)


def _is_context(given) -> bool:
    return hasattr(given, "softmax_attn")  # a SequenceParallel (duck-typed: no import cycle)


def _call_context(module, given):
    """(the SequenceParallel a call runs over, its packed documents or None): the call's own
    context when the model was called with one, else the context `parallelize` gave the module
    and the call's documents (or none)."""
    if given is not None and _is_context(given):
        return given, given.cu_seqlens
    return module._lasp2_sp, given


def _check_training_call(name: str, cache, attention_mask) -> None:
    if cache is not None:
        raise ValueError(f"{name}: a sequence-parallel model runs without transformers' cache; generate with "
                         f"lasp2.integrations.transformers.generate (its own sharded cache); got a cache")
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError(f"{name}: padding masks are not supported under sequence parallelism; pack documents "
                         f"instead (position_ids that restart, see shard_batch)")


def _gated_delta_core(module, mixed_qkv, beta, a, call):
    """The part every Gated DeltaNet mixer shares, on this rank's shard: the short convolution of
    q|k|v [B, C, 2·Hk·K + Hv·V] across ranks, L2-normalised q and k, the gate
    -exp(A_log)·softplus(a + dt_bias), the delta rule with q scaled by K^-1/2 -> [B, C, Hv, V]
    (call: the call's context or documents, `_call_context`)."""
    sp, cu = _call_context(module, call)
    b, c, _ = mixed_qkv.shape
    mixed = sp.causal_conv1d(mixed_qkv, module.conv1d.weight.squeeze(1), module.conv1d.bias,
                             activation=module.activation, cu_seqlens=cu)
    query, key, value = torch.split(mixed, [module.key_dim, module.key_dim, module.value_dim], dim=-1)
    query = _l2norm(query.reshape(b, c, -1, module.head_k_dim))
    key = _l2norm(key.reshape(b, c, -1, module.head_k_dim))
    value = value.reshape(b, c, -1, module.head_v_dim)
    g = -module.A_log.float().exp() * F.softplus(a.float() + module.dt_bias)
    return sp.delta_rule(query, key, value, beta, g, scale=module.head_k_dim**-0.5, cu_seqlens=cu)


class _SPQwen3NextGatedDeltaNet:
    """Qwen3NextGatedDeltaNet's forward on this rank's shard: fused projections, then the shared
    core, RMSNorm·silu(z)."""

    def forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
        _check_training_call(type(self).__name__, cache, attention_mask)
        b, c, _ = hidden_states.shape
        query, key, value, z, beta_logit, a = self.fix_query_key_value_ordering(self.in_proj_qkvz(hidden_states),
                                                                                self.in_proj_ba(hidden_states))
        mixed = torch.cat([x.reshape(b, c, -1) for x in (query, key, value)], dim=-1)
        core = _gated_delta_core(self, mixed, beta_logit.sigmoid(), a, kwargs.get(DOCUMENTS))
        core = self.norm(core.reshape(-1, core.shape[-1]), z.reshape(-1, z.shape[-1])).reshape(b, c, -1)
        return self.out_proj(core)


class _SPQwen3_5GatedDeltaNet:
    """Qwen3_5GatedDeltaNet's forward on this rank's shard (Qwen3.5: separate qkv, z, b, a
    projections), then the shared core, RMSNorm·silu(z)."""

    def forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
        _check_training_call(type(self).__name__, cache, attention_mask)
        b, c, _ = hidden_states.shape
        core = _gated_delta_core(self, self.in_proj_qkv(hidden_states), self.in_proj_b(hidden_states).sigmoid(),
                                 self.in_proj_a(hidden_states), kwargs.get(DOCUMENTS))
        z = self.in_proj_z(hidden_states)
        core = self.norm(core.reshape(-1, self.head_v_dim), z.reshape(-1, self.head_v_dim)).reshape(b, c, -1)
        return self.out_proj(core)


class _SPOlmoHybridGatedDeltaNet:
    """OlmoHybridGatedDeltaNet's forward on this rank's shard: separate projections, beta up to 2
    with negative eigenvalues allowed, then the shared core, RMSNorm·silu(g_proj)."""

    def forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
        _check_training_call(type(self).__name__, cache, attention_mask)
        b, c, _ = hidden_states.shape
        mixed = torch.cat([self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)], dim=-1)
        beta = self.b_proj(hidden_states).sigmoid()
        if self.allow_neg_eigval:
            beta = beta * 2.0
        core = _gated_delta_core(self, mixed, beta, self.a_proj(hidden_states), kwargs.get(DOCUMENTS))
        gate = self.g_proj(hidden_states)
        core = self.o_norm(core.reshape(-1, self.head_v_dim), gate.reshape(-1, self.head_v_dim)).reshape(b, c, -1)
        return self.o_proj(core)


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The registered attention function: query [B, Hq, C, D], key/value [B, Hkv, C, D] of this
    rank's tokens -> ([B, C, Hq, Dv], None), causal over the whole (packed) sequence."""
    if dropout:
        raise ValueError("lasp2 attention: attention dropout is not supported under sequence parallelism")
    sp, cu = _call_context(module, kwargs.get(DOCUMENTS))
    out = sp.softmax_attn(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), causal=True,
                          scale=scaling, cu_seqlens=cu)
    return out, None


class _SPKimiLinearDeltaAttention:
    """KimiLinearDeltaAttention's forward on this rank's shard: KDA (a gate per key channel from a
    low-rank projection), the short convolution and the delta rule through sp, RMSNorm·sigmoid of
    a low-rank gate."""

    def forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
        _check_training_call(type(self).__name__, cache, attention_mask)
        sp, cu = _call_context(self, kwargs.get(DOCUMENTS))
        b, c, _ = hidden_states.shape
        shape = (b, c, -1, self.head_dim)
        mixed = torch.cat([self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)], dim=-1)
        mixed = sp.causal_conv1d(mixed, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation=self.activation,
                                 cu_seqlens=cu)
        query, key, value = (x.reshape(shape) for x in torch.split(mixed, [self.qkv_dim] * 3, dim=-1))
        query, key = (x / torch.sqrt((x * x).sum(dim=-1, keepdim=True) + 1e-6) for x in (query, key))  # as Kimi's l2norm
        g = self.forget_gate(hidden_states)  # [B, C, H, K], <= 0
        beta = torch.sigmoid(self.b_proj(hidden_states))
        core = sp.delta_rule(query, key, value, beta, g, scale=self.head_dim**-0.5, cu_seqlens=cu)
        gate = self.g_b_proj(self.g_a_proj(hidden_states)).view(shape)
        return self.o_proj(self.o_norm(core, gate).reshape(b, c, -1))


class _SPMiniMaxLightningAttention:
    """MiniMaxLightningAttention's forward on this rank's shard. Its blocks compute causal linear
    attention with one decay per layer and head, o_t = sum_{s<=t} (q_t . k_s) exp(-slope (t-s)) v_s
    (the current token undecayed), unscaled: sp.linear_attn with log decay -slope per head. Then
    RMSNorm, the sigmoid output gate and the projection."""

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        _check_training_call(type(self).__name__, cache, attention_mask)
        sp, cu = _call_context(self, kwargs.get(DOCUMENTS))
        b, c, _ = hidden_states.shape
        qkv = self.act_fn(self.qkv_proj(hidden_states)).reshape(b, c, self.num_attention_heads, 3 * self.head_dim)
        query, key, value = torch.split(qkv, self.head_dim, dim=3)
        log_decay = -self.slope_rate.reshape(self.num_attention_heads).to(torch.float32)
        out = sp.linear_attn(query, key, value, log_decay, causal=True, scale=1.0, cu_seqlens=cu)
        out = self.norm(out.reshape(b, c, self.num_attention_heads * self.head_dim))
        out = torch.sigmoid(self.output_gate(hidden_states)) * out
        return self.out_proj(out), None


class _SPMamba2Mixer:
    """Mamba2Mixer's forward (and its copies') on this rank's shard. SSD is causal linear attention
    with q = C, k = B (groups shared by their heads), v = x · dt and a log decay dt · A per head and
    token, unscaled, plus the skip D · x: sp.linear_attn after the short convolution (with its bias)
    across ranks; then the gated RMSNorm and the projection."""

    def forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
        _check_training_call(type(self).__name__, cache, attention_mask)
        sp, cu = _call_context(self, kwargs.get(DOCUMENTS))
        b, c, _ = hidden_states.shape
        gate, x_b_c, dt = self.in_proj(hidden_states).split([self.intermediate_size, self.conv_dim, self.num_heads],
                                                            dim=-1)
        x_b_c = sp.causal_conv1d(x_b_c, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation=self.activation,
                                 cu_seqlens=cu)
        states = self.n_groups * self.ssm_state_size
        x, B, C = torch.split(x_b_c, [self.intermediate_size, states, states], dim=-1)
        dt = torch.clamp(F.softplus(dt.float() + self.dt_bias.float()), *self.time_step_limit)  # fp32 gate
        A = -torch.exp(self.A_log.float())
        x = x.reshape(b, c, self.num_heads, self.head_dim).float()
        B, C = (t.reshape(b, c, self.n_groups, self.ssm_state_size).float()
                .repeat_interleave(self.num_heads // self.n_groups, dim=2) for t in (B, C))
        y = sp.linear_attn(C, B, x * dt[..., None].float(), A * dt.float(), causal=True, scale=1.0, cu_seqlens=cu)
        y = y + self.D[:, None] * x
        y = self.norm(y.reshape(b, c, -1), gate)
        return self.out_proj(y.to(hidden_states.dtype))


# class name of a token mixer -> the subclass body that runs it through sp
MIXERS = {"Qwen3NextGatedDeltaNet": _SPQwen3NextGatedDeltaNet, "Qwen3_5GatedDeltaNet": _SPQwen3_5GatedDeltaNet,
          "Qwen3_5MoeGatedDeltaNet": _SPQwen3_5GatedDeltaNet, "OlmoHybridGatedDeltaNet": _SPOlmoHybridGatedDeltaNet,
          "KimiLinearDeltaAttention": _SPKimiLinearDeltaAttention,
          "MiniMaxLightningAttention": _SPMiniMaxLightningAttention, "Mamba2Mixer": _SPMamba2Mixer,
          "BambaMixer": _SPMamba2Mixer, "NemotronHMamba2Mixer": _SPMamba2Mixer,
          "GraniteMoeHybridMambaLayer": _SPMamba2Mixer}
# class names of the softmax attention modules routed through the registered function
ATTENTIONS = ("Qwen3NextAttention", "Qwen3_5Attention", "Qwen3_5MoeAttention", "OlmoHybridAttention",
              "KimiLinearAttention", "MiniMaxAttention", "BambaAttention", "NemotronHAttention",
              "GraniteMoeHybridAttention")
# model types whose every token mixer is covered
FAMILIES = ("qwen3_next", "qwen3_5_text", "qwen3_5_moe_text", "olmo_hybrid", "kimi_linear", "minimax", "mamba2",
            "bamba", "nemotron_h", "granitemoehybrid")


def parallelize(model, sp):
    """Make `model` (a transformers PreTrainedModel) sequence-parallel over `sp` in place, and
    return it. Every supported mixer's class is swapped for a subclass with a sequence-parallel
    forward; softmax attention goes through `sp.softmax_attn`. Names, shapes and parameters are
    untouched. Raises ValueError naming an unsupported model type."""
    model_type = getattr(model.config, "model_type", type(model).__name__)
    if model_type not in FAMILIES:
        raise ValueError(f"parallelize: {type(model).__name__} (model_type {model_type!r}) is not supported; "
                         f"supported: {', '.join(FAMILIES)}")
    AttentionInterface.register(ATTENTION, _attention)
    for module in model.modules():
        name = type(module).__name__
        if name in MIXERS:
            module.__class__ = type(f"SP{name}", (MIXERS[name], type(module)), {})
        if name in MIXERS or name in ATTENTIONS:
            module._lasp2_sp = sp
    row = _RowDocuments()
    for layer in model.base_model.layers:
        layer.__class__ = type(f"SP{type(layer).__name__}", (_DocumentsPerCall, type(layer)), {})
        layer._lasp2_row_documents = row
    model.register_forward_pre_hook(row.enter, with_kwargs=True)
    model.register_forward_hook(row.leave, with_kwargs=True, always_call=True)
    if any(type(m).__name__ in ATTENTIONS for m in model.modules()):  # pure Mamba2 has none
        model.set_attn_implementation(ATTENTION)
    model._lasp2_sp = sp
    return model


def generate(model, sp, input_ids, max_new_tokens: int, *, do_sample: bool = False, temperature: float = 1.0,
             top_k: int | None = None, seed: int | None = None, eos_token_id: int | None = None,
             pad_token_id: int | None = None, attention_mask=None, ragged_tail: bool = False,
             return_dict: bool = False):
    """Continue `input_ids` [B, T] (the same on every rank) by `max_new_tokens` tokens with a
    model `parallelize` prepared: the prompt prefilled across `sp`'s ranks (every linear and
    delta-rule layer's final state and every short convolution's last inputs come out exactly,
    the softmax layers' KV cache stays sharded, 1/W per rank), then each token decoded on every
    rank from those states, each softmax layer merging the ranks' partial attention by
    log-sum-exp (`lasp2.parallel.decoding`). Greedy unless do_sample (temperature, top_k, seed:
    the same draw on every rank); eos_token_id: stop once every row produced it (finished rows
    filled with pad_token_id, default eos). A padded attention_mask, a prompt the layout cannot
    shard (unless ragged_tail: its last tokens then run as decoding steps) or an unprepared model
    raise ValueError before any collective.

    Returns [B, T + n] tokens, the same on every rank; return_dict=True: a
    `lasp2.parallel.decoding.Generation` (tokens, each step's logits, timings, cache bytes).
    """
    from ..ops.sampling import token_chooser
    from ..parallel.decoding import generate_tokens

    fn = "lasp2.integrations.transformers.generate"
    if getattr(model, "_lasp2_sp", None) is None:
        raise ValueError(f"{fn}: {type(model).__name__} was not prepared by parallelize(model, sp)")
    choose = token_chooser(do_sample=do_sample, temperature=temperature, top_k=top_k, seed=seed,
                           device=input_ids.device)

    def forward(tokens, positions, ctx, logits_at):
        return model(input_ids=tokens, position_ids=positions.expand(tokens.shape[0], -1), use_cache=False,
                     logits_to_keep=logits_at, **{DOCUMENTS: ctx}).logits

    was_training = model.training
    model.eval()
    try:
        return generate_tokens(forward, sp, input_ids, max_new_tokens, choose, eos_token_id=eos_token_id,
                               pad_token_id=pad_token_id, attention_mask=attention_mask, ragged_tail=ragged_tail,
                               return_dict=return_dict, fn=fn)
    finally:
        model.train(was_training)


def shard_batch(sp, input_ids, labels=None, position_ids=None) -> dict:
    """The keyword arguments of this rank's forward: its tokens of `input_ids` [B, T], their
    positions ([B, T] global, or restarting at each packed document when the caller's
    `position_ids` restart), and with `labels`, the labels shifted on the whole sequence
    (`shift_labels`, so no rank loses the label of its last token) and `num_items_in_batch`
    (the labelled tokens of the whole batch, so that the ranks' losses sum to its mean).
    Packed rows (B > 1) run as one packed sequence [1, B·T] (FLA's cu_seqlens convention): each
    row's documents shifted into place, one call per layer; the model's outputs then have
    B = 1."""
    b, t = input_ids.shape
    if position_ids is None:
        position_ids = torch.arange(t, device=input_ids.device).expand(b, t)
    position_ids = position_ids.expand(b, t)
    restarts = bool((position_ids[:, 1:] == 0).any())
    if restarts and b > 1:  # packed rows: one packed sequence, each row starting a document
        if bool((position_ids[:, 0] != 0).any()):
            raise ValueError("shard_batch: every packed row's position_ids must start at 0 (a document's first token)")
        input_ids, position_ids = input_ids.reshape(1, b * t), position_ids.reshape(1, b * t)
        shifted = None if labels is None else F.pad(labels[:, 1:], (0, 1), value=-100).reshape(1, b * t)
        b, t = 1, b * t
    else:
        shifted = None if labels is None else F.pad(labels[:, 1:], (0, 1), value=-100)
    out = {"input_ids": sp.shard(input_ids), "position_ids": sp.shard(position_ids), "use_cache": False}
    if restarts:  # packed documents: their global offsets go down to every layer
        starts = torch.nonzero(position_ids[0] == 0).flatten()
        if int(starts[0]) != 0:
            raise ValueError("shard_batch: position_ids must start at 0 (a document's first token)")
        out["cu_seq_lens_q"] = torch.cat([starts, starts.new_tensor([t])])
    if shifted is not None:
        shift = shifted
        if "cu_seq_lens_q" in out:  # a document's last token does not predict the next one's first
            shift[0, out["cu_seq_lens_q"][1:-1] - 1] = -100
        out["shift_labels"] = sp.shard(shift)
        out["labels"] = out["shift_labels"]  # transformers computes the loss only when labels are given
        out["num_items_in_batch"] = (shift != -100).sum()
    return out


class CausalLM(torch.nn.Module):
    """A parallelized Hugging Face causal LM behind the trainer's model interface:
    forward(tokens [B, C], positions [C], ctx) -> logits [B, C, vocab] (ctx: the sequence-parallel
    context, bound to a packed row's documents or not). pretrained: the save_pretrained directory
    its weights come from (`load_pretrained`), or None for a fresh model."""

    def __init__(self, model, pretrained: str | None = None):
        super().__init__()
        self.model = model
        self.pretrained = pretrained

    def load_pretrained(self, device) -> None:
        """This rank's shards of the pretrained weights, on `device` (the model on the meta
        device, sharded by FSDP2 or not: each loaded shard takes its parameter's place)."""
        from .pretrained import load_weights

        load_weights(self.model, self.pretrained, device)

    @property
    def blocks(self) -> torch.nn.ModuleList:
        """The decoder layers (the units the trainer may checkpoint or shard)."""
        return self.model.base_model.layers

    def fp32_parameter_names(self) -> list[str]:
        """The parameters that must stay fp32 under mixed precision: the decays' A_log and
        dt_bias and the SSD skip D of every supported mixer, and whatever the model itself keeps
        in fp32 (transformers' _keep_in_fp32_modules(_strict), e.g. a MoE router)."""
        keep = [*(getattr(self.model, "_keep_in_fp32_modules", None) or []),
                *(getattr(self.model, "_keep_in_fp32_modules_strict", None) or [])]
        pattern = re.compile("|".join(re.escape(k) for k in keep)) if keep else None
        names = []
        for prefix, module in self.named_modules():
            if type(module).__name__.removeprefix("SP") in MIXERS:
                names += [f"{prefix}.{n}" for n, _ in module.named_parameters() if n.rsplit(".", 1)[-1] in FP32_GATES]
        names += [n for n, _ in self.named_parameters() if pattern is not None and pattern.search(n)]
        return sorted(set(names))

    def forward(self, tokens, positions, ctx):
        """The trainer's call: ctx is this call's SequenceParallel (bound to its packed documents
        by `with_documents`, to a planner's slot table by `with_layout`), which every mixer and
        attention of the call then runs over."""
        return self.model(input_ids=tokens, position_ids=positions.expand(tokens.shape[0], -1), use_cache=False,
                          **{DOCUMENTS: ctx}).logits


def _config_for(path, vocab_size: int):
    config = AutoConfig.from_pretrained(path)
    if config.vocab_size < vocab_size:
        raise ValueError(f"its vocab_size {config.vocab_size} is smaller than the tokenizer's {vocab_size} token ids")
    return config


def causal_lm_from_config(path: str, vocab_size: int, sp) -> CausalLM:
    """A freshly initialised causal LM from a local config.json (the file or its directory),
    parallelized over `sp`, for the trainer's token ids below `vocab_size`."""
    return CausalLM(parallelize(AutoModelForCausalLM.from_config(_config_for(path, vocab_size)), sp))


def causal_lm_from_saved(path, state: dict, sp, meta: bool = False) -> CausalLM:
    """The causal LM the trainer checkpoint at `path` describes (its state, `checkpoint.saved_state`:
    the model_type and the config fields `lasp2.train.describe` saved), parallelized over `sp`,
    named as the trainer saved it: on the meta device in fp32 (meta=True) or freshly initialised
    on the CPU; its weights then come from the checkpoint. ValueError for a checkpoint that does
    not record its model_type."""
    if "model_type" not in state:
        raise ValueError(f"{path}: does not record its Hugging Face model_type (saved by an older trainer); resume the "
                         f"run once to save it again")
    config = AutoConfig.for_model(state["model_type"], **state["model"])
    if not meta:
        return CausalLM(parallelize(AutoModelForCausalLM.from_config(config), sp))
    with torch.device("meta"):
        return CausalLM(parallelize(AutoModelForCausalLM.from_config(config, dtype=torch.float32), sp))


def chat_renderer(directory):
    """render(messages, add_generation_prompt) -> str with a tokenizer directory's chat template
    (transformers' Jinja conventions)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(directory)
    return lambda messages, prompt: tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)


def causal_lm_from_pretrained(directory: str, vocab_size: int, sp) -> CausalLM:
    """A pretrained causal LM (a save_pretrained directory) built on the meta device, fp32,
    parallelized over `sp`: nothing is allocated or read until `lasp2.parallelize.materialize`
    gives it memory (after FSDP has sharded it) and each rank reads its shards. ValueError
    naming the problem: no config or weights, a vocabulary smaller than the tokenizer's."""
    from pathlib import Path

    from .pretrained import weight_files

    weight_files(directory)
    config = _config_for(directory, vocab_size)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return CausalLM(parallelize(model, sp), pretrained=str(Path(directory).resolve()))
