"""The models PPO trains: a value model (a decoder with a scalar head at every token) and the policy + value pair
that DeepSpeed wraps as one engine (one optimizer, one ZeRO partitioning)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipeline.models import DTYPES, checked_local


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count attended tokens only: a left-padded row gets the positions it would have unpadded."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class ValueModel(nn.Module):
    """V(s_t) for every position t: a transformer decoder (no LM head) and a linear head on its last hidden state."""

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder = decoder
        hidden = decoder.config.get_text_config().hidden_size
        self.head = nn.Linear(hidden, 1)
        nn.init.normal_(self.head.weight, std=1.0 / (hidden + 1) ** 0.5)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, dtype: str = "float32",
                        trust_remote_code: bool = False) -> "ValueModel":
        """The decoder of any causal LM, sequence classifier or GRM directory (`AutoModel` drops their heads)."""
        from transformers import AutoModel

        model = AutoModel.from_pretrained(checked_local(name_or_path), dtype=DTYPES[dtype], use_safetensors=True,
                                          trust_remote_code=trust_remote_code)
        return cls(model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.decoder(input_ids=input_ids, attention_mask=attention_mask,
                              position_ids=position_ids(attention_mask), use_cache=False).last_hidden_state
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1)


class PolicyAndValue(nn.Module):
    """One module for DeepSpeed: `forward` returns the policy's logits and the value model's values."""

    def __init__(self, policy: nn.Module, value: ValueModel):
        super().__init__()
        self.policy, self.value = policy, value
        self.config = policy.config  # accelerate fills DeepSpeed's "auto" bucket sizes from the hidden size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.policy(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=position_ids(attention_mask), use_cache=False).logits
        return logits, self.value(input_ids, attention_mask)


def response_logprobs(logits: torch.Tensor, responses: torch.Tensor, context_length: int,
                      temperature: float = 1.0) -> torch.Tensor:
    """log π(y_t | x, y_<t) of each response token, from the logits of the whole query+response sequence.

    The logit at position i predicts token i+1, so the response's T tokens are predicted by positions
    context_length − 1 … context_length + T − 2. Logits are divided by the sampling temperature: the log-probs are
    those of the distribution the tokens were drawn from.
    """
    T = responses.shape[1]
    logits = logits[:, context_length - 1:context_length - 1 + T].float() / temperature
    return torch.gather(torch.log_softmax(logits, dim=-1), 2, responses.unsqueeze(-1)).squeeze(-1)
