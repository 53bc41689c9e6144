"""The fused-head log-prob helper: equal to log_softmax of full logits on the scored tokens, 0 elsewhere, padding-free
per row, and patched once (on the base model under PEFT)."""

import pytest
import torch

from align.log_probs import enable_fused_log_probs, is_peft_model, token_log_probs


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    enable_fused_log_probs(model)
    return model


def _full_logit_log_probs(model, input_ids):
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits[:, :-1].double()
    return torch.log_softmax(logits, -1).gather(-1, input_ids[:, 1:, None])[..., 0]


def test_scored_tokens_match_full_logits_and_the_rest_are_zero(model):
    torch.manual_seed(0)
    input_ids = torch.randint(0, model.config.vocab_size, (2, 9))
    scored = torch.zeros_like(input_ids)
    scored[0, 4:] = 1
    scored[1, 2:7] = 1
    with torch.no_grad():
        log_probs, outputs = token_log_probs(model, input_ids, scored)
    assert log_probs.shape == (2, 8)
    expected = _full_logit_log_probs(model, input_ids)
    mask = scored[:, 1:].bool()
    assert torch.allclose(log_probs.double()[mask], expected[mask], atol=1e-5)
    assert (log_probs[~mask] == 0).all()
    assert outputs.log_probs.shape == (2, 8)


def test_right_padding_does_not_change_a_row(model):
    torch.manual_seed(1)
    short = torch.randint(0, model.config.vocab_size, (1, 5))
    padded = torch.cat([short, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    attention_mask = torch.tensor([[1] * 5 + [0] * 3])
    with torch.no_grad():
        alone, _ = token_log_probs(model, short, torch.ones_like(short))
        together, _ = token_log_probs(model, padded, attention_mask, attention_mask=attention_mask)
    assert torch.allclose(alone[0], together[0, :4], atol=1e-5)
    assert (together[0, 4:] == 0).all()


def test_the_head_is_patched_once_on_the_base_model(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"]))
    assert is_peft_model(peft_model) and not is_peft_model(base)
    enable_fused_log_probs(peft_model)
    patched = base.forward
    enable_fused_log_probs(peft_model)
    assert base.forward is patched and base._align_fused_lm_head
    input_ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        log_probs, _ = token_log_probs(peft_model, input_ids, torch.ones_like(input_ids))
    assert torch.allclose(log_probs.double(), _full_logit_log_probs(base, input_ids), atol=1e-5)
