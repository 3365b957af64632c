"""LLM-ASR: log-mel -> Conformer encoder (or a pretrained HF speech encoder) -> projector -> SoftVQ (codebook = LLM input embeddings) -> CTC
collapse -> frozen LLM.

The LLM sees ``[<s>] [audio embeddings] transcript: <text> </s>`` and is trained (encoder, projector,
VQ codebook/temperature and, with ``lora_rank > 0``, LoRA adapters; the LLM's own weights stay frozen)
with the next-token loss on ``<text> </s>``. A token CTC on the VQ's own distribution over the LLM
vocabulary (blank = the pad token, or a dedicated extra code when the tokenizer has none) makes the quantiser a token classifier; the CTC collapse of its
argmax (drop blanks, merge repeats) then gives the LLM about one token embedding per BPE token. An
optional character CTC on the encoder output speeds up learning on small data.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from asr_reference.features import LogMel, SpecAugment
from asr_reference.errors import CheckpointError, ModelLoadError
from asr_reference.lm import encode, special_ids

VQ_MODES = ("none", "hard", "soft")
# decoding budget: tokens per second of audio (generous: speech is ~3 words/s, ~1.3-2 BPE tokens a word)
TOKENS_PER_SECOND = 10
MIN_NEW_TOKENS = 48  # the earlier fixed budget; short utterances keep it
CTC_CHARS = " 'abcdefghijklmnopqrstuvwxyz0123456789"


def ctc_chars(text: str) -> list[int]:
    """Character CTC targets (blank = 0) of a normalised transcript."""
    from asr_reference.data import normalize_text

    return [CTC_CHARS.index(c) + 1 for c in normalize_text(text) if c in CTC_CHARS]


@dataclass
class ASRConfig:
    llm: str = ""  # path of the HF causal-LM folder
    vq: str = "soft"  # none | hard | soft
    n_mels: int = 80
    enc_dim: int = 144
    enc_layers: int = 3
    enc_heads: int = 4
    enc_kernel: int = 15
    sub_channels: int = 32
    dropout: float = 0.1
    stack: int = 2  # frames stacked by the projector (encoder frames are 40 ms -> 80 ms; the token CTC
    # needs at least one frame per BPE token: 120 ms frames are too few for 3% of in-domain utterances)
    proj_hidden: int = 512
    distance: str = "cosine"  # scores against the codebook: cosine (scale-free) | l2 | dot
    temperature: float = 0.1  # tau; for l2 it is relative: tau = temperature * mean squared row norm
    learnable_temperature: bool = True
    commitment_weight: float = 0.25
    vq_backend: str = "auto"
    ctc_weight: float = 0.5
    lora_rank: int = 0  # > 0: LoRA adapters on the LLM's linear layers (the base weights stay frozen)
    lora_alpha: float = 16.0
    ctc_units: str = "chars"  # auxiliary CTC targets: "chars" (a-z, digits, ' and space) or "tokens" (LLM BPE)
    # token CTC on the VQ scores: log_softmax(scores(projector frame, codebook) / tau) over the LLM vocabulary
    # is a distribution over LLM tokens; CTC against the transcript's BPE tokens (blank = the pad token)
    # makes the VQ a token classifier. In mode "none" the same scores are computed (against the same
    # learnable copy of the embedding table) but the frames are not quantised: a like-for-like baseline.
    token_ctc_weight: float = 1.0
    # CTC collapse before the LLM: drop frames whose best-scoring code is the blank, merge runs of the same
    # code (mean of their frames), so the LLM reads about one (soft/hard/continuous) token per BPE token
    compress: bool = True
    learnable_codebook: bool = True
    # hard mode: pass the LLM loss's gradient to the encoder straight through the argmax (True), or feed the
    # LLM the chosen codes as constants (False: the encoder then learns from the CTC losses alone)
    straight_through: bool = False
    specaug: bool = True
    # "" = the built-in log-mel + Conformer trained from scratch; else a local HF folder (Whisper, wav2vec2,
    # HuBERT, WavLM), frozen unless finetune_encoder. The projector takes its width; stack = 0 picks the
    # number of frames that makes ~80 ms projector frames from its frame rate
    encoder: str = ""
    finetune_encoder: bool = False
    # what the LLM reads around the audio: "{audio}" marks where the audio embeddings go; the default is
    # "<s> [audio] transcript:". With chat_template the rendered prompt is the user turn of the tokenizer's
    # chat template (with the generation prompt after it)
    prompt: str = "{audio} transcript:"
    chat_template: bool = False
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict, where: str = "config") -> "ASRConfig":
        """A config from its saved dict; keys added since the run was made get their defaults."""
        if not isinstance(raw, dict):
            raise CheckpointError(f"{where}: the model config is not a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise CheckpointError(f"{where}: unknown config keys {unknown} (made by a newer version?)")
        return cls(**raw)


AUDIO_SLOT = "{audio}"


def prompt_token_ids(tokenizer, template: str, chat: bool) -> tuple[list[int], list[int]]:
    """(ids before the audio, ids after it) for a prompt template containing ``{audio}``.

    Plain: ``[bos] before {audio} after``. Chat: the template (with ``{audio}``) is the user message of
    the tokenizer's chat template, with the assistant generation prompt; the chat template supplies bos.
    """
    if template.count(AUDIO_SLOT) != 1:
        raise ValueError(f"the prompt template must contain {AUDIO_SLOT} exactly once, got {template!r}")

    def ids(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False) if text else []

    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ModelLoadError(f"{tokenizer.name_or_path}: the tokenizer has no chat template (drop --chat-template)")
        marker = "\u0000AUDIO\u0000"  # a string no chat template contains, found again after rendering
        text = tokenizer.apply_chat_template([{"role": "user", "content": template.replace(AUDIO_SLOT, marker)}],
                                             add_generation_prompt=True, tokenize=False)
        before, after = text.split(marker, 1)
        return ids(before), ids(after)
    before, after = template.split(AUDIO_SLOT, 1)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + ids(before), ids(after)


class ConvSubsample(nn.Module):
    """Two stride-2 3x3 convolutions: 10 ms frames -> 40 ms frames."""

    def __init__(self, n_mels: int, channels: int, out_dim: int):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, channels, 3, 2, 1), nn.GELU(),
                                  nn.Conv2d(channels, channels, 3, 2, 1), nn.GELU())
        self.out = nn.Linear(channels * ((((n_mels - 1) // 2 + 1) - 1) // 2 + 1), out_dim)

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor):
        x = self.conv(feats.unsqueeze(1))  # (b, c, t/4, f/4)
        x = self.out(x.permute(0, 2, 1, 3).flatten(2))
        for _ in range(2):
            lengths = torch.div(lengths - 1, 2, rounding_mode="floor") + 1
        lengths = lengths.clamp(min=1, max=x.shape[1])
        return x[:, : int(lengths.max())], lengths  # a sub-batch may be shorter than its padding


class Encoder(nn.Module):
    def __init__(self, cfg: ASRConfig):
        super().__init__()
        from torchaudio.models import Conformer

        self.sub = ConvSubsample(cfg.n_mels, cfg.sub_channels, cfg.enc_dim)
        self.conformer = Conformer(input_dim=cfg.enc_dim, num_heads=cfg.enc_heads, ffn_dim=4 * cfg.enc_dim,
                                   num_layers=cfg.enc_layers, depthwise_conv_kernel_size=cfg.enc_kernel,
                                   dropout=cfg.dropout)

    def forward(self, feats, lengths):
        x, lengths = self.sub(feats, lengths)
        x, lengths = self.conformer(x, lengths)
        return x, lengths


class Projector(nn.Module):
    """Stack ``k`` consecutive frames and map them with a 2-layer MLP to the LLM width."""

    def __init__(self, in_dim: int, out_dim: int, k: int, hidden: int):
        super().__init__()
        self.k = k
        self.mlp = nn.Sequential(nn.Linear(in_dim * k, hidden), nn.GELU(), nn.Linear(hidden, out_dim))

    def forward(self, x, lengths):
        b, t, d = x.shape
        pad = (-t) % self.k
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
        x = x.reshape(b, (t + pad) // self.k, d * self.k)
        return self.mlp(x), torch.div(lengths + self.k - 1, self.k, rounding_mode="floor")


class LoRALinear(nn.Module):
    """``base(x) + (alpha / r) * x A^T B^T`` with ``base`` frozen and B initialised to zero."""

    def __init__(self, base: nn.Linear, r: int, alpha: float):
        super().__init__()
        self.base = base
        self.lora_a = nn.Parameter(torch.randn(r, base.in_features) / base.in_features ** 0.5)
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, r))
        self.scale = alpha / r

    def forward(self, x):
        return self.base(x) + (x @ self.lora_a.t().to(x.dtype)) @ self.lora_b.t().to(x.dtype) * self.scale


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def add_lora(model: nn.Module, r: int, alpha: float) -> int:
    """Wrap the attention/MLP projections of an HF decoder in LoRA adapters; returns how many."""
    n = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if name in LORA_TARGETS and isinstance(child, nn.Linear):
                setattr(module, name, LoRALinear(child, r, alpha))
                n += 1
    return n


class _Aux(dict):
    """embed_audio's side outputs. ``aux["token_logits"]`` (b, n, V), the full score matrix of the token CTC's
    distribution, is formed only when read (inspection, tests): training reads token_lse and token_ids."""

    def __init__(self, model, **items):
        super().__init__(**items)
        self._model = model

    def __missing__(self, key):
        if key != "token_logits" or "token_frames" not in self:
            raise KeyError(key)
        with torch.autocast(self["token_frames"].device.type, enabled=False):
            self[key] = self._model.vq_scores(self["token_frames"])
        return self[key]


def lengths_to_mask(lengths: torch.Tensor, n: int) -> torch.Tensor:
    return torch.arange(n, device=lengths.device)[None] < lengths[:, None]


def ctc_compress(x: torch.Tensor, lengths: torch.Tensor, ids: torch.Tensor, blank: int):
    """CTC collapse of frames: drop frames whose id is ``blank``, merge each run of consecutive frames with
    the same id into the mean of its frames. x (b, n, d), lengths (b,), ids (b, n) -> (b, m, d), (b,).
    Differentiable in x; a sequence with no non-blank frame gets length 0."""
    b, n, d = x.shape
    real = lengths_to_mask(lengths, n)
    keep = real & (ids != blank)
    prev_keep = F.pad(keep[:, :-1], (1, 0), value=False)
    prev_ids = F.pad(ids[:, :-1], (1, 0), value=-1)
    start = keep & ~(prev_keep & (ids == prev_ids))
    seg = start.long().cumsum(1) - 1  # segment of each kept frame
    new_lens = start.sum(1)
    m = max(int(new_lens.max()), 1) if b else 1
    flat = (torch.arange(b, device=x.device)[:, None] * m + seg)[keep]
    sums = x.new_zeros(b * m, d).index_add(0, flat, x[keep])
    counts = x.new_zeros(b * m).index_add(0, flat, torch.ones_like(flat, dtype=x.dtype))
    out = (sums / counts.clamp_min(1)[:, None]).view(b, m, d)
    return out, new_lens


class LLMASR(nn.Module):
    def __init__(self, cfg: ASRConfig, llm: nn.Module, tokenizer):
        super().__init__()
        if cfg.vq not in VQ_MODES:
            raise ValueError(f"vq must be one of {VQ_MODES}, got {cfg.vq!r}")
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.bos_id, self.eos_id = special_ids(tokenizer)
        emb = llm.get_input_embeddings()
        n_vocab, d_llm = emb.weight.shape
        # the CTC blank must not be a real token: the pad token when there is one, else one extra code
        # (row n_vocab) appended to the VQ codebook; the LLM never reads it (the CTC collapse drops it)
        self.extra_blank = tokenizer.pad_token_id is None or tokenizer.pad_token_id == self.eos_id
        self.blank_id = n_vocab if self.extra_blank else tokenizer.pad_token_id
        self.prefix_ids, self.prompt_ids = prompt_token_ids(tokenizer, cfg.prompt, cfg.chat_template)
        builtin_pretrained = False
        if cfg.encoder:
            from asr_reference.encoders import HFSpeechEncoder
            from asr_reference.pretrain_encoder import BuiltinEncoder, is_builtin_encoder

            self.features = None
            self.specaug = None
            builtin_pretrained = is_builtin_encoder(cfg.encoder)
            if builtin_pretrained:  # a pretrain-encoder folder: the built-in Conformer, trained once
                self.encoder = BuiltinEncoder(cfg.encoder, finetune=cfg.finetune_encoder, specaug=cfg.specaug)
            else:
                self.encoder = HFSpeechEncoder(cfg.encoder, finetune=cfg.finetune_encoder)
            enc_dim, frame_seconds = self.encoder.dim, self.encoder.frame_seconds
            self.sample_rate, self.max_seconds = self.encoder.sample_rate, self.encoder.max_seconds
        else:
            self.features = LogMel(cfg.n_mels)
            self.specaug = SpecAugment()
            self.encoder = Encoder(cfg)
            enc_dim, frame_seconds = cfg.enc_dim, 0.04
            self.sample_rate, self.max_seconds = 16000, None
        stack = cfg.stack or max(1, round(0.08 / frame_seconds))
        self.enc_dim, self.frame_seconds = enc_dim, frame_seconds * stack
        self.projector = Projector(enc_dim, d_llm, stack, cfg.proj_hidden)
        # projector outputs are scaled to the typical norm of the embedding rows (in every VQ mode), so
        # the LLM gets inputs of the scale it knows and hard-VQ commitment stays bounded
        self.register_buffer("target_norm", emb.weight.detach().float().norm(dim=1).mean().reshape(()))
        n_units = len(CTC_CHARS) + 1 if cfg.ctc_units == "chars" else n_vocab + self.extra_blank
        self.ctc_head = nn.Linear(enc_dim, n_units) if cfg.ctc_weight > 0 else None
        if builtin_pretrained and cfg.ctc_units == "chars":
            # the pretrained encoder's own character CTC head (diagnose reads it); trained only with the encoder
            self.ctc_head = self.encoder.model.ctc_head
        self.vq = None
        if cfg.compress and cfg.token_ctc_weight <= 0:
            raise ValueError("compress needs token_ctc_weight > 0 (the blank is learned by the token CTC)")
        self.token_scores = cfg.token_ctc_weight > 0
        if cfg.vq != "none" or self.token_scores:
            from softvq_kernels import SoftVQ

            table = emb.weight.detach().float()
            tau = cfg.temperature * (float(table.pow(2).sum(1).mean()) if cfg.distance == "l2" else 1.0)
            # tau is learned where something depends on it: soft VQ, or the token-CTC scores
            learn_tau = cfg.learnable_temperature and (cfg.vq == "soft" or self.token_scores)
            # an fp32 copy of the table (the LLM may be bf16), plus the blank row when it needs its own
            codebook = table.clone()
            if self.extra_blank:
                # a row of typical norm pointing nowhere in particular (seeded by the model's RNG stream)
                blank = torch.randn(1, d_llm) * table.norm(dim=1).mean() / d_llm ** 0.5
                codebook = torch.cat([codebook, blank.to(codebook.device)])
            self.vq = SoftVQ(codebook, temperature=tau, mode=cfg.vq, distance=cfg.distance,
                             learnable_codebook=cfg.learnable_codebook, learnable_temperature=learn_tau,
                             commitment_weight=cfg.commitment_weight, backend=cfg.vq_backend)
        for p in llm.parameters():
            p.requires_grad_(False)
        if cfg.lora_rank > 0 and add_lora(llm, cfg.lora_rank, cfg.lora_alpha) == 0:
            raise ValueError("lora_rank > 0 but the LLM has none of the layers " + ", ".join(LORA_TARGETS))
        llm.eval()
        self.llm = llm

    def train(self, mode: bool = True):
        super().train(mode)
        self.llm.eval()  # frozen: no dropout
        return self

    # ------------------------------------------------------------------------------------------
    def encoder_trainable(self) -> bool:
        """False for a frozen pretrained encoder: its outputs are then a fixed function of the audio
        (eval mode, no SpecAugment), which training caches once (:mod:`asr_reference.feature_cache`)."""
        return any(p.requires_grad for p in self.encoder.parameters())

    def trained_parts(self) -> list[str]:
        """The parts this model's training updates, in words (the compare table lists them)."""
        parts = []
        if self.encoder_trainable():
            parts.append("encoder (fine-tuned)" if self.cfg.encoder else "encoder (from scratch)")
        parts.append("projector")
        if self.vq is not None:
            learned = (["codebook"] if self.cfg.learnable_codebook else []) + (
                ["tau"] if self.vq.learnable_temperature else [])
            if learned:
                parts.append("VQ " + " + ".join(learned))
        if self.cfg.lora_rank > 0:
            parts.append(f"LoRA r={self.cfg.lora_rank}")
        return parts

    def embed_audio(self, wav: torch.Tensor, wav_lens: torch.Tensor, encoded=None):
        """Audio -> (LLM-width embeddings (b, n, d), lengths (b,), aux dict). ``encoded``: the encoder's
        (frames, lengths) already computed (a frozen encoder's cached outputs); then ``wav`` is unused."""
        enc, elen = encoded if encoded is not None else self.encode(wav, wav_lens)
        proj, plen = self.projector(enc, elen)
        proj = proj * (self.target_norm / proj.float().norm(dim=-1, keepdim=True).clamp_min(1e-6)).to(proj.dtype)
        aux = _Aux(self, enc=enc, enc_lens=elen)
        if self.vq is not None:
            mask = lengths_to_mask(plen, proj.shape[1])
            with torch.autocast(proj.device.type, enabled=False):
                out = self.vq(proj.float(), mask=mask)
                if self.token_scores:
                    aux.update(self.token_distribution(proj.float(), mask))
            if self.cfg.vq != "none":
                aux["vq_loss"] = out.loss
                aux["perplexity"] = out.perplexity
            proj = out.quantized.to(proj.dtype)
            if self.cfg.vq == "hard" and not self.cfg.straight_through:
                proj = proj.detach()
        aux["proj_lens"] = plen
        if self.cfg.compress:
            proj, plen = ctc_compress(proj, plen, aux["token_ids"], self.blank_id)
        return proj, plen, aux

    def encode(self, wav: torch.Tensor, wav_lens: torch.Tensor):
        """(b, samples) waveforms at ``self.sample_rate`` -> encoder frames (b, t, enc_dim), lengths (b,)."""
        if self.features is None:
            return self.encoder(wav, wav_lens)
        feats, flen = self.features(wav, wav_lens)
        if self.cfg.specaug:
            feats = self.specaug(feats)
        return self.encoder(feats, flen)

    def token_distribution(self, x: torch.Tensor, mask: torch.Tensor) -> dict:
        """The VQ's distribution over codes without a (b, n, V) matrix: x (b, n, d) fp32, mask (b, n) ->
        token_frames x, token_lse (b, n) (differentiable log-sum-exp of the scores, 0 on padding) and
        token_ids (b, n) (best-scoring code, -1 on padding), from the fused op. log p of any code is
        ``code_scores`` - token_lse (the token CTC gathers only the blank and the targets)."""
        from softvq_kernels import soft_vq

        _, vq_aux = soft_vq(x, self.vq.codebook.float(), self.vq.temperature, distance=self.cfg.distance,
                            mask=mask, backend=self.cfg.vq_backend, return_aux=True)
        return {"token_frames": x, "token_lse": vq_aux.lse, "token_ids": vq_aux.indices}

    def vq_scores(self, x: torch.Tensor) -> torch.Tensor:
        """(b, n, V) fp32 scores s(x, codebook) / tau of the VQ (the logits of its distribution over codes).

        Materialises (b, n, V): training does not use it (see ``token_distribution``); it backs
        ``aux["token_logits"]`` for inspection and tests."""
        from softvq_kernels.reference import scores

        lead = x.shape[:-1]
        s = scores(x.reshape(-1, x.shape[-1]), self.vq.codebook.float(), self.vq.temperature, self.cfg.distance)
        return s.reshape(*lead, -1)

    def _token_embeds(self, ids: list[int], device) -> torch.Tensor:
        return self.llm.get_input_embeddings()(torch.tensor(ids, dtype=torch.long, device=device))

    def build_inputs(self, audio: torch.Tensor, alens: torch.Tensor, texts: list[str] | None):
        """Right-padded (embeds, attention mask, labels) for training, or left-padded prefixes for
        generation when ``texts`` is None."""
        device = audio.device
        dtype = self.llm.get_input_embeddings().weight.dtype
        prefix = self._token_embeds(self.prefix_ids, device)
        prompt = self._token_embeds(self.prompt_ids, device)
        seqs, labs = [], []
        for i in range(audio.shape[0]):
            parts = [prefix, audio[i, : int(alens[i])].to(dtype), prompt]
            n_ctx = sum(p.shape[0] for p in parts)
            if texts is not None:
                ids = encode(self.tokenizer, texts[i]) + [self.eos_id]
                parts.append(self._token_embeds(ids, device))
                labs.append([-100] * n_ctx + ids)
            seqs.append(torch.cat(parts))
        n = max(s.shape[0] for s in seqs)
        d = seqs[0].shape[1]
        embeds = seqs[0].new_zeros(len(seqs), n, d)
        attn = torch.zeros(len(seqs), n, dtype=torch.long, device=device)
        labels = torch.full((len(seqs), n), -100, dtype=torch.long, device=device)
        for i, s in enumerate(seqs):
            if texts is not None:  # right padding
                embeds[i, : s.shape[0]] = s
                attn[i, : s.shape[0]] = 1
                labels[i, : s.shape[0]] = torch.tensor(labs[i], device=device)
            else:  # left padding for generation
                embeds[i, n - s.shape[0]:] = s
                attn[i, n - s.shape[0]:] = 1
        return embeds, attn, labels

    def forward(self, wav, wav_lens, texts: list[str], encoded=None):
        audio, alens, aux = self.embed_audio(wav, wav_lens, encoded)
        device = audio.device
        embeds, attn, labels = self.build_inputs(audio, alens, texts)
        logits = self.llm(inputs_embeds=embeds, attention_mask=attn).logits
        ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        loss = ce
        out = {"ce": ce.detach()}
        if self.ctc_head is not None and self.cfg.ctc_weight > 0 and (
                self.encoder_trainable() or any(p.requires_grad for p in self.ctc_head.parameters())):
            if self.cfg.ctc_units == "chars":
                targets = [torch.tensor(ctc_chars(t), dtype=torch.long) for t in texts]
                blank = 0
            else:
                targets = [torch.tensor(encode(self.tokenizer, t), dtype=torch.long) for t in texts]
                blank = self.blank_id
            tlens = torch.tensor([len(t) for t in targets])
            logp = self.ctc_head(aux["enc"]).float().log_softmax(-1).transpose(0, 1)
            ctc = F.ctc_loss(logp, torch.cat(targets).to(device), aux["enc_lens"], tlens.to(device),
                             blank=blank, zero_infinity=True)
            loss = loss + self.cfg.ctc_weight * ctc
            out["ctc"] = ctc.detach()
        if "token_lse" in aux:
            from softvq_kernels import code_ctc_loss

            # CTC over the VQ's distribution on the LLM vocabulary with only the blank and each utterance's
            # target tokens gathered (log p = score - lse): equal to log_softmax over all V codes, no (b, n, V).
            targets = [torch.tensor(encode(self.tokenizer, t), dtype=torch.long) for t in texts]
            tlens = torch.tensor([len(t) for t in targets])
            with torch.autocast(device.type, enabled=False):
                tctc = code_ctc_loss(aux["token_frames"], self.vq.codebook.float(), self.vq.temperature,
                                     aux["token_lse"], torch.cat(targets).to(device), aux["proj_lens"],
                                     tlens.to(device), blank=self.blank_id, distance=self.cfg.distance,
                                     zero_infinity=True)
            loss = loss + self.cfg.token_ctc_weight * tctc
            out["tctc"] = tctc.detach()
        if "vq_loss" in aux:
            loss = loss + aux["vq_loss"]
            out["vq"] = aux["vq_loss"].detach()
            out["ppl"] = torch.as_tensor(aux["perplexity"]).detach().float()
        out["loss"] = loss
        return out

    def token_budget(self, wav_lens: torch.Tensor) -> int:
        """Tokens to allow a batch: ``TOKENS_PER_SECOND`` of its longest audio, at least ``MIN_NEW_TOKENS``
        (speech is about 3 words/s; a stuck model stops at the budget instead of running on)."""
        seconds = float(wav_lens.max()) / self.sample_rate
        return max(MIN_NEW_TOKENS, int(seconds * TOKENS_PER_SECOND) + 8)

    @torch.no_grad()
    def transcribe(self, wav, wav_lens, num_beams: int = 1, max_new_tokens: int | None = None) -> list[str]:
        """(b, samples) waveforms -> b strings; ``max_new_tokens`` None = :meth:`token_budget`."""
        audio, alens, _ = self.embed_audio(wav, wav_lens)
        embeds, attn, _ = self.build_inputs(audio, alens, None)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id
        gen = self.llm.generate(inputs_embeds=embeds, attention_mask=attn,
                                max_new_tokens=max_new_tokens or self.token_budget(wav_lens),
                                num_beams=num_beams, do_sample=False, eos_token_id=self.eos_id,
                                pad_token_id=pad)
        return [self.tokenizer.decode(g, skip_special_tokens=True).strip() for g in gen]

    def frozen_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes of the pretrained parts that are reloaded from their folders, not saved."""
        frozen_encoder = bool(self.cfg.encoder) and not self.cfg.finetune_encoder
        if frozen_encoder and self.ctc_head is not None and self.ctc_head is getattr(self.encoder.model, "ctc_head", None):
            return ("llm.", "encoder.model.", "ctc_head.")  # the pretrained encoder's own head, frozen with it
        return ("llm.", "encoder.model.") if frozen_encoder else ("llm.",)

    def trainable_state(self) -> dict:
        """Everything but the frozen LLM (reloaded from cfg.llm) and a frozen pretrained encoder."""
        frozen = self.frozen_prefixes()
        return {k: v for k, v in self.state_dict().items() if not k.startswith(frozen) or ".lora_" in k}


def build_model(cfg: ASRConfig, device: str = "cpu") -> LLMASR:
    from asr_reference.lm import load_lm

    llm, tokenizer = load_lm(cfg.llm, device)
    return LLMASR(cfg, llm, tokenizer).to(device)


def count_params(model: nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, train


