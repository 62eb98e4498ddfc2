"""Sampling and scoring on one token layout, shared by `generate`, `sample`, `evaluate` and PPO.

Layout of a batch of episodes (prompt + response):

    [pad pad p0 p1 p2 | r0 r1 EOS pad pad]      prompt left-padded to width P,
    [p0 p1 p2 p3 p4   | r0 r1 r2  r3  r4 ]      response right-padded to width R

Every response starts at column P, so "the logits that predict the response"
are always `logits[:, P-1 : P-1+R]` and no per-row gather is needed. Position
ids come from the attention mask (count of real tokens before), so a left-padded
row sees exactly the positions it would see alone: the policy, the reference,
the critic and the reward model all score the tokens the sampler produced.

The sampler is a plain loop over a KV-cache decoder (decoding.py: the model's own
forward and cache, or for a plain GPT-2 the same layers over a cache allocated once):
one forward per new token, the logits of the last position only, and the loop ends as
soon as every row has emitted EOS. That is all `model.generate` does for us, at a
fraction of its per-step overhead, which matters for small models on CPU.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from .decoding import make_decoder, position_ids_from_mask
from .device import autocast


@dataclass
class TokenBatch:
    """Prompt + response ids in the layout above. All tensors on one device."""

    input_ids: torch.Tensor  # (batch, P + R)
    attention_mask: torch.Tensor  # (batch, P + R), 0 on left padding and after the response
    position_ids: torch.Tensor  # (batch, P + R)
    prompt_width: int  # P
    response_mask: torch.Tensor  # (batch, R) float, 1.0 on response tokens (EOS included)
    # (batch, R) fp32: the log-probability the sampler gave each token it drew (at the temperature,
    # before top-p); None when it was not sampled or top-p cut the distribution it drew from.
    sampled_logprobs: torch.Tensor | None = None

    @property
    def responses(self) -> torch.Tensor:  # (batch, R)
        return self.input_ids[:, self.prompt_width:]

    def select(self, rows: torch.Tensor | list[int]) -> "TokenBatch":
        return TokenBatch(self.input_ids[rows], self.attention_mask[rows], self.position_ids[rows],
                          self.prompt_width, self.response_mask[rows],
                          self.sampled_logprobs[rows] if self.sampled_logprobs is not None else None)


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device,
             width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) of the prompts left-padded to `width` (default: the longest prompt's length)."""
    width = width or max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[row, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def make_batch(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, responses: torch.Tensor,
               response_mask: torch.Tensor) -> TokenBatch:
    """Join left-padded prompts (B, P) and right-padded responses (B, R) into one TokenBatch."""
    attention_mask = torch.cat([prompt_mask, response_mask.long()], dim=1)
    return TokenBatch(torch.cat([prompt_ids, responses], dim=1), attention_mask,
                      position_ids_from_mask(attention_mask), prompt_ids.shape[1], response_mask.float())


def batch_from_lists(prompts: list[list[int]], responses: list[list[int]], pad_id: int,
                     device: torch.device) -> TokenBatch:
    """The same layout from token lists (e.g. stored samples to score again)."""
    prompt_ids, prompt_mask = left_pad(prompts, pad_id, device)
    width = max(1, max(len(r) for r in responses))
    resp = torch.full((len(responses), width), pad_id, dtype=torch.long)
    resp_mask = torch.zeros((len(responses), width))
    for row, r in enumerate(responses):
        resp[row, :len(r)] = torch.tensor(r, dtype=torch.long)
        resp_mask[row, :len(r)] = 1.0
    return make_batch(prompt_ids, prompt_mask, resp.to(device), resp_mask.to(device))


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches top_p (nucleus sampling); -inf elsewhere."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
    # Drop a token when the tokens before it already reach top_p (the first token always stays).
    drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def draw_tokens(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row with probability probs[row, i] (rows sum to ~1), from that row's uniform: (batch,) long.

    Inverse CDF: the first token whose cumulative probability exceeds u * total, u ~ U[0, 1).
    Same distribution as torch.multinomial(probs, 1) but ~10x cheaper on CPU for one draw
    per row (one uniform per row instead of one random number per vocabulary entry), and a
    token of probability 0 (cut by top-p) has an empty interval, so it is never drawn.
    """
    cdf = probs.cumsum(-1)  # (batch, vocab)
    u = uniforms.to(device=probs.device, dtype=cdf.dtype)[:, None] * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp(max=probs.shape[-1] - 1)


def stream_seed(*keys: int) -> int:
    """A seed for the random stream named by `keys` (e.g. the run's seed and a step): a hash, so
    streams of nearby keys are unrelated and no two key tuples share one in practice."""
    digest = hashlib.blake2b(repr(tuple(keys)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # torch takes a signed 64-bit seed


def episode_uniforms(seed: int, step: int, episodes: int, max_new_tokens: int) -> torch.Tensor:
    """(episodes, max_new_tokens) CPU uniforms: entry [i, t] draws token t of the step's episode i.

    A function of (seed, step) alone, drawn in full by every process that samples some of the
    step's episodes: episode i is sampled alike whichever process holds it, at whatever batch
    position, and however many rows are still running (`sample_responses`).
    """
    generator = torch.Generator(device="cpu").manual_seed(stream_seed(seed, step))
    return torch.rand((episodes, max_new_tokens), generator=generator)


@torch.no_grad()
def sample_responses(model: PreTrainedModel, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                     max_new_tokens: int, eos_id: int, pad_id: int, temperature: float = 1.0, top_p: float = 1.0,
                     greedy: bool = False, generator: torch.Generator | None = None,
                     precision: str = "fp32", compact_fraction: float = 0.25,
                     uniforms: torch.Tensor | None = None) -> TokenBatch:
    """Sample one response per left-padded prompt; stop a row at EOS, the batch when all rows stopped.

    Row i's token t is drawn with `uniforms[i, t]` ((batch, max_new_tokens) in [0, 1); when not
    given, drawn from `generator` up front). A row's draws are its own whatever else is in the
    batch: the same prompt with the same uniforms gives the same response alone or in any batch,
    up to the floating-point effect of the batch shape on its logits.

    Rows that have ended leave the batch (their KV cache rows dropped) once `compact_fraction`
    (a quarter) of the rows still running have ended; 0 keeps every row to the end. At T = 1
    response lengths spread widely (the SFT model's run from 1 to 64 tokens, mean ~29), and
    without this a batch of 64 pays 64 rows of compute until its longest response ends.
    Dropping rows one at a time would copy the cache more often than it saves.
    """
    device = prompt_ids.device
    batch = prompt_ids.shape[0]
    responses = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)
    rows = torch.arange(batch, device=device)  # original row of each row still in the batch
    if not greedy:
        # Drawn on the CPU (a seed gives the same draws on any device; the state checkpoints anywhere).
        uniforms = (uniforms if uniforms is not None else
                    torch.rand((batch, max_new_tokens), generator=generator)).to(device)
    # What the sampler's own distribution gave each drawn token, for the trainer to compare with its
    # log-probs (a sampler whose numbers drift from the trainer's biases PPO's ratios).
    logprobs = torch.zeros((batch, max_new_tokens), device=device) if not greedy and top_p >= 1.0 else None
    # ONE autocast region for the whole loop, not one per step: autocast keeps its bf16 copy of
    # each trainable weight until the region ends, so the weights are cast once per rollout
    # instead of once per token. A batch-8 decode step is bound by reading the weights, and
    # re-casting them every step made bf16 decoding no faster than fp32.
    with autocast(device, precision):
        decoder = make_decoder(model, prompt_ids, prompt_mask, max_new_tokens)
        logits = decoder.start()
        ended = torch.zeros(batch, dtype=torch.bool, device=device)  # per row still in the batch
        for step in range(max_new_tokens):
            logits = logits.float()
            if greedy:
                token = logits.argmax(-1)
            else:
                probs = torch.softmax(top_p_filter(logits / temperature, top_p), dim=-1)
                token = draw_tokens(probs, uniforms[rows, step])
                if logprobs is not None:
                    logprobs[rows, step] = probs.gather(1, token[:, None]).squeeze(1).log()
            token = torch.where(ended, torch.full_like(token, pad_id), token)
            responses[rows, step] = token
            ended = ended | (token == eos_id)
            n_ended = int(ended.sum())
            if n_ended == len(rows) or step == max_new_tokens - 1:
                break
            if compact_fraction and n_ended and n_ended >= compact_fraction * len(rows):
                keep = (~ended).nonzero().squeeze(1)
                decoder.keep(keep)
                rows, token, ended = rows[keep], token[keep], ended[keep]
            logits = decoder.step(token)
    responses = responses[:, :step + 1]  # (batch, R), pad after EOS
    sampled = make_batch(prompt_ids, prompt_mask, responses, response_mask_up_to_eos(responses, eos_id))
    if logprobs is not None:
        sampled.sampled_logprobs = logprobs[:, :step + 1] * sampled.response_mask
    return sampled


def response_mask_up_to_eos(responses: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(batch, R) float: 1.0 on each response's tokens up to and including its first EOS."""
    is_eos = responses == eos_id
    after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0
    return (~after_eos).float()


def finished_rows(batch: TokenBatch, eos_id: int) -> torch.Tensor:
    """(batch,) bool: the response ends with EOS (the model chose to stop)."""
    last = (response_lengths(batch) - 1).clamp(min=0)
    return batch.responses[torch.arange(len(last)), last] == eos_id


def response_logits(model: PreTrainedModel, batch: TokenBatch, precision: str) -> torch.Tensor:
    """Logits that predict each response token: (batch, R, vocab), in the matmul dtype."""
    with autocast(batch.input_ids.device, precision):
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                     logits_to_keep=response_positions(batch), use_cache=False).logits


def response_positions(batch: TokenBatch) -> torch.Tensor:
    """The positions whose logits predict the response tokens, P-1 .. P+R-2, as HF's `logits_to_keep`:
    the LM head runs on those alone, and the logits come out contiguous (a slice of them would cost
    a full-vocabulary zero-filled gradient in the backward)."""
    total, R = batch.input_ids.shape[1], batch.responses.shape[1]
    return torch.arange(total - R - 1, total - 1, device=batch.input_ids.device)


def scalar_head_outputs(model: PreTrainedModel, batch: TokenBatch, precision: str) -> torch.Tensor:
    """A sequence-classification model's scalar head along the response: (batch, R + 1) fp32.

    Entry t is the head at the state that has read the prompt and the first t
    response tokens (position P-1+t). So entries 0..R-1 are the critic's V(s_t),
    the value before choosing response token t, and entry L (the response length)
    is the reward model's score of the whole response, read at its last token
    exactly as the RM was trained. The reward model and the critic are both
    `AutoModelForSequenceClassification` models (backbone + `score` head); HF pools
    their output at one token, so we run backbone and head ourselves.
    """
    return head_along_response(model, batch.input_ids, batch.attention_mask, batch.position_ids,
                               batch.prompt_width, precision)


def head_along_response(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        position_ids: torch.Tensor, prompt_width: int, precision: str) -> torch.Tensor:
    """`scalar_head_outputs` from the batch's tensors: backbone, then the head from position P-1 on."""
    backbone = getattr(model, model.base_model_prefix)
    with autocast(input_ids.device, precision):
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False).last_hidden_state
        outputs = model.score(hidden[:, prompt_width - 1:]).squeeze(-1)
    return outputs.float()


class ScalarHeadForward(torch.nn.Module):
    """`scalar_head_outputs` of one model as a module: a sharded critic's FSDP root, whose call
    gathers the weights of the backbone and of the head that it runs one after the other."""

    def __init__(self, model: PreTrainedModel, precision: str):
        super().__init__()
        self.model, self.precision = model, precision

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                prompt_width: int) -> torch.Tensor:
        return head_along_response(self.model, input_ids, attention_mask, position_ids, prompt_width, self.precision)


def response_lengths(batch: TokenBatch) -> torch.Tensor:
    return batch.response_mask.sum(1).long()


def sequence_scores(head_outputs: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
    """The entry of `scalar_head_outputs` after each row's last response token: (batch,)."""
    return head_outputs[torch.arange(head_outputs.shape[0]), response_lengths(batch)]
